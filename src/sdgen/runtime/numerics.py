"""Non-finite outputs: a VAE decode that gives NaN is redone once in float32, then refused with a reason.

NaN pixels become a black image when converted to 8 bits, so a NaN that got through would be
saved as a black "success". fp16 / bf16 VAEs overflow on some latents (SD's and SDXL's VAEs
in fp16 are the known case): as AUTOMATIC1111's "revert VAE to 32-bit floats", the VAE is cast
to float32 for good and the decode repeated. NaN latents (the U-Net overflowed) cannot be
saved by the VAE and get their own message.
"""

from __future__ import annotations

import sys

import torch

from sdgen.errors import UserError


class NonFiniteOutputError(UserError):
    """The model produced NaN or infinite values; the message says which part and what to try."""


def vae_dtype(vae: torch.nn.Module) -> torch.dtype:
    return next(vae.parameters()).dtype


def redecode_in_float32(pipeline, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """Called when `pipeline.decode(latents)` gave non-finite pixels: retry once with a float32 VAE, else raise."""
    if not torch.isfinite(latents).all():
        raise NonFiniteOutputError(
            "the sampler produced NaN or infinite latents (the U-Net overflowed), so no image was made; "
            "try --dtype fp32, a lower CFG scale or another sampler")
    if vae_dtype(pipeline.vae) == torch.float32:
        raise NonFiniteOutputError(
            "the VAE produced NaN or infinite pixels even in float32, so no image was saved; "
            "the VAE weights may be damaged: try another VAE with --vae")
    print(f"sdgen: the VAE gave NaN in {str(vae_dtype(pipeline.vae)).removeprefix('torch.')}; decoding again in "
          "float32 (the VAE stays in float32 from now on)", file=sys.stderr)
    pipeline.vae.float()
    return pipeline.decode(latents, tiled)
