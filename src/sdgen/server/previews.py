"""Live previews: a fixed linear map from the 4 latent channels to RGB, as A1111's "Approx cheap"; or,
when `sdgen serve --preview-decoder` names one, a tiny decoder (models/tiny_decoder.py, A1111's "TAESD").

Instead of a table of coefficients per model family, the map is fitted once per loaded model
by least squares: a few smooth synthetic colour fields are encoded with the model's own VAE
and each latent pixel is regressed onto the mean colour of the image patch it covers
(rgb = latent @ W + b, W of shape 4x3). Applying it costs a few multiply-adds per latent pixel.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FIT_IMAGES = 8
FIT_SIZE = 64


def _colour_fields(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1]: 3x3 random colour grids upsampled bilinearly, plus flat colours."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.rand(count, 3, 3, 3, generator=generator) * 2 - 1
    fields = F.interpolate(grids, size=(size, size), mode="bilinear", align_corners=True)
    flat = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
    return torch.cat([fields, flat.expand(-1, -1, size, size)])


def fit_preview_map(vae: torch.nn.Module, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """(channels + 1, 3) least-squares map from U-Net-scale latents (plus a bias) to RGB in [-1, 1]."""
    parameter = next(vae.parameters())
    pixels = _colour_fields(FIT_IMAGES // 2, FIT_SIZE)
    with torch.inference_mode():
        latents = vae.encode(pixels.to(parameter.device, parameter.dtype)).mode().float().cpu()
    latents = (latents - shift_factor) * scaling_factor
    factor = FIT_SIZE // latents.shape[-1]
    targets = F.avg_pool2d(pixels, factor)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    return torch.linalg.lstsq(x, y).solution


def preview_image(latents: torch.Tensor, weights: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """One latent (channels, h, w) to a small RGB image, scaled up to `size` (width, height) if given.

    Computed with single-threaded numpy, not torch: this runs in the server's request thread while
    the worker's torch threads keep both cores busy, and a torch op from a second thread starts a
    second team of OpenMP threads that fights the first (measured: +6 to +12% generation time under
    50 polls a second, against none for the same polls without a preview).
    """
    x = latents.detach().float().cpu().numpy()
    w = weights.detach().float().cpu().numpy()
    rgb = w[-1] + sum(x[channel, :, :, None] * w[channel] for channel in range(x.shape[0]))
    array = ((np.clip(rgb, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    image = Image.fromarray(array)
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


@torch.inference_mode()
def tiny_preview_pixels(decoder: torch.nn.Module, latents: torch.Tensor) -> np.ndarray:
    """One U-Net-scale latent (1, channels, h, w) through a tiny (TAESD) decoder: (H, W, 3) uint8."""
    parameter = next(decoder.parameters())
    image = decoder(latents.to(parameter.device, parameter.dtype))[0].float().clamp(-1, 1)
    return ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def png_bytes(image: Image.Image) -> bytes:
    with io.BytesIO() as buffer:
        image.save(buffer, format="PNG")
        return buffer.getvalue()
