"""Opt-in CPU fast paths for the U-Net and the VAE; the default path stays bit-exact with diffusers.

What each switch does, and why it is faster on a CPU (measured in bench/RESULTS.md):
- `channels_last`: activations in NHWC, oneDNN's native convolution layout. NCHW inputs are
  reordered to a blocked layout and back around every convolution; NHWC ones are not, and the
  spatial transformer's (b, c, h, w) -> (b, h*w, c) token permutes become free views. The 3x3
  kernels are given NHWC strides once (PyTorch would copy them at every call otherwise). Off by
  default: with prepacked weights it measured no faster than NCHW on AVX-512 BF16 (no AMX).
- `fp32_attention`: attention in float32 for bf16 models. PyTorch's CPU flash-attention kernel
  is slower in bf16 than in fp32 for SD's head sizes (40, 80, 160), and float32 is also the more
  accurate choice. The projections around it stay in bf16.
- `prepack`: convolution weights (and bf16 linear weights) reordered once into oneDNN's blocked
  layout (what torch.compile's freezing does), instead of at every call; same arithmetic. In
  fp32 this matters most where the image is small: a 1280-channel 3x3 convolution on an 8x8
  latent ran at 116 GFLOP/s unpacked and 285 packed here (2 cores, AVX-512). fp32 linear layers
  stay on MKL's GEMM, already near the peak. A packed copy is kept per layer (about the size of
  the packed weights once more) and is packed again if the layer's weight is replaced or changed
  in place (LoRA merging).
- `blocked_attention`: bf16 attention through the compiled kernel (sdgen.runtime.kernels: AVX-512
  BF16 products, fp32 scores and softmax, about 2x PyTorch's matrix products for SD's
  self-attention and 2-3x its upcast attention at 77 keys), or, where the kernel is not built,
  bf16 self-attention as blocked matrix products (layers.blocked_attention).
- `fused_ops`: the feed-forward's value * gelu(gate), and every GroupNorm followed by SiLU, in one
  pass each of the compiled kernels (about 2x PyTorch's two passes, and one bf16 rounding
  instead of two).
- `upsample_phases`: each 2x nearest upsampling followed by a 3x3 convolution computed as four 2x2
  convolutions of the small input, one per output phase (pixel position within its 2x2 block),
  with the 3x3 kernel's taps that fall on the same input pixel summed: 16 multiply-adds per input
  pixel and channel pair instead of 36. These are about a tenth of the U-Net's and a quarter of
  the VAE decoder's arithmetic at 512x512.
These change rounding only: results stay within the bf16 tolerance of the fp32 model
(tests/test_fast_paths.py, tests/test_kernels.py).
- `step_cache` (0 = off): DeepCache's feature reuse across sampling steps (step_cache.py). Unlike
  the others it changes the images, by a measured amount, so it is never on by default; so do
  `token_merging` (token_merging.py) and `int8` (int8.py: the U-Net's wide convolutions and
  linear layers as int8 products on VNNI, about twice bf16's speed per product).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, replace

import torch
from torch import nn

from sdgen.errors import UserError
from sdgen.models.layers import GEGLU, Attention, SelfAttention2d, SpatialTransformer, Upsample, is_channels_last
from sdgen.models.unet import UNetConfig
from sdgen.runtime.int8 import MIN_ROWS, int8_eligible, int8_supported, quantize_activations, quantize_weight
from sdgen.runtime.mapped import file_mappings, release_file_pages
from sdgen.runtime.step_cache import StepCache
from sdgen.runtime.token_merging import check_ratio


@dataclass(frozen=True)
class FastOptions:
    """Which fast paths to switch on; the defaults are the ones that pay off on CPUs."""

    channels_last: bool = False  # measured no faster than NCHW once weights are prepacked (RESULTS.md)
    fp32_attention: bool = True
    blocked_attention: bool = True  # bf16 attention: compiled kernel, or blocked matrix products without it
    fused_ops: bool = True  # GEGLU, and GroupNorm + SiLU, in one pass each (compiled kernels, bf16)
    prepack: bool = True
    upsample_phases: bool = True  # nearest 2x + 3x3 convolution as four 2x2 convolutions of the small input
    step_cache: int = 0  # run the whole U-Net every this many steps, the shallow levels in between
    token_merging: float = 0.0  # share of the top attention level's tokens merged (ToMe; 0.5 is usual)
    int8: bool = False  # wide convolutions and linear layers in int8 on VNNI (int8.py; the U-Net's only in
                        # accelerate_pipeline); images change


def accelerate(module: nn.Module, options: FastOptions = FastOptions()) -> nn.Module:
    """Switch the fast paths on for a U-Net or VAE (in place; weights are not copied) and return it."""
    if hasattr(module, "channels_last"):
        module.channels_last = options.channels_last
        if options.channels_last:
            _channels_last_kernels(module)
    if hasattr(module, "step_cache"):
        module.step_cache = StepCache(options.step_cache) if options.step_cache > 1 else None
    for transformer in _top_attention_level(module):
        transformer.token_merging = check_ratio(options.token_merging)
    if options.prepack and torch.backends.mkldnn.is_available():
        for child in module.modules():
            if _packable(child):
                child.forward = types.MethodType(_packed_forward, child)
    if options.int8:
        if not int8_supported():
            raise UserError("int8 needs a CPU with AVX-512 VNNI (or AMX) and PyTorch's oneDNN int8 operations; "
                            "run without it")
        for child in module.modules():
            if int8_eligible(child):
                child.forward = types.MethodType(_int8_forward, child)
    if options.upsample_phases:
        for child in module.modules():
            if isinstance(child, Upsample):
                child.forward = types.MethodType(_upsample_by_phases, child)
    for child in module.modules():
        if isinstance(child, (Attention, SelfAttention2d)):
            # `upcast` set by the config (SD 2.x) stays on whatever the options say
            child.upcast = child.upcast or options.fp32_attention
            child.blocked = options.blocked_attention
        if isinstance(child, (GEGLU, nn.GroupNorm)):
            child.fused = options.fused_ops
    return module


def _top_attention_level(module: nn.Module) -> list[SpatialTransformer]:
    """A U-Net's spatial transformers at its highest-resolution level with attention (down and up),
    where tokens are most numerous and most alike: the level token merging works on."""
    cfg = getattr(module, "cfg", None)
    if not isinstance(cfg, UNetConfig) or not any(cfg.attention):
        return []
    level = list(cfg.attention).index(True)
    stages = (module.down_blocks[level], module.up_blocks[cfg.levels - 1 - level])
    return [t for stage in stages for t in (stage.attentions or []) if isinstance(t, SpatialTransformer)]


def uses_int8(module: nn.Module) -> bool:
    """Whether a U-Net runs any layer on the int8 path."""
    return any(getattr(child.__dict__.get("forward"), "__func__", None) is _int8_forward for child in module.modules())


def token_merging_ratio(module: nn.Module) -> float:
    """The token merging ratio a U-Net runs with (0 when off)."""
    return max((t.token_merging for t in _top_attention_level(module)), default=0.0)


def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _packable(layer: nn.Module) -> bool:
    """Zero-padded Conv2d layers with numeric padding (fp32 or bf16), and bf16 Linear layers."""
    dtype = getattr(layer, "weight", None) is not None and layer.weight.dtype
    if dtype == torch.bfloat16 and not _mkldnn_bf16():
        return False
    if isinstance(layer, nn.Conv2d):
        return (dtype in (torch.float32, torch.bfloat16) and layer.padding_mode == "zeros"
                and not isinstance(layer.padding, str))
    return isinstance(layer, nn.Linear) and dtype == torch.bfloat16


def _version(tensor: torch.Tensor) -> int:
    """The in-place modification counter (inference tensors have none and cannot be modified in place)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _packed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Conv2d / Linear forward on a weight packed at the first call (and again whenever the weight changed)."""
    weight = layer.weight
    packed = layer.__dict__.get("_packed")
    if x.device.type != "cpu" or x.dtype != weight.dtype or (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return type(layer).forward(layer, x)  # the packed ops have no backward: training takes the plain path
    if packed is None or packed[0] is not weight or packed[1] != _version(weight):
        if isinstance(layer, nn.Conv2d):
            dense = weight.detach().contiguous().to_mkldnn()
            packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                dense, list(layer.padding), list(layer.stride), list(layer.dilation), layer.groups, list(x.shape))
        else:
            packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), x.numel() // x.shape[-1])
        packed = layer.__dict__["_packed"] = (weight, _version(weight), packed_weight)
    bias = layer.bias
    if isinstance(layer, nn.Conv2d):
        return torch.ops.mkldnn._convolution_pointwise(x, packed[2], bias, list(layer.padding), list(layer.stride),
                                                       list(layer.dilation), layer.groups, "none", [], "")
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed[2], bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _int8_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Conv2d / Linear forward through oneDNN's int8 product (int8.py), the weight quantized and
    packed at the first call (and again whenever it changed); the bf16 packed path where int8
    does not apply (training, another device, too few rows)."""
    weight = layer.weight
    rows = x.numel() // (x.shape[1] if isinstance(layer, nn.Conv2d) else x.shape[-1])
    quantized = None
    if not (x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or rows < MIN_ROWS
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        quantized = quantize_activations(x)
    if quantized is None:  # or inf / NaN in x: they propagate as without int8
        return _packed_forward(layer, x) if _packable(layer) else type(layer).forward(layer, x)
    cached = layer.__dict__.get("_int8")
    if cached is None or cached[0] is not weight or cached[1] != _version(weight):
        q, scale = quantize_weight(weight)
        if isinstance(layer, nn.Conv2d):
            # the activation scale given here is a placeholder: each call passes its own
            packed = torch.ops.onednn.qconv_prepack(q, scale, 1.0, 0, list(layer.stride), list(layer.padding),
                                                    list(layer.dilation), layer.groups, None)
        else:
            packed = torch.ops.onednn.qlinear_prepack(q, None)
        zero_points = torch.zeros(scale.numel(), dtype=torch.int64)
        bias = None if layer.bias is None else layer.bias.detach().float()
        cached = layer.__dict__["_int8"] = (weight, _version(weight), packed, scale, zero_points, bias)
    _, _, packed, scale, zero_points, bias = cached
    q, x_scale, x_zero_point = quantized
    if isinstance(layer, nn.Conv2d):
        return torch.ops.onednn.qconv2d_pointwise(
            q, x_scale, x_zero_point, packed, scale, zero_points, bias, list(layer.stride), list(layer.padding),
            list(layer.dilation), layer.groups, 1.0, 0, x.dtype, "none", [], None)
    out = torch.ops.onednn.qlinear_pointwise(q.reshape(-1, x.shape[-1]), x_scale, x_zero_point, packed, scale,
                                             zero_points, bias, 1.0, 0, x.dtype, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


# Which 3x3 kernel rows (or columns) land on each of the two input rows a 2x2 phase kernel reads:
# output row 2i reads input rows i-1 (kernel row 0) and i (rows 1 and 2); output row 2i+1 reads
# rows i (kernel rows 0 and 1) and i+1 (row 2).
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2): the 2x2 kernel of each output phase (a, b) of a
    3x3 convolution over a 2x nearest-upsampled input, phases in the order (0,0), (0,1), (1,0), (1,1);
    the taps are summed in fp32 and rounded once to the weight's dtype."""
    taps = _PHASE_TAPS.to(weight.device)
    kernels = torch.einsum("auy,oiyx,bvx->aboiuv", taps, weight.float(), taps)
    return kernels.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


def _upsample_by_phases(upsample: Upsample, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Upsample.forward for an exact 2x upsampling (the U-Net passes its skip's size, twice the input's
    unless that is odd): one 2x2 convolution with 4 C_out outputs over the
    input padded by one pixel gives, for phase (a, b), output pixel (2i + a, 2j + b) at (i + a, j + b)."""
    conv = upsample.conv
    doubled = x.ndim == 4 and (size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]))
    if not doubled or (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)):
        return type(upsample).forward(upsample, x, size)  # an odd target size (U-Net skips), or training
    phases = upsample.__dict__.get("_phases")
    if phases is None or phases[0] is not conv.weight or phases[1] != _version(conv.weight):
        bias = None if conv.bias is None else conv.bias.detach().repeat(4)
        phase_conv = nn.Conv2d(conv.in_channels, 4 * conv.out_channels, 2, padding=1, bias=bias is not None,
                               device=x.device, dtype=conv.weight.dtype).requires_grad_(False)
        phase_conv.weight.copy_(phase_kernels(conv.weight.detach()))
        if bias is not None:
            phase_conv.bias.copy_(bias)
        if "forward" in conv.__dict__:  # the layer it stands for was prepacked (or int8): so is this one
            phase_conv.forward = types.MethodType(conv.__dict__["forward"].__func__, phase_conv)
        phases = upsample.__dict__["_phases"] = (conv.weight, _version(conv.weight), phase_conv)
    batch, _, height, width = x.shape
    channels = conv.out_channels
    y = phases[2](x)  # (batch, 4 channels, height + 1, width + 1)
    layout = torch.channels_last if is_channels_last(y) else torch.contiguous_format
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=y.dtype, device=y.device, memory_format=layout)
    blocks = out.unflatten(2, (height, 2)).unflatten(4, (width, 2))  # (batch, channels, height, a, width, b)
    for a in range(2):
        for b in range(2):
            phase = 2 * a + b
            blocks[:, :, :, a, :, b].copy_(y[:, phase * channels:(phase + 1) * channels, a:a + height, b:b + width])
    return out


def _channels_last_kernels(module: nn.Module) -> None:
    """Give every 3x3 kernel NHWC strides once: with NCHW kernels PyTorch copies each one at every call."""
    mappings = file_mappings()
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and not conv.weight.is_contiguous(memory_format=torch.channels_last):
            old = conv.weight
            conv.weight = nn.Parameter(old.contiguous(memory_format=torch.channels_last), requires_grad=False)
            release_file_pages([old], mappings)  # a kernel mapped from the file leaves the resident set


def accelerate_pipeline(pipe, options: FastOptions = FastOptions()):
    """`accelerate` the U-Net and the VAE of a StableDiffusion pipeline; the text encoder is too small to matter.
    int8 goes to the U-Net only: the VAE's error would land on the pixels directly."""
    if pipe.device.type == "cpu":
        accelerate(pipe.unet, options)
        accelerate(pipe.vae, replace(options, int8=False))
    return pipe


def restore(module: nn.Module) -> nn.Module:
    """Back to the exact default path (the config's own attention upcast is kept)."""
    if hasattr(module, "channels_last"):
        module.channels_last = False
        for conv in module.modules():  # NHWC kernels would pull NCHW inputs onto the NHWC path
            if isinstance(conv, nn.Conv2d) and not conv.weight.is_contiguous():
                conv.weight = nn.Parameter(conv.weight.contiguous(), requires_grad=False)
    if hasattr(module, "step_cache"):
        module.step_cache = None
    for transformer in _top_attention_level(module):
        transformer.token_merging = 0.0
    for child in module.modules():
        child.__dict__.pop("forward", None)  # the class's own forward again
        child.__dict__.pop("_packed", None)
        child.__dict__.pop("_phases", None)
        child.__dict__.pop("_int8", None)
    upcast = bool(getattr(getattr(module, "cfg", None), "upcast_attention", False))
    for child in module.modules():
        if isinstance(child, Attention):
            child.upcast, child.blocked = upcast, False
        elif isinstance(child, SelfAttention2d):
            child.upcast, child.blocked = False, False
        elif isinstance(child, (GEGLU, nn.GroupNorm)):
            child.fused = False
    return module

