"""CPU fast paths for the U-Net and the VAE, off by default: the default path stays bit-exact with diffusers.

What each switch does, and why it is faster on a CPU (measured in bench/RESULTS.md):
- `channels_last`: activations in NHWC, oneDNN's native convolution layout. NCHW inputs are
  reordered to a blocked layout and back around every convolution; NHWC ones are not, and the
  spatial transformer's (b, c, h, w) -> (b, h*w, c) token permutes become free views.
- `fp32_attention`: attention in float32 for bf16 models. PyTorch's CPU flash-attention kernel
  is slower in bf16 than in fp32 for SD's head sizes (40, 80, 160), and float32 is also the more
  accurate choice. The projections around it stay in bf16.
Both change rounding only: results stay within the bf16 tolerance of the fp32 model
(tests/test_fast_paths.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sdgen.models.layers import Attention, SelfAttention2d


@dataclass(frozen=True)
class FastOptions:
    """Which fast paths to switch on; the defaults are the ones that pay off on CPUs."""

    channels_last: bool = True
    fp32_attention: bool = True


def accelerate(module: nn.Module, options: FastOptions = FastOptions()) -> nn.Module:
    """Switch the fast paths on for a U-Net or VAE (in place; weights are not copied) and return it."""
    if hasattr(module, "channels_last"):
        module.channels_last = options.channels_last
    for child in module.modules():
        if isinstance(child, (Attention, SelfAttention2d)):
            # `upcast` set by the config (SD 2.x) stays on whatever the options say
            child.upcast = child.upcast or options.fp32_attention
    return module


def accelerate_pipeline(pipe, options: FastOptions = FastOptions()):
    """`accelerate` the U-Net and the VAE of a StableDiffusion pipeline; the text encoder is too small to matter."""
    if pipe.device.type == "cpu":
        accelerate(pipe.unet, options)
        accelerate(pipe.vae, options)
    return pipe


def restore(module: nn.Module) -> nn.Module:
    """Back to the exact default path (the config's own attention upcast is kept)."""
    if hasattr(module, "channels_last"):
        module.channels_last = False
    upcast = bool(getattr(getattr(module, "cfg", None), "upcast_attention", False))
    for child in module.modules():
        if isinstance(child, Attention):
            child.upcast = upcast
        elif isinstance(child, SelfAttention2d):
            child.upcast = False
    return module

