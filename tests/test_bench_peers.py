"""The stable-diffusion.cpp peer of the benchmark: its command line, log parsing and report rows.

The real CLI is built on demand outside the repo (bench/sdcpp.py); these tests run a mocked
`sd-cli` that logs like the real one, and check the real one's flags only when it is built.
"""

from __future__ import annotations

import math
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # noqa: E402
import sdcpp  # noqa: E402
from report import Report  # noqa: E402
from timing import Timings  # noqa: E402

# A mocked sd-cli: the real one's log line format, sampling = 3 s setup + 2 s per step.
FAKE_CLI = '''#!{python}
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
open(value("-o") + ".args.json", "w").write(json.dumps(args))
if value("--type") == "q8_0":
    print("[ERROR] model.cpp:900  - tensor 'x' has wrong shape", file=sys.stderr)
    sys.exit(1)
steps = int(value("--steps"))
sampling, ballast = 3.0 + 2.0 * steps, bytearray(64 << 20)
log = lambda text: print("[INFO ] stable-diffusion.cpp:100  - " + text, flush=True)
log("loading tensors completed, taking 1.50s (process: 0.00s, read: 1.00s, memcpy: 0.00s, convert: 0.50s)")
log("get_learned_condition completed, taking 0.25s")
for step in range(1, steps + 1):
    print("\\r  |====| %d/%d - 2.00s/it" % (step, steps), end="", flush=True)
print()
log("sampling completed, taking %.2fs" % sampling)
log("decode_first_stage completed, taking 7.00s")
log("generate_image completed in %.2fs" % (0.25 + sampling + 7.0))
'''


@pytest.fixture
def fake_cli(tmp_path: Path) -> Path:
    path = tmp_path / "sd-cli"
    path.write_text(FAKE_CLI.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_command_is_an_euler_cfg_txt2img_on_the_given_threads(tmp_path: Path) -> None:
    cmd = sdcpp.command(Path("/bin/sd-cli"), Path("m.safetensors"), tmp_path / "o.png", weight_type="f16", steps=4,
                        size=512, threads=2)
    value = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert cmd[0] == "/bin/sd-cli" and value("-M") == "img_gen" and value("-m") == "m.safetensors"
    assert (value("--type"), value("--steps"), value("-W"), value("-H"), value("-t")) == ("f16", "4", "512", "512", "2")
    assert (value("--sampling-method"), value("--scheduler"), value("--cfg-scale")) == ("euler", "discrete", "7.5")
    assert value("-p") == sdcpp.PROMPT and value("-n") == "" and value("-o") == str(tmp_path / "o.png")


@pytest.mark.parametrize("change", [{"weight_type": "q4_0"}, {"size": 500}, {"steps": 0}, {"threads": 0}])
def test_command_rejects_what_the_bench_cannot_compare(change: dict) -> None:
    kwargs = {"weight_type": "f32", "steps": 2, "size": 512, "threads": 2, **change}
    with pytest.raises(ValueError):
        sdcpp.command(Path("sd-cli"), Path("m"), Path("o.png"), **kwargs)


def test_parse_log_reads_each_phase_and_names_a_failure() -> None:
    log = ("[INFO ] model.cpp:993  - loading tensors completed, taking 12.34s (process: 0.00s, read: 3.21s)\n"
           "[INFO ] stable-diffusion.cpp:3168 - get_learned_condition completed, taking 0.41s\n"
           "  |==================================================| 4/4 - 43.10s/it\n"
           "[INFO ] stable-diffusion.cpp:3432 - sampling completed, taking 181.20s\n"
           "[INFO ] stable-diffusion.cpp:3212 - decode_first_stage completed, taking 64.50s\n"
           "[INFO ] stable-diffusion.cpp:3591 - generate_image completed in 246.11s\n")
    assert sdcpp.parse_log(log) == {"load": 12.34, "text": 0.41, "sampling": 181.2, "decode": 64.5, "total": 246.11}
    broken = log.split("[INFO ] stable-diffusion.cpp:3432")[0] + "[ERROR] ggml.c:12 - out of memory\n"
    with pytest.raises(sdcpp.SdcppError, match="no sampling, decode, total time.*out of memory"):
        sdcpp.parse_log(broken)


def test_measure_subtracts_the_one_step_run(fake_cli: Path, tmp_path: Path) -> None:
    figures = sdcpp.measure(fake_cli, tmp_path / "m.safetensors", "f32", size=64, steps=4, threads=2,
                            workdir=tmp_path, log=lambda _: None)
    assert figures.per_step_s == pytest.approx(2.0)  # (3 + 8 - (3 + 2)) / 3: the 3 s setup cancels
    assert figures.text_s == 0.25 and figures.decode_s == [7.0, 7.0]
    assert figures.txt2img_s(20) == pytest.approx(0.25 + 5.0 + 7.0 + 19 * 2.0)
    assert figures.n_steps.peak_gib > 0.06 and figures.n_steps.rss_loaded_gib is not None
    assert (tmp_path / "sdcpp-f32-64-4.png.args.json").is_file()  # the command reached the binary


def test_peak_memory_is_sd_clis_own_not_the_benchmarks(fake_cli: Path, tmp_path: Path) -> None:
    """The benchmark process is large when it starts sd-cli; Linux would carry its resident peak
    into a child it forks directly. The fake CLI holds 64 MiB; this process holds 1 GiB more."""
    ballast = bytearray(1 << 30)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident, not just reserved
    result = sdcpp.run(sdcpp.command(fake_cli, tmp_path / "m", tmp_path / "o.png", weight_type="f16", steps=2,
                                     size=64, threads=1))
    assert 0.06 < result.peak_gib < 0.5, result.peak_gib
    assert result.rss_loaded_gib is not None and result.rss_loaded_gib < 0.5
    del ballast


def test_a_failing_run_reports_its_error_line(fake_cli: Path, tmp_path: Path) -> None:
    with pytest.raises(sdcpp.SdcppError, match=r"exited with 1: \[ERROR\].*wrong shape"):
        sdcpp.measure(fake_cli, tmp_path / "m", "q8_0", size=64, steps=2, threads=1, workdir=tmp_path,
                      log=lambda _: None)


def test_rows_pair_each_figure_with_this_runs_diffusers_median(fake_cli: Path, tmp_path: Path) -> None:
    report = Report("cmd", "today", "machine", smoke=False)
    unet = Timings("U-Net step 64x64, batch 2", {"diffusers bf16": [3.0, 4.0, 5.0], "sdgen bf16": [3.0, 4.0, 5.0]},
                   flops=8e9)
    report.add(unet, "bf16")
    figures = sdcpp.measure(fake_cli, tmp_path / "m", "f16", size=64, steps=3, threads=1, workdir=tmp_path,
                            log=lambda _: None)
    peers.add_sdcpp_rows(report, figures, steps=20)
    text = report.markdown()
    row = next(line for line in text.splitlines() if line.startswith("| U-Net step 64x64") and "sd.cpp f16" in line)
    assert "[sd.cpp, own process]" in row and float(row.split("|")[4]) == pytest.approx(2.0 / 4.0)  # vs the median 4 s
    assert float(row.split("|")[6]) == pytest.approx(8e9 / 2.0 / 1e9)  # GFLOP/s from the same FLOP count
    decode = next(line for line in text.splitlines() if line.startswith("| VAE decode 64x64") and "sd.cpp" in line)
    assert math.isnan(float(decode.split("|")[4]))  # no diffusers decode in this report: no ratio
    assert "| sd.cpp f16 (64x64, 3 steps) |" in text and "U-Net step = (sampling 3 steps" in text


def test_smoke_run_records_why_sdcpp_cannot_run(tmp_path: Path) -> None:
    peers.unavailable.pop(peers.SDCPP, None)
    peers.bench_sdcpp(tmp_path, tmp_path, Report("c", "d", "m", True), smoke=True, size=64, steps=2, threads=1,
                      log=lambda _: None)
    assert "tiny model" in peers.unavailable.pop(peers.SDCPP)


def test_build_is_release_native_and_niced(tmp_path: Path) -> None:
    configure, build = sdcpp.build_commands(tmp_path / "src", tmp_path / "build", jobs=1)
    assert configure[:3] == ["nice", "-n", "19"] and build[:3] == ["nice", "-n", "19"]
    assert "-DCMAKE_BUILD_TYPE=Release" in configure and "-DGGML_NATIVE=ON" in configure
    assert build[-4:] == ["--target", "sd-cli", "-j", "1"]
    assert not str(sdcpp.binary_path()).startswith(str(Path(__file__).resolve().parent.parent))  # never in the repo


def test_single_file_has_the_original_key_prefixes(tmp_path: Path) -> None:
    from models import TINY, write_folder
    from safetensors import safe_open

    folder = write_folder(TINY, tmp_path / "tiny")
    path = sdcpp.single_file(folder, tmp_path / "tiny.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."):
        assert any(key.startswith(prefix) for key in keys), prefix
    assert sdcpp.single_file(folder, path) == path  # reused, not rewritten


@pytest.mark.skipif(sdcpp.find_binary() is None, reason="sd-cli not built (bash bench/setup.sh)")
def test_the_built_cli_knows_every_flag_the_bench_passes(tmp_path: Path) -> None:
    binary = sdcpp.find_binary()
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    cmd = sdcpp.command(binary, Path("m"), Path("o.png"), weight_type="q8_0", steps=2, size=512, threads=2)
    for flag in (part for part in cmd[1:] if part.startswith("-") and len(part) > 1):
        assert flag in help_text, flag
    for name in ("euler", "discrete", "q8_0", "img_gen"):
        assert name in help_text, name
