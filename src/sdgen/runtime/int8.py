"""int8 matrix products on CPUs with AVX-512 VNNI, through oneDNN (opt-in: `FastOptions.int8`).

VNNI multiplies four int8 pairs per 32-bit lane where bf16 multiplies two, so oneDNN's int8
convolutions and linear layers run about twice as fast as its bf16 ones here (bench/RESULTS.md).
Weights are quantized once per output channel (symmetric, int8); each input is quantized at every
call over its own range (affine, uint8: dynamic per-tensor quantization, no calibration set), and
the product comes back in the input's dtype with the bias added. The cost is rounding: about 1%
relative error per layer against bf16's 0.3%, which changes images (measured in RESULTS.md).

Only layers big enough to gain take this path (`MIN_CHANNELS` inputs and outputs, `MIN_ROWS`
rows); the others keep the bf16 path. Training and other devices always take the plain path.
`fast._int8_forward` runs the layers; this module quantizes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sdgen.runtime.kernels import cpu_flags, quantize_kernel

MIN_CHANNELS = 64  # narrower layers (a U-Net's first and last convolutions) keep bf16: cheap, and
                   # the last one's error would go straight into the predicted noise
MIN_ROWS = 64      # fewer rows (the time embedding's linear layers) cannot amortise a quantization


def int8_supported() -> bool:
    """oneDNN's int8 operations are in this PyTorch and the CPU has VNNI (or AMX) for them."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and bool(cpu_flags() & {"avx512_vnni", "amx_int8"}))


def int8_eligible(layer: nn.Module) -> bool:
    """Zero-padded Conv2d and Linear layers wide enough for int8 to pay."""
    if isinstance(layer, nn.Conv2d):
        return (layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
                and min(layer.in_channels // layer.groups, layer.out_channels) >= MIN_CHANNELS)
    return isinstance(layer, nn.Linear) and min(layer.in_features, layer.out_features) >= MIN_CHANNELS


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, float, int] | None:
    """x as uint8 over [min(x, 0), max(x, 0)]: (q, scale, zero_point) with x ~ (q - zero_point) * scale;
    None when x holds inf or NaN (to be computed without int8, so that they propagate)."""
    kernel = quantize_kernel() if x.dtype == torch.bfloat16 else None
    if kernel is not None and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        q, scale, zero_point = kernel(x)
        return (q, scale, zero_point) if math.isfinite(scale) else None
    low, high = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    zero_point = min(255, max(0, round(-low / scale)))
    q = torch.round(x.float() / scale).add_(zero_point).clamp_(0, 255).to(torch.uint8)
    return q, scale, zero_point


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output channel), symmetric: weight ~ q * scale."""
    flat = weight.detach().float().flatten(1)
    scale = (flat.abs().amax(1) / 127).clamp_min(1e-12)
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale
