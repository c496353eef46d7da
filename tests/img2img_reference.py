"""Test-side helpers for img2img / inpainting / hires parity: a test image and mask, A1111's path driven by hand.

`kdiffusion_img2img` is what AUTOMATIC1111 runs: the init latent is the reference VAE's posterior
mean, the sampler runs k-diffusion's function over the tail `sigmas[steps - t_enc - 1:]` of the
schedule, from `init + noise * sigma`, with an optional mask blend of the denoised latents.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from kdiffusion_loader import load_kdiffusion
from sdgen.diffusion.noise import ImageNoise

PROMPT, NEGATIVE, SEED, SIZE, CFG = "a tranquil lake with the mountains", "blurry", 1234, 64, 7.5
MAX_PIXEL, MEAN_PIXEL = 3 / 255, 0.6 / 255


def sample_image(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A deterministic picture with gradients and shapes (not flat, so the VAE has something to keep)."""
    y, x = np.mgrid[0:size, 0:size] / size
    array = np.stack([x, y, 1 - (x + y) / 2], -1) * 200 + 20
    image = Image.fromarray(array.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 16, 2)
        draw.ellipse((int(x0), int(y0), int(x0) + 14, int(y0) + 14), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def sample_mask(size: int = SIZE, box: tuple[int, int, int, int] = (16, 8, 48, 40)) -> Image.Image:
    """White rectangle (repaint) on black."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64) / 255


def assert_close(ours: np.ndarray, theirs: np.ndarray, max_pixel: float = MAX_PIXEL, mean_pixel: float = MEAN_PIXEL):
    difference = np.abs(ours - theirs)
    assert difference.max() <= max_pixel, f"max pixel difference {difference.max() * 255:.2f}/255"
    assert difference.mean() <= mean_pixel, f"mean pixel difference {difference.mean() * 255:.3f}/255"
    assert ours.std() > 0.02  # not a flat image: the comparison means something
    return difference.max() * 255, difference.mean() * 255


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def reference_encode(reference, image: Image.Image) -> torch.Tensor:
    vae = reference.vae
    with torch.no_grad():
        return vae.encode(pixels(image)).latent_dist.mode() * vae.config.scaling_factor


def reference_decode(reference, latents: torch.Tensor) -> np.ndarray:
    vae = reference.vae
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).double().numpy()


def guided_reference_denoiser(reference, image_cond: torch.Tensor | None = None, cfg: float = CFG):
    """A1111's CFGDenoiser around the reference U-Net (k-diffusion CompVis wrappers), conditional rows first."""
    k = load_kdiffusion()
    unet, tokenizer, text_encoder = reference.unet, reference.tokenizer, reference.text_encoder

    def encode(text):
        ids = tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return text_encoder(ids).last_hidden_state

    cond, uncond = encode(PROMPT), encode(NEGATIVE)

    class UNetAsCompVis(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alphas_cumprod = reference.scheduler.alphas_cumprod

        def apply_model(self, x, t, cond):
            if image_cond is not None:
                x = torch.cat([x, image_cond.expand(x.shape[0], -1, -1, -1)], dim=1)
            return unet(x, t, encoder_hidden_states=cond).sample

    v = reference.scheduler.config.prediction_type == "v_prediction"
    wrapper = (k.external.CompVisVDenoiser if v else k.external.CompVisDenoiser)(UNetAsCompVis(), quantize=False)

    def guided(x, sigma):
        with torch.no_grad():
            both = wrapper(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        c, u = both.chunk(2)
        return u + (c - u) * cfg

    return k, wrapper, guided


def kdiffusion_img2img(reference, init: torch.Tensor, sampler_name: str, steps: int, strength: float, *,
                       karras: bool = False, keep: torch.Tensor | None = None, image_cond=None,
                       seed: int = SEED, brownian: bool = False) -> torch.Tensor:
    """A1111's sample_img2img by hand: returns the final latents (mask blend included)."""
    k, wrapper, guided = guided_reference_denoiser(reference, image_cond)
    if karras:
        sigmas = k.sampling.get_sigmas_karras(steps, float(wrapper.sigma_min), float(wrapper.sigma_max))
    else:
        sigmas = wrapper.get_sigmas(steps)
    t_enc = int(min(strength, 0.999) * steps)
    tail = sigmas[steps - t_enc - 1:]
    noise = ImageNoise([seed], tuple(init.shape[1:]))
    x = init + noise.initial() * tail[0]
    denoiser = guided
    if keep is not None:
        denoiser = lambda x, sigma: init * keep + (1 - keep) * guided(x, sigma)  # noqa: E731
    extra = {}
    if "ancestral" in sampler_name:
        extra["noise_sampler"] = noise.noise_sampler
    if brownian:
        positive = sigmas[sigmas > 0]
        extra["noise_sampler"] = k.sampling.BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=[seed])
    with torch.no_grad():
        latents = getattr(k.sampling, sampler_name)(denoiser, x, tail, disable=True, **extra)
    if keep is not None:
        latents = init * keep + latents * (1 - keep)
    return latents
