"""Stable Diffusion XL base and refiner (Podell et al. 2023) on the shared sampling core, and the
"ensemble of experts": the base samples the high-noise part of one sigma schedule, the refiner
the rest.

`StableDiffusionXL` is the core `StableDiffusion` with SDXL's conditioning (sdxl_conditioning.py):
txt2img, img2img, inpainting and the hires fix all run unchanged, so the refiner alone is an
ordinary img2img pass. `generate(..., refiner=..., refiner_switch_at=0.8)` splits the schedule at
the first step whose model timestep falls below (1 - switch_at) * 1000, AUTOMATIC1111 1.9+'s and
diffusers' (`denoising_end` / `denoising_start`) definition. As in diffusers' handoff the refiner
continues from the base's latents with the same sampler and a fresh history (a multistep
sampler's first refiner step is first order; A1111 keeps the history across the swap); the
image's noise generators and Brownian trees carry on across the switch, and the base's VAE
decodes the result.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from sdgen.checkpoints.parts import CheckpointParts
from sdgen.diffusion.denoisers import cfg_denoiser, make_denoiser
from sdgen.diffusion.noise import ImageNoise
from sdgen.diffusion.registry import resolve_sampler, sample, sigmas_for
from sdgen.diffusion.samplers import Interrupted
from sdgen.diffusion.schedules import DiscreteSchedule
from sdgen.diffusion.timestep_samplers import vp_scale
from sdgen.pipelines.request import GenerationRequest, Img2ImgRequest, RequestError
from sdgen.pipelines.sdxl_conditioning import (
    BASE_IDS, OPTION_NAMES, REFINER_IDS, SDXLOptions, SDXLTextEncoder, time_ids,
)
from sdgen.pipelines.conditioning import expand_rows
from sdgen.pipelines.stable_diffusion import GenerationResult, StableDiffusion, StepCallback
from sdgen.provenance import preflight

DEFAULT_SWITCH_AT = 0.8  # A1111's default "Switch at"
REFINER_FIELDS = ("refiner_checkpoint", "refiner_switch_at")


def switch_index(sigmas: torch.Tensor, schedule: DiscreteSchedule, switch_at: float) -> int:
    """Index of the first sigma whose model timestep is below (1 - switch_at) * T: where the refiner starts.

    The timestep of a sigma is the nearest entry of the model's table (A1111's `apply_refiner`);
    len(sigmas) - 1 means the refiner never runs.
    """
    if isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)) or not 0.0 < switch_at < 1.0:
        raise RequestError(f"refiner_switch_at must be between 0 and 1 (exclusive), got {switch_at!r}")
    table = schedule.sigmas.to(sigmas.device)
    threshold = round((1.0 - switch_at) * len(table), 6)  # rounded: (1 - 0.3) * 1000 is 700.0000000000001
    for i, sigma in enumerate(sigmas[:-1]):
        if int(torch.argmin((table - sigma).abs())) < threshold:
            return i
    return len(sigmas) - 1


class _ContinuedNoise:
    """An image's noise after a handoff: no new initial draw, later draws from the same generators and trees."""

    def __init__(self, noise: ImageNoise) -> None:
        self.noise = noise

    def initial(self) -> torch.Tensor:
        return torch.zeros_like(self.noise.initial())

    def noise_sampler(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return self.noise.noise_sampler(sigma, sigma_next)

    def brownian(self, sigmas: torch.Tensor):
        return self.noise.brownian(sigmas)


def sample_ensemble(base: StableDiffusion, refiner: StableDiffusion, request: GenerationRequest,
                    shape: tuple[int, int, int], switch_at: float, *, progress: bool = False,
                    callback: StepCallback | None = None) -> torch.Tensor:
    """Ensemble of experts (Balaji et al. 2022, SDXL's base + refiner): one sigma schedule of
    `request.steps` steps, the base from noise down to the switch, the refiner from there to 0."""
    spec, schedule_name = resolve_sampler(request.sampler, request.scheduler)
    sigmas = sigmas_for(spec, schedule_name, base.schedule, request.steps, model_family=base.family)
    k = switch_index(sigmas, base.schedule, switch_at)
    height, width = shape[1] * base.latent_factor, shape[2] * base.latent_factor
    stages = []
    for pipe, part in ((base, sigmas[:k + 1]), (refiner, sigmas[k:])):
        if len(part) > 1:
            cond, uncond = pipe.prompt_conditioning(request, width, height)
            denoiser = make_denoiser(pipe._model_fn, pipe.schedule, lcm=spec.lcm)
            stages.append((part, denoiser, cond, uncond, pipe.txt2img_conditioning(width, height)))
    seeds, subseeds = request.image_seeds()
    total, show = len(sigmas) - 1, progress and sys.stderr.isatty()
    batches = []
    for start in range(0, request.n, request.batch_size):
        count = min(request.batch_size, request.n - start)
        noise = ImageNoise(seeds[start:start + count], shape, subseeds=subseeds[start:start + count],
                           subseed_strength=request.subseed_strength, device=base.device)
        bar = tqdm(total=total, desc=f"image {start + 1}/{request.n}", disable=not show, leave=False)
        x, done, stopped = None, 0, []
        for part, denoiser, cond, uncond, image_cond in stages:
            extra = {} if image_cond is None else {"image_cond": image_cond.expand(count, -1, -1, -1)}
            guided = cfg_denoiser(denoiser, {**expand_rows(cond, count), **extra},
                                  None if uncond is None else {**expand_rows(uncond, count), **extra},
                                  request.cfg_scale)

            def on_step(i: int, steps: int, x_i: torch.Tensor, denoised: torch.Tensor, offset: int = done,
                        start: int = start) -> None:
                bar.update(1)
                if callback is not None:
                    try:
                        callback(start, offset + i, total, denoised)
                    except Interrupted:
                        stopped.append(True)
                        raise

            x = sample(spec, guided, part, noise if x is None else _ContinuedNoise(noise), init_latent=x,
                       full_sigmas=sigmas, callback=on_step)
            if stopped:
                break
            if spec.vp_space and part[-1] > 0:
                x = x * vp_scale(part[-1])  # `sample` hands back DDIM / UniPC latents in VP form
            done += len(part) - 1
        bar.close()
        batches.append(x)
    return torch.cat(batches)


class StableDiffusionXL(StableDiffusion):
    """SDXL base (CLIP ViT-L + OpenCLIP ViT-bigG, 6 size ids) or refiner (bigG, 5 ids with the aesthetic score).

    `options` holds the micro-conditioning (A1111 keeps it in its settings); generate / img2img
    take per-call overrides as keyword fields (original_size, crop, target_size, aesthetic_score,
    negative_aesthetic_score, zero_negative).
    """

    def __init__(self, unet, vae, text: SDXLTextEncoder, schedule: DiscreteSchedule, **kw) -> None:
        super().__init__(unet, vae, text.encoders[0], text.tokenizers[0], schedule, **kw)
        self.text, self.options = text, SDXLOptions()
        self._refiners: dict[str, StableDiffusion] = {}
        cfg = unet.cfg
        if cfg.addition_embed_type != "text_time":
            raise ValueError("an SDXL U-Net has addition_embed_type 'text_time' (pooled text and size ids)")
        if cfg.cross_attention_dim != text.width:
            raise ValueError(f"the U-Net attends to {cfg.cross_attention_dim}-wide text, the encoders give {text.width}")
        ids, rest = divmod(cfg.projection_class_embeddings_input_dim - text.pooled_width, cfg.addition_time_embed_dim)
        if rest or ids not in (BASE_IDS, REFINER_IDS):
            raise ValueError(f"the U-Net's added conditioning ({cfg.projection_class_embeddings_input_dim} wide) does "
                             f"not fit a {text.pooled_width}-wide pooled text plus {BASE_IDS} or {REFINER_IDS} size ids")
        self.time_id_count = ids

    @classmethod
    def from_parts(cls, parts: CheckpointParts, *, device: torch.device, dtype: torch.dtype,
                   vae_source: str | Path | None = None) -> "StableDiffusionXL":
        from sdgen.pipelines.loading import build_sdxl_components

        unet, vae, text, schedule = build_sdxl_components(parts, device, dtype)
        name = parts.source.stem if parts.source.is_file() else parts.source.name
        return cls(unet, vae, text, schedule, family=parts.family, name=name, hash_fn=parts.sha256, device=device,
                   dtype=dtype, vae_name=Path(vae_source).stem if vae_source else None)

    @property
    def is_refiner(self) -> bool:
        """Conditioned on an aesthetic score instead of a target size (SDXL's refiner)."""
        return self.time_id_count == REFINER_IDS

    def encode_prompt(self, prompt: str, clip_skip: int = 1) -> torch.Tensor:
        """The U-Net's context (1, 77, width); SDXL always uses the penultimate layers (A1111 ignores clip skip)."""
        return self.text.encode(prompt, self.embeddings)[0]

    def prompt_conditioning(self, request: GenerationRequest, width: int, height: int
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """context, text_embeds and time_ids for the prompt and the negative prompt (None when cfg_scale is 1)."""
        negative = request.negative_prompt if request.cfg_scale != 1.0 else None
        cond, uncond = self.text.encode_pair(request.prompt, negative, self.options.zero_negative, self.embeddings)

        def keywords(encoded: tuple[torch.Tensor, torch.Tensor], is_negative: bool) -> dict[str, torch.Tensor]:
            ids = time_ids(self.options, width, height, self.time_id_count, negative=is_negative)
            return {"context": encoded[0], "text_embeds": encoded[1], "time_ids": ids.to(self.device)}

        return keywords(cond, False), None if uncond is None else keywords(uncond, True)

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, text_embeds: torch.Tensor,
                  time_ids: torch.Tensor, image_cond: torch.Tensor | None = None) -> torch.Tensor:
        if image_cond is not None:
            x = torch.cat([x, image_cond.to(x.dtype)], dim=1)
        with torch.inference_mode():
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(x.to(self.dtype), t, context, added).float()

    def encode(self, pixels: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Pixels to latents; NaN from a reduced-precision VAE (fp16 overflow) is redone in float32, as the
        core's decode does."""
        latents = super().encode(pixels, tiled)
        if not torch.isfinite(latents).all() and next(self.vae.parameters()).dtype != torch.float32:
            print("sdgen: the VAE gave NaN while encoding; encoding again in float32 (the VAE stays in float32 "
                  "from now on)", file=sys.stderr)
            self.vae.float()
            latents = super().encode(pixels, tiled)
        return latents

    # Requests ---------------------------------------------------------------------------------------

    @contextmanager
    def using(self, options: SDXLOptions) -> Iterator[None]:
        """Run with other micro-conditioning options, then restore the pipeline's own."""
        options.validate()
        saved, self.options = self.options, options
        try:
            yield
        finally:
            self.options = saved

    def _split_fields(self, request: GenerationRequest | None, fields: dict) -> tuple[dict, SDXLOptions, dict]:
        """Request fields, SDXL options, refiner fields: keyword fields first, then the request's own attributes."""
        sdxl = {name: fields.pop(name) for name in OPTION_NAMES if name in fields}
        refiner = {name: fields.pop(name) for name in REFINER_FIELDS if name in fields}
        for name in (*OPTION_NAMES, *REFINER_FIELDS):  # requests that carry these fields themselves
            value = getattr(request, name, None)
            if value is not None:
                (sdxl if name in OPTION_NAMES else refiner).setdefault(name, value)
        return fields, self.options.with_fields(**sdxl), refiner

    def generate(self, request: GenerationRequest | None = None, *, progress: bool = False,
                 callback: StepCallback | None = None, output_type: str = "pil",
                 refiner: "StableDiffusion | str | Path | None" = None, refiner_switch_at: float | None = None,
                 **fields) -> GenerationResult:
        """txt2img; with `refiner` (a loaded pipeline or a checkpoint path, or the field
        `refiner_checkpoint`) the refiner takes over at `refiner_switch_at` (default 0.8)."""
        fields, options, refiner_fields = self._split_fields(request, fields)
        refiner = refiner if refiner is not None else refiner_fields.get("refiner_checkpoint")
        switch_at = refiner_switch_at if refiner_switch_at is not None else refiner_fields.get(
            "refiner_switch_at", DEFAULT_SWITCH_AT)
        with self.using(options):
            if refiner is None:
                return super().generate(request, progress=progress, callback=callback, output_type=output_type,
                                        **fields)
            request = replace(request or GenerationRequest(), **fields)
            request = replace(request, width=request.width or self.native_size,
                              height=request.height or self.native_size)
            request.validate()
            if request.hires_scale is not None:
                raise RequestError("hires_scale: the hires fix does not combine with a refiner yet; "
                                   "run the refiner as img2img on the upscaled image instead")
            request = request.with_seed()
            expert = self.refiner_pipeline(refiner)
            preflight(self, request)
            factor = self.latent_factor
            shape = (self.vae.cfg.latent_channels, request.height // factor, request.width // factor)
            with expert.using(options) if isinstance(expert, StableDiffusionXL) else nullcontext():
                latents = sample_ensemble(self, expert, request, shape, switch_at, progress=progress,
                                          callback=callback)
            extra = {"Refiner": f"{expert.name} [{expert.model_hash}]", "Refiner switch at": switch_at}
            return self.result(request, latents, output_type, extra)

    def img2img(self, request: Img2ImgRequest | None = None, *, progress: bool = False,
                callback: StepCallback | None = None, output_type: str = "pil", **fields) -> GenerationResult:
        """img2img / inpainting with per-call SDXL options; the refiner's plain img2img pass is this."""
        fields, options, refiner_fields = self._split_fields(request, fields)
        if refiner_fields.get("refiner_checkpoint"):
            raise RequestError("refiner_checkpoint: img2img with a refiner switch is not supported; "
                               "run the refiner's own img2img on the result instead")
        with self.using(options):
            return super().img2img(request, progress=progress, callback=callback, output_type=output_type,
                                   **fields)

    def refiner_pipeline(self, refiner: "StableDiffusion | str | Path") -> StableDiffusion:
        """A loaded refiner, or the checkpoint at a path loaded on this pipeline's device and dtype (kept for reuse)."""
        if not isinstance(refiner, StableDiffusion):
            key = str(refiner)
            if key not in self._refiners:
                from sdgen.pipelines.loading import load_pipeline
                from sdgen.runtime.device import DTYPES

                dtype = next(name for name, value in DTYPES.items() if value == self.dtype)
                # one refiner kept at a time: a second one replaces it rather than doubling the memory
                self._refiners = {key: load_pipeline(refiner, device=self.device.type, dtype=dtype)}
            refiner = self._refiners[key]
        mine, theirs = self.vae.cfg, refiner.vae.cfg
        if (mine.latent_channels, mine.scaling_factor) != (theirs.latent_channels, theirs.scaling_factor):
            raise RequestError(f"the refiner {refiner.name} works in another latent space than {self.name} "
                               f"(VAE scaling factor {theirs.scaling_factor} vs {mine.scaling_factor}); "
                               "use a refiner of the same family")
        return refiner

    def infotext(self, request: GenerationRequest, seed: int, subseed: int | None = None,
                 extra: dict | None = None) -> str:
        """The core's infotext plus the SDXL settings that differ from the defaults."""
        return super().infotext(request, seed, subseed, {**self.options.parameters(), **(extra or {})})
