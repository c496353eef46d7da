"""stable-diffusion.cpp as a benchmark peer: built here from PyPI's source package, run as its CLI.

    .venv/bin/python bench/sdcpp.py build [--jobs 2]      # once (bench/setup.sh does it); ~/.cache only
    .venv/bin/python bench/sdcpp.py measure --folder DIR  # its figures alone, on a diffusers folder

Build: the `stable-diffusion-cpp-python` sdist vendors stable-diffusion.cpp with ggml. It is
downloaded with pip (`--no-binary :all:`), unpacked under ~/.cache/sdgen-bench/ and its CLI
(`sd-cli`) built with cmake in Release with ggml's native CPU flags (-march=native: AVX-512
here), niced, outside the repo: none of its sources or binaries are ever committed.

Measure: sd.cpp has no batch-2 U-Net call; with CFG it runs the conditional and unconditional
passes one after the other at batch 1, i.e. the same work as our "batch 2 with guidance" step.
Its CLI logs the seconds of text encoding, sampling and VAE decoding. The same prompt is run
with 1 and with N steps; the difference of the two sampling times over N - 1 is the time per
step, free of the one-off graph and buffer setup that a single run's average would include.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PACKAGE, VERSION = "stable-diffusion-cpp-python", "0.4.7"  # pinned: the log lines parsed below are this version's
CACHE = Path(os.environ.get("SDGEN_BENCH_CACHE", Path.home() / ".cache" / "sdgen-bench"))
WEIGHT_TYPES = ("f32", "f16", "q8_0")  # sd.cpp's --type: it converts the file's weights while loading
STEPS = 4  # the N of the N-step minus 1-step difference
PROMPT, NEGATIVE, CFG = "a tranquil lake with the mountains at sunset", "", 7.5  # as bench/run.py

# Lines of sd.cpp's log (stable-diffusion.cpp, model.cpp) -> our names for the phases
_PHASES = {"load": r"loading tensors completed, taking ([0-9.]+)s",
           "text": r"get_learned_condition completed, taking ([0-9.]+)s",
           "sampling": r"sampling completed, taking ([0-9.]+)s",
           "decode": r"decode_first_stage completed, taking ([0-9.]+)s",
           "total": r"generate_image completed in ([0-9.]+)s"}


class SdcppError(RuntimeError):
    """stable-diffusion.cpp could not be built or run; the message says why in one line."""


@dataclass
class SdcppRun:
    """One CLI run: the phases' seconds from its log, wall time, resident memory, its command line."""

    seconds: dict[str, float]
    wall_s: float
    rss_loaded_gib: float | None  # VmRSS when the log says the weights are loaded
    peak_gib: float  # sd-cli's ru_maxrss, reported by the small process that started it
    command: list[str] = field(default_factory=list)


@dataclass
class SdcppFigures:
    """One weight type's figures: per U-Net step (with guidance) from the N-step minus 1-step runs."""

    weight_type: str
    size: int
    steps: int
    per_step_s: float
    text_s: float
    decode_s: list[float]  # one per run
    one_step: SdcppRun
    n_steps: SdcppRun

    def txt2img_s(self, steps: int) -> float:
        """Whole txt2img for `steps` steps, extrapolated from the 1-step run: total + (steps - 1) * per step."""
        return self.one_step.seconds["total"] + (steps - 1) * self.per_step_s


def binary_path(cache: Path = CACHE, version: str = VERSION) -> Path:
    """Where `build` puts the CLI."""
    return cache / f"build-{version}" / "bin" / "sd-cli"


def find_binary(cache: Path = CACHE, version: str = VERSION) -> Path | None:
    """The built CLI, or None (`SDCPP_BIN` in the environment names another build)."""
    given = os.environ.get("SDCPP_BIN")
    path = Path(given) if given else binary_path(cache, version)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def cmake_program() -> str | None:
    """cmake from PATH or from this Python's environment (`pip install cmake` puts it there)."""
    beside = Path(sys.executable).parent / "cmake"
    return shutil.which("cmake") or (str(beside) if beside.is_file() else None)


def build_commands(source: Path, build_dir: Path, jobs: int, cmake: str = "cmake") -> list[list[str]]:
    """Configure and build only `sd-cli`: Release, ggml's -march=native, no WebP/WebM, niced to the lowest priority."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake, "-S", str(source), "-B", str(build_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_NATIVE=ON", "-DSD_WEBP=OFF", "-DSD_WEBM=OFF", "-DSD_BUILD_SHARED_LIBS=OFF"]
    build = [cmake, "--build", str(build_dir), "--target", "sd-cli", "-j", str(jobs)]
    return [["nice", "-n", "19", *configure], ["nice", "-n", "19", *build]]


def build(cache: Path = CACHE, version: str = VERSION, jobs: int = 1,
          log: Callable[[str], None] = print) -> Path:
    """Download the sdist with pip, unpack it under `cache` and build `sd-cli`; reused when already built."""
    binary = binary_path(cache, version)
    if binary.is_file():
        return binary
    cmake = cmake_program()
    if cmake is None:
        raise SdcppError("cmake is not installed: run `bash bench/setup.sh` (it pip-installs cmake when missing)")
    if not (shutil.which("c++") or shutil.which("g++")):
        raise SdcppError("no C++ compiler on PATH: install g++ (apt-get install g++) to build stable-diffusion.cpp")
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / f"stable_diffusion_cpp_python-{version}"
    if not (source / "vendor" / "stable-diffusion.cpp" / "CMakeLists.txt").is_file():
        archive = cache / f"stable_diffusion_cpp_python-{version}.tar.gz"
        if not archive.is_file():
            log(f"sd.cpp: pip download {PACKAGE}=={version} (source)")
            _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
                  f"{PACKAGE}=={version}", "-d", str(cache)], "pip download")
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    build_dir = binary.parent.parent
    start = time.perf_counter()
    for command in build_commands(source / "vendor" / "stable-diffusion.cpp", build_dir, jobs, cmake):
        log(f"sd.cpp: {' '.join(command[3:6])} ... (-j {jobs})")
        _run(command, "build", log_file=build_dir / "sdgen-build.log")
    log(f"sd.cpp: built in {time.perf_counter() - start:.0f} s: {binary}")
    return binary


def _run(command: list[str], what: str, log_file: Path | None = None) -> None:
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file or os.devnull, "a") as sink:
        result = subprocess.run(command, stdout=sink, stderr=subprocess.PIPE if not log_file else sink, text=True)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-1:] or [f"see {log_file}"]
        raise SdcppError(f"{what} failed (exit {result.returncode}): {detail[0][:200]}")


def single_file(folder: Path, out: Path) -> Path:
    """The diffusers folder as one original-key `.safetensors` (sd.cpp reads these), written once and reused."""
    from sdgen.checkpoints.reader import read_checkpoint
    from sdgen.train.finetune.saving import write_single_file

    done = out.with_name(out.name + ".complete")
    if out.is_file() and done.is_file() and done.read_text() == str(folder.resolve()):
        return out
    write_single_file(read_checkpoint(folder), out)
    done.write_text(str(folder.resolve()))
    return out


def command(binary: Path, model: Path, output: Path, *, weight_type: str, steps: int, size: int, threads: int,
            prompt: str = PROMPT, negative: str = NEGATIVE, cfg_scale: float = CFG, seed: int = 0) -> list[str]:
    """sd-cli's txt2img command line: Euler with the discrete (SD 1.x) schedule, CFG, one image."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown sd.cpp weight type {weight_type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    if size % 64 or size <= 0 or steps < 1 or threads < 1:
        raise ValueError(f"size must be a positive multiple of 64, steps and threads at least 1 "
                         f"(got size {size}, steps {steps}, threads {threads})")
    return [str(binary), "-M", "img_gen", "-m", str(model), "--type", weight_type, "-p", prompt, "-n", negative,
            "--cfg-scale", f"{cfg_scale:g}", "--sampling-method", "euler", "--scheduler", "discrete",
            "--steps", str(steps), "-W", str(size), "-H", str(size), "-s", str(seed),
            "-t", str(threads), "-o", str(output)]


def parse_log(text: str) -> dict[str, float]:
    """Seconds of each phase from sd-cli's log; a missing phase means the run failed."""
    seconds = {name: float(found[-1]) for name, pattern in _PHASES.items() if (found := re.findall(pattern, text))}
    missing = [name for name in _PHASES if name not in seconds]
    if missing:
        raise SdcppError(f"sd-cli logged no {', '.join(missing)} time; last message: {parse_error(text)}")
    return seconds


def _rss_gib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


# sd-cli is started by a small Python process that reports its pid and, once it ends, its peak
# resident memory. Started from the benchmark directly, its ru_maxrss would be the benchmark's:
# Linux keeps a process's resident high-water mark across exec, and a child forked from a 16 GiB
# process starts with 16 GiB resident (every sd.cpp run once read 16.63 GiB that way; sd-cli alone
# peaks at 2.3 GiB at 512x512).
_STARTER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
print(f"{PID} {child.pid}", flush=True)
_, status, usage = os.wait4(child.pid, 0)
print(f"{PEAK} {usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""
_PID, _PEAK = "sdgen-bench: sd-cli pid", "sdgen-bench: sd-cli peak KiB"


def run(cmd: list[str], timeout: float = 3600.0) -> SdcppRun:
    """Run sd-cli once, reading its log as it comes (RSS sampled when loading ends); peak RSS from
    wait4 in the process that started it."""
    start = time.perf_counter()
    starter = _STARTER.replace("{PID}", _PID).replace("{PEAK}", _PEAK)
    process = subprocess.Popen([sys.executable, "-c", starter, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.start()
    lines, rss_loaded, child, peak_kib = [], None, None, None
    try:
        for line in process.stdout:  # '\r' progress updates arrive as lines too (universal newlines)
            if line.startswith(_PID):
                child = int(line.split()[-1])
            elif line.startswith(_PEAK):
                peak_kib = int(line.split()[-1])
            else:
                lines.append(line)
            if rss_loaded is None and child is not None and "loading tensors completed" in line:
                rss_loaded = _rss_gib(child)
        process.wait()
    finally:
        watchdog.cancel()
        process.stdout.close()
    wall = time.perf_counter() - start
    text = "".join(lines)
    if process.returncode != 0 or peak_kib is None:
        raise SdcppError(f"sd-cli exited with {process.returncode}"
                         f"{' (killed after the timeout)' if wall >= timeout else ''}: {parse_error(text)}")
    return SdcppRun(parse_log(text), wall, rss_loaded, peak_kib / 2**20, cmd)


def parse_error(text: str) -> str:
    """The most telling line of a failed run's log: its last [ERROR] line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "[ERROR]" in line]
    return ((errors or lines or ["no output"])[-1])[:200]


def measure(binary: Path, model: Path, weight_type: str, *, size: int = 512, steps: int = STEPS, threads: int = 2,
            workdir: Path | None = None, log: Callable[[str], None] = print) -> SdcppFigures:
    """One weight type: a 1-step and an N-step txt2img; per step = (sampling_N - sampling_1) / (N - 1)."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 to subtract the 1-step run (got {steps})")
    workdir = workdir or Path(tempfile.gettempdir())
    runs = []
    for n in (1, steps):
        output = workdir / f"sdcpp-{weight_type}-{size}-{n}.png"
        log(f"sd.cpp {weight_type}: {size}x{size}, {n} step(s), {threads} threads")
        runs.append(run(command(binary, model, output, weight_type=weight_type, steps=n, size=size, threads=threads)))
    one, many = runs
    per_step = (many.seconds["sampling"] - one.seconds["sampling"]) / (steps - 1)
    return SdcppFigures(weight_type, size, steps, per_step, min(r.seconds["text"] for r in runs),
                        [r.seconds["decode"] for r in runs], one, many)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "measure"])
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile jobs (1 while others use the cores)")
    parser.add_argument("--folder", type=Path, help="measure: a diffusers folder of SD 1.x shapes")
    parser.add_argument("--types", default=",".join(WEIGHT_TYPES), help="measure: comma-separated weight types")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    try:
        binary = find_binary() or build(jobs=args.jobs)
        if args.action == "measure":
            if args.folder is None:
                raise SdcppError("measure needs --folder (a diffusers folder, e.g. the one bench/run.py writes)")
            model = single_file(args.folder, args.folder.parent / f"{args.folder.name}.safetensors")
            for weight_type in args.types.split(","):
                figures = measure(binary, model, weight_type, size=args.size, steps=args.steps, threads=args.threads,
                                  workdir=args.folder.parent)
                print(f"sd.cpp {weight_type} {args.size}x{args.size}: U-Net step with guidance "
                      f"{figures.per_step_s:.2f} s, text {figures.text_s:.2f} s, VAE decode "
                      f"{min(figures.decode_s):.2f} s, peak RSS {figures.n_steps.peak_gib:.2f} GiB")
    except SdcppError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
