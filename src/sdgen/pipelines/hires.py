"""Hires fix (AUTOMATIC1111's two-pass txt2img): generate at the base size, upscale, then img2img at the target size.

The upscale is either in latent space (A1111's "Latent ..." modes: torch interpolation of the
first pass's latents) or in pixels (decode, resize with Lanczos or nearest, encode). The second
pass reuses each image's seed for fresh noise at the new size (A1111 makes a new ImageRNG with
the same seeds), and the denoising strength picks the tail of the schedule as for img2img.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from sdgen.diffusion.registry import resolve_sampler
from sdgen.pipelines.conditioning import total_steps
from sdgen.pipelines.images import to_pil
from sdgen.pipelines.request import GenerationRequest

# A1111's shared.latent_upscale_modes: name -> (torch interpolation mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_RESAMPLERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                    "Nearest": Image.Resampling.NEAREST}


def upscale_latents(pipe, latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """First-pass latents -> latents of a width x height image, by `upscaler` (see HIRES_UPSCALERS)."""
    factor = pipe.latent_factor
    if upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[upscaler]
        return F.interpolate(latents, size=(height // factor, width // factor), mode=mode, antialias=antialias)
    from sdgen.pipelines.img2img import pixels_from_pil

    images = [image.resize((width, height), resample=PIXEL_RESAMPLERS[upscaler]) for image in to_pil(pipe.decode(latents))]
    return pipe.encode(pixels_from_pil(images).to(pipe.device))


def hires_pass(pipe, request: GenerationRequest, latents: torch.Tensor, *, progress: bool = False,
               callback=None) -> torch.Tensor:
    """The second pass: upscale `latents` to request.hires_size and denoise them with hires_strength."""
    from sdgen.pipelines.stable_diffusion import SamplingJob

    width, height = request.hires_size
    upscaled = upscale_latents(pipe, latents, width, height, request.hires_upscaler)
    spec, _ = resolve_sampler(request.sampler, request.scheduler)
    job = SamplingJob(tuple(upscaled.shape[1:]), request.hires_steps or request.steps,
                      strength=request.hires_strength, init_latents=upscaled,
                      image_cond=pipe.txt2img_conditioning(width, height),
                      first_pass_steps=total_steps(spec, request.steps))
    return pipe.sample_latents(request, job, progress=progress, callback=callback)


def hires_parameters(request: GenerationRequest) -> dict:
    """The infotext keys A1111 writes for the hires fix (its "Denoising strength" is written separately)."""
    return {
        "Hires upscale": request.hires_scale,
        "Hires steps": request.hires_steps or None,
        "Hires upscaler": request.hires_upscaler,
    }
