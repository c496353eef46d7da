"""Text to image with a Stable Diffusion 1.x / 2.x model: the one generation path every front end calls."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm import tqdm

import sdgen
from sdgen.checkpoints.parts import CheckpointParts
from sdgen.diffusion.denoisers import cfg_denoiser, make_denoiser
from sdgen.diffusion.noise import ImageNoise
from sdgen.diffusion import registry
from sdgen.diffusion.registry import resolve_sampler, sample, sigmas_for
from sdgen.pipelines.images import to_pil
from sdgen.pipelines.infotext import format_infotext
from sdgen.pipelines.output import next_free_index, save_png_atomic
from sdgen.pipelines.request import GenerationRequest

# callback(image_index, step, total_steps, denoised_latents); raise Interrupted to stop.
StepCallback = Callable[[int, int, int, torch.Tensor], None]


@dataclass
class GenerationResult:
    """Images in request order with the seed and infotext of each."""

    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    latents: torch.Tensor | None = None
    paths: list[Path] = field(default_factory=list)

    def save(self, folder: Path) -> list[Path]:
        """Write `NNNNN-SEED.png` files (AUTOMATIC1111's naming) atomically, each with its infotext."""
        folder = Path(folder)
        start = next_free_index(folder)
        self.paths = [
            save_png_atomic(image, folder / f"{start + i:05d}-{seed}.png", infotext)
            for i, (image, seed, infotext) in enumerate(zip(self.images, self.seeds, self.infotexts))
        ]
        return self.paths


class StableDiffusion:
    """U-Net, VAE, text encoder, tokenizer and noise schedule of one SD 1.x / 2.x model."""

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule, *, family: str, name: str,
                 hash_fn: Callable[[], str], device: torch.device, dtype: torch.dtype, vae_name: str | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule, self.family, self.name = schedule, family, name
        self.device, self.dtype = device, dtype
        self.vae_name = vae_name
        self._hash_fn, self._hash = hash_fn, None

    @classmethod
    def from_parts(cls, parts: CheckpointParts, *, device: torch.device, dtype: torch.dtype,
                   vae_source: str | Path | None = None) -> "StableDiffusion":
        from sdgen.pipelines.loading import build_components

        unet, vae, text_encoder, tokenizer, schedule = build_components(parts, device, dtype)
        name = parts.source.stem if parts.source.is_file() else parts.source.name
        return cls(unet, vae, text_encoder, tokenizer, schedule, family=parts.family, name=name,
                   hash_fn=parts.sha256, device=device, dtype=dtype,
                   vae_name=Path(vae_source).stem if vae_source else None)

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's "Model hash": first 10 hex digits of the checkpoint's sha256 (computed once)."""
        if self._hash is None:
            self._hash = self._hash_fn()[:10]
        return self._hash

    @property
    def latent_factor(self) -> int:
        return self.vae.cfg.downsample_factor

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (the U-Net's sample size times the VAE factor)."""
        return self.unet.cfg.sample_size * self.latent_factor

    def encode_prompt(self, prompt: str, clip_skip: int = 1) -> torch.Tensor:
        """Text-encoder hidden states (1, 77, dim) used as the U-Net's cross-attention context."""
        ids = self.tokenizer([prompt]).to(self.device)
        with torch.inference_mode():
            return self.text_encoder(ids, clip_skip=clip_skip).hidden_states

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (in the U-Net's scale) to pixels in [-1, 1]."""
        cfg = self.vae.cfg
        latents = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.inference_mode():
            return self.vae.decode(latents.to(vae_dtype)).float()

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.unet(x.to(self.dtype), t, context).float()

    def generate(self, request: GenerationRequest | None = None, *, progress: bool = False,
                 callback: StepCallback | None = None, output_type: str = "pil", **fields) -> GenerationResult:
        """Run txt2img for `request` (or keyword fields of GenerationRequest); image i uses seed + i."""
        request = replace(request or GenerationRequest(), **fields) if fields else (request or GenerationRequest())
        request = replace(request, width=request.width or self.native_size, height=request.height or self.native_size)
        request.validate()
        request = request.with_seed()
        spec, schedule_name = resolve_sampler(request.sampler, request.scheduler)
        sigmas = sigmas_for(spec, schedule_name, self.schedule, request.steps, model_family=self.family)
        cond = self.encode_prompt(request.prompt, request.clip_skip)
        uncond = self.encode_prompt(request.negative_prompt, request.clip_skip) if request.cfg_scale != 1.0 else None
        denoiser = make_denoiser(self._model_fn, self.schedule, lcm=spec.lcm)
        shape = (self.unet.cfg.in_channels, request.height // self.latent_factor, request.width // self.latent_factor)
        seeds = [request.seed + i for i in range(request.n)]
        show = progress and sys.stderr.isatty()

        all_latents, images = [], []
        for start in range(0, request.n, request.batch_size):
            batch_seeds = seeds[start:start + request.batch_size]
            count = len(batch_seeds)
            guided = cfg_denoiser(
                denoiser, {"context": cond.expand(count, -1, -1)},
                None if uncond is None else {"context": uncond.expand(count, -1, -1)}, request.cfg_scale)
            noise = ImageNoise(batch_seeds, shape, device=self.device)
            bar = tqdm(total=len(sigmas) - 1, desc=f"image {start + 1}/{request.n}", disable=not show, leave=False)

            def on_step(i: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
                bar.update(1)
                if callback is not None:
                    callback(start, i, total, denoised)

            latents = sample(spec, guided, sigmas, noise, callback=on_step)
            bar.close()
            all_latents.append(latents)
            if output_type == "pil":
                images += to_pil(self.decode(latents))
        infotexts = [self.infotext(request, seed, spec.name, schedule_name) for seed in seeds]
        return GenerationResult(images, seeds, infotexts, request, latents=torch.cat(all_latents))

    def infotext(self, request: GenerationRequest, seed: int, sampler: str, schedule_name: str) -> str:
        """AUTOMATIC1111's parameters text for one image of `request`."""
        schedule_label = registry.schedule_label(resolve_sampler(sampler)[0], schedule_name)
        return format_infotext(request.prompt, request.negative_prompt, {
            "Steps": request.steps,
            "Sampler": sampler,
            "Schedule type": schedule_label,
            "CFG scale": request.cfg_scale,
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",
            "Model hash": self.model_hash,
            "Model": self.name,
            "VAE": self.vae_name,
            "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
            "RNG": "CPU",
            "Version": f"sdgen {sdgen.__version__}",
        })
