"""Peers beyond diffusers: OpenVINO (the reference U-Net converted) and stable-diffusion.cpp.

stable-diffusion.cpp is built and run by `sdcpp.py`; here its figures join the report.
Each peer is optional: when it cannot run here, `unavailable` says why, and the results table
records that sentence instead of a figure.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import sdcpp
from timing import Timings, busy

unavailable: dict[str, str] = {}  # peer name -> why it did not run
SDCPP = "sd.cpp"


@dataclass
class ConvertedUNet:
    """A compiled OpenVINO U-Net and what converting and compiling it cost (seconds)."""

    call: Callable[[], object]
    convert_s: float
    compile_s: float


class _UNetSample(torch.nn.Module):
    """diffusers' U-Net returning a plain tensor, so that it traces."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context, return_dict=False)[0]


def openvino_unet(unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...], precision: str) -> ConvertedUNet | None:
    """The reference U-Net traced and converted by `openvino.convert_model`, compiled for CPU in f32 or bf16.

    The fp32 model is converted (OpenVINO picks the compute precision from the hint), as its
    Stable Diffusion notebooks do.
    """
    name = f"openvino {precision}"
    try:
        import openvino as ov
    except ImportError:
        unavailable[name] = "openvino is not installed: run `bash bench/setup.sh`"
        return None
    example = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    start = time.perf_counter()
    try:
        with torch.no_grad():  # a float32 copy: the caller's (bf16) U-Net is left as it is
            unet32 = unet if next(unet.parameters()).dtype == torch.float32 else copy.deepcopy(unet).float()
            model = ov.convert_model(_UNetSample(unet32).eval(), example_input=example)
            del unet32
    except Exception as error:  # a converter failure is a result to report, not a crash
        unavailable[name] = f"conversion failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return None
    convert_s = time.perf_counter() - start
    core = ov.Core()
    hint = {"f32": "f32", "bf16": "bf16"}[precision]
    if hint == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        unavailable[name] = "this CPU has no bf16 support in OpenVINO"
        return None
    start = time.perf_counter()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                "PERFORMANCE_HINT": "LATENCY"})
    compile_s = time.perf_counter() - start
    request = compiled.create_infer_request()
    feeds = [t.numpy() for t in example]
    return ConvertedUNet(lambda: request.infer(feeds), convert_s, compile_s)


def sdcpp_built() -> bool:
    """True when stable-diffusion.cpp's CLI is already built (`bash bench/setup.sh`)."""
    return sdcpp.find_binary() is not None


def sdcpp_status() -> str:
    """Why stable-diffusion.cpp has no figure in a run that did not ask for it."""
    how = "it is built from the stable-diffusion-cpp-python source package on first use, or by `bash bench/setup.sh`"
    return f"not run: add `--peers sdcpp` ({how})"


def bench_sdcpp(folder: Path, workdir: Path, report, *, smoke: bool, size: int, steps: int, threads: int,
                log: Callable[[str], None]) -> None:
    """stable-diffusion.cpp's CLI on the same random-weight model, each run in its own process, in the report.

    Its figures are not interleaved with diffusers: each row pairs it with the median diffusers
    time of the same workload from this run's interleaved table (f32 against diffusers fp32,
    f16 and q8_0 against diffusers bf16, the low-precision peer).
    """
    if smoke:
        unavailable[SDCPP] = ("sd.cpp rejects the smoke run's tiny model (\"get sd version from file failed\": it "
                              "knows only the published shapes, its U-Net widths are fixed in its code)")
        return
    try:
        binary = sdcpp.find_binary() or sdcpp.build(jobs=1 if busy() else 2, log=log)
    except (sdcpp.SdcppError, OSError) as error:
        unavailable[SDCPP] = f"not built: {error}"
        return
    log(f"sd.cpp: writing or reusing the single-file model of {folder.name}")
    try:
        model = sdcpp.single_file(folder, workdir / f"{folder.name}.safetensors")
    except Exception as error:  # a converter failure is a result to report, not a crash
        unavailable[SDCPP] = f"single-file conversion failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return
    report.note("sd.cpp rows [own process]: not interleaved; each pairs sd.cpp with the diffusers median of the same "
                "workload from this run's table (f32 with diffusers fp32, f16 and q8_0 with diffusers bf16). One "
                "sd.cpp step with CFG runs the conditional and unconditional U-Net passes at batch 1, the work of one "
                "batch-2 step. Its --type applies to linear layers: convolution kernels stay f16 (im2col).")
    for weight_type in sdcpp.WEIGHT_TYPES:
        try:
            figures = sdcpp.measure(binary, model, weight_type, size=size, threads=threads, workdir=workdir, log=log)
        except sdcpp.SdcppError as error:
            unavailable[f"{SDCPP} {weight_type}"] = str(error)
            continue
        add_sdcpp_rows(report, figures, steps)


def add_sdcpp_rows(report, figures: sdcpp.SdcppFigures, steps: int) -> None:
    """One row per workload next to the same run's diffusers median; memory and how the figures were derived."""
    group = "fp32" if figures.weight_type == "f32" else "bf16"
    name, size = f"sd.cpp {figures.weight_type}", figures.size
    for prefix, seconds in ((f"U-Net step {size}x{size}, batch 2", figures.per_step_s),
                            ("text encoding (prompt + negative)", figures.text_s),
                            (f"VAE decode {size}x{size}", min(figures.decode_s)),
                            (f"txt2img {size}x{size}, {steps} Euler steps", figures.txt2img_s(steps))):
        baseline = next((t for t, dtype in report.rows if dtype == group and t.workload.startswith(prefix)
                         and "[sd.cpp" not in t.workload and f"diffusers {group}" in t.seconds), None)
        timings = Timings(f"{prefix} [sd.cpp, own process]")
        if baseline is not None:
            timings.seconds[f"diffusers {group}"] = [baseline.median(f"diffusers {group}")]
            timings.flops = baseline.flops
        timings.seconds[name] = [seconds]
        report.add(timings, group)
    one, many = figures.one_step, figures.n_steps
    report.memory(f"{name} ({size}x{size}, {figures.steps} steps)",
                  {"load_s": many.seconds["load"], "peak_gib": many.peak_gib,
                   "rss_loaded_gib": many.rss_loaded_gib if many.rss_loaded_gib is not None else float("nan")}, None)
    report.note(f"{name}: U-Net step = (sampling {figures.steps} steps {many.seconds['sampling']:.1f} s - sampling "
                f"1 step {one.seconds['sampling']:.1f} s) / {figures.steps - 1}; txt2img {steps} steps extrapolated "
                f"= 1-step total {one.seconds['total']:.1f} s + {steps - 1} x step; load "
                f"{many.seconds['load']:.1f} s (weights converted from the fp16 file while loading)")
