"""The Stable Diffusion x4 upscaler (diffusers' StableDiffusionUpscalePipeline), loaded from its diffusers folder.

The low-resolution image, noised to `noise_level` with the low-res DDPM schedule, is concatenated
to the latents (which have the low-resolution image's size) at every step; the noise level is
also the U-Net's class label; the VAE (factor 4, latent scale 0.08333) decodes 4x larger. The
sampling runs through StableDiffusion's one sampling core, so every sampler and schedule works.

Large inputs run the U-Net on overlapping tiles of `tile` latents (= low-resolution pixels),
whose outputs are blended with linear ramps at every step (MultiDiffusion, Bar-Tal et al. 2023),
and the VAE decodes in tiles (tiling.py). Noise: image i's latent noise is the first draw of a
generator seeded with its seed, as for txt2img; the noise added to the low-resolution image is
the first draw of a generator seeded with seed + 2**32 (never another image's seed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from sdgen.checkpoints.diffusers_folder import (
    COMPONENT_CLASSES, allowed_roots, load_component_weights, normalize_vae_names, read_json,
)
from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.ldm_keys import normalize_clip_names
from sdgen.checkpoints.parts import CheckpointParts
from sdgen.diffusion.schedules import DiscreteSchedule
from sdgen.errors import UserError
from sdgen.models.clip_config import CLIPTextConfig
from sdgen.models.clip import CLIPTextModel
from sdgen.models.upscaler import UpscalerUNet, UpscalerUNetConfig
from sdgen.models.vae import AutoencoderKL, VAEConfig
from sdgen.pipelines.img2img import pixels_from_pil
from sdgen.pipelines.loading import build_module, load_tokenizer
from sdgen.pipelines.request import GenerationRequest, Limits, RequestError, check_int_range
from sdgen.pipelines.stable_diffusion import GenerationResult, SamplingJob, StableDiffusion, StepCallback
from sdgen.pipelines.tiling import tiled_apply
from sdgen.runtime.device import pick_device, pick_dtype

PIPELINE = "StableDiffusionUpscalePipeline"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler")
MAX_OUTPUT_SIDE = 8192
AUGMENTATION_SEED_OFFSET = 2**32


@dataclass(frozen=True)
class UpscaleRequest(GenerationRequest):
    """An x4 upscale: the image, the noise level added to it, and the U-Net tile size for large inputs."""

    image: Image.Image | None = None
    noise_level: int = 20  # diffusers' default; more noise lets the model invent more detail
    tile: int = 128  # U-Net tile in low-resolution pixels; larger inputs are tiled
    tile_overlap: int = 32
    steps: int = 20
    sampler: str = "DPM++ 2M"
    cfg_scale: float = 9.0  # diffusers' default for this model

    def validate(self, limits: Limits = Limits()) -> None:
        """GenerationRequest's checks (the size comes from the image) plus the image, noise level and tiles."""
        if not isinstance(self.image, Image.Image):
            raise RequestError(f"image must be an image (PNG, JPEG or WEBP), got {type(self.image).__name__}")
        width, height = self.image.size
        if max(width, height) * 4 > MAX_OUTPUT_SIDE or width * height * 16 > 4 * limits.max_pixels:
            raise RequestError(f"image is {width}x{height}; its x4 upscale would be {4 * width}x{4 * height}, over "
                               f"the limit of {MAX_OUTPUT_SIDE} px a side and {4 * limits.max_pixels} pixels")
        super().validate(limits)
        check_int_range("noise_level", self.noise_level, 0, 999)
        check_int_range("tile", self.tile, 16, 1024)
        check_int_range("tile_overlap", self.tile_overlap, 0, self.tile // 2)


class StableDiffusionUpscaler(StableDiffusion):
    """The x4 upscaler's U-Net, VAE and text encoder with its two noise schedules."""

    watermark = True

    def __init__(self, *args, low_res_alphas_cumprod: torch.Tensor, max_noise_level: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.low_res_alphas_cumprod = low_res_alphas_cumprod
        self.max_noise_level = max_noise_level
        self.tile, self.tile_overlap = 128, 32

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", dtype: str = "fp32") -> "StableDiffusionUpscaler":
        """Read a diffusers `StableDiffusionUpscalePipeline` folder (such as stabilityai/stable-diffusion-x4-upscaler)."""
        folder = Path(path)
        if not (folder / "model_index.json").is_file():
            raise UserError(f"{folder}: not a diffusers folder (no model_index.json); pass the x4 upscaler's folder")
        index = read_json(folder / "model_index.json")
        if index.get("_class_name") != PIPELINE:
            raise CheckpointError(folder / "model_index.json", f"pipeline class {str(index.get('_class_name'))[:80]!r} "
                                  f"is not {PIPELINE}", "pass the x4 upscaler's folder")
        for name in COMPONENTS:
            value = index.get(name)
            if not isinstance(value, list) or tuple(value) not in COMPONENT_CLASSES:
                raise CheckpointError(folder / "model_index.json", f"component {name!r} is missing or unknown",
                                      "use a complete x4 upscaler folder")
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        roots = allowed_roots(folder)
        weights = {}
        for name, library in (("unet", "diffusers"), ("vae", "diffusers"), ("text_encoder", "transformers")):
            weights[name] = load_component_weights(folder / name, library, roots)
        try:
            unet_cfg = UpscalerUNetConfig.from_diffusers(read_json(folder / "unet" / "config.json"))
            vae_cfg = VAEConfig.from_diffusers(read_json(folder / "vae" / "config.json"))
            text_config = read_json(folder / "text_encoder" / "config.json")
            text_cfg = CLIPTextConfig.from_transformers(text_config)
            schedule = DiscreteSchedule.from_diffusers_scheduler_config(
                read_json(folder / "scheduler" / "scheduler_config.json"))
            low_res = DiscreteSchedule.from_diffusers_scheduler_config(
                read_json(folder / "low_res_scheduler" / "scheduler_config.json"))
        except ValueError as error:
            raise CheckpointError(folder, str(error), "use an x4 upscaler folder") from None
        unet = build_module(folder, "U-Net", lambda: UpscalerUNet(unet_cfg), weights["unet"][0], torch_device, torch_dtype)
        vae = build_module(folder, "VAE", lambda: AutoencoderKL(vae_cfg), normalize_vae_names(weights["vae"][0]),
                           torch_device, torch.float32 if vae_cfg.force_upcast else torch_dtype)
        text_encoder = build_module(folder, "text encoder", lambda: CLIPTextModel(text_cfg),
                                    normalize_clip_names(weights["text_encoder"][0]), torch_device, torch_dtype)
        family = "sd2" if text_config.get("hidden_act") == "gelu" else "sd1"
        files = tuple(f for _, paths in weights.values() for f in paths)
        parts = CheckpointParts(family, "upscale", "v" if schedule.prediction_type == "v_prediction" else "eps",
                                {}, {}, {}, {}, [], [folder / "tokenizer"], {}, folder, weight_files=files)
        return cls(unet, vae, text_encoder, load_tokenizer(folder / "tokenizer", family), schedule, family=family,
                   name=folder.name, hash_fn=parts.sha256, device=torch_device, dtype=torch_dtype,
                   low_res_alphas_cumprod=low_res.alphas_cumprod, max_noise_level=int(index.get("max_noise_level", 350)))

    def prompt_conditioning(self, request: GenerationRequest, width: int, height: int):
        """The text conditioning plus the noise level as class label, for both CFG halves."""
        cond, uncond = super().prompt_conditioning(request, width, height)
        level = {"class_labels": torch.tensor([request.noise_level], device=self.device)}
        return {**cond, **level}, None if uncond is None else {**uncond, **level}

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, image_cond: torch.Tensor,
                  class_labels: torch.Tensor) -> torch.Tensor:
        """The U-Net on [latents, low-res image], over overlapping tiles when the image is larger than a tile."""
        def run(tile: torch.Tensor, box) -> torch.Tensor:
            top, left, height, width = box
            image = image_cond[..., top:top + height, left:left + width]
            with torch.inference_mode():
                return self.unet(torch.cat([tile, image.to(tile.dtype)], 1).to(self.dtype), t, context,
                                 {"class_labels": class_labels}).float()

        return tiled_apply(run, x, self.tile, self.tile_overlap)

    def noised_low_res(self, image: Image.Image, seeds: list[int], noise_level: int) -> torch.Tensor:
        """(n, 3, h, w): the image in [-1, 1] noised to `noise_level` with the low-res DDPM schedule, per seed."""
        pixels = pixels_from_pil([image.convert("RGB")]).to(self.device)
        alpha = self.low_res_alphas_cumprod[noise_level].to(pixels)
        rows = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed + AUGMENTATION_SEED_OFFSET)
            noise = torch.randn(pixels.shape[1:], generator=generator)[None].to(pixels)
            rows.append(alpha.sqrt() * pixels + (1 - alpha).sqrt() * noise)
        return torch.cat(rows)

    def upscale(self, request: UpscaleRequest | None = None, *, progress: bool = False,
                callback: StepCallback | None = None, output_type: str = "pil", **fields) -> GenerationResult:
        """Upscale `request.image` 4x guided by the prompt; image i of `n` uses seed + i."""
        request = replace(request or UpscaleRequest(), **fields)
        request.validate()
        highest = min(self.max_noise_level, self.unet.upscaler_cfg.num_class_embeds - 1)
        if request.noise_level > highest:
            raise RequestError(f"noise_level must be at most {highest} for this model, got {request.noise_level}")
        request = request.with_seed()
        width, height = request.image.size
        self.tile, self.tile_overlap = request.tile, request.tile_overlap
        seeds, _ = request.image_seeds()
        job = SamplingJob((self.vae.cfg.latent_channels, height, width), request.steps,
                          image_cond=self.noised_low_res(request.image, seeds, request.noise_level))
        latents = self.sample_latents(request, job, progress=progress, callback=callback)
        output = replace(request, width=width * self.latent_factor, height=height * self.latent_factor)
        return self.result(output, latents, output_type, {"Noise level": request.noise_level,
                                                          "Upscaler": "SD x4"})

    def txt2img_conditioning(self, width: int, height: int) -> None:
        return None
