"""Peers beyond diffusers: OpenVINO (the reference U-Net converted) and stable-diffusion.cpp.

Each peer is optional: when it cannot run here, `unavailable` says why, and the results table
records that sentence instead of a figure.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import torch

unavailable: dict[str, str] = {}  # peer name -> why it did not run


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


def sdcpp_status() -> str:
    """Why stable-diffusion.cpp has no figure in this run."""
    if not shutil.which("cmake"):
        return "not built: cmake is not installed"
    return ("not automated yet: building it from the stable-diffusion-cpp-python source package (cmake, in a "
            "temporary folder) and converting the random folder to a single file are still to be scripted; "
            "the issue's clean-machine figure is ~43 s per U-Net step at 512x512")
