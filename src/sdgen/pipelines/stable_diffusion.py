"""Stable Diffusion 1.x / 2.x: txt2img, img2img, inpainting and hires fix over one sampling core.

`StableDiffusion.sample_latents` is the only sampling loop: txt2img starts it from noise,
img2img from a noised encoded image (the tail of the schedule that the strength selects),
inpainting adds a mask that keeps the known latents at every step (and, for models with a
9-channel U-Net, the mask and masked-image latents as extra input channels), and the hires fix
runs it twice. The image preparation for img2img lives in `img2img.py`, the second hires pass
in `hires.py`.
"""

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
from sdgen.diffusion import registry
from sdgen.diffusion.denoisers import make_denoiser, masked_denoiser
from sdgen.diffusion.noise import ImageNoise
from sdgen.diffusion.registry import img2img_sigmas, resolve_sampler, sample, sigmas_for
from sdgen.pipelines.conditioning import conditioning_schedule, expand_rows, scheduled_cfg_denoiser, total_steps
from sdgen.pipelines.images import to_pil
from sdgen.pipelines.infotext import format_infotext
from sdgen.pipelines.networks import lora_hashes, loras_applied
from sdgen.pipelines.request import GenerationRequest, Img2ImgRequest, RequestError
from sdgen.pipelines.tiling import tiled_vae_decode, tiled_vae_encode
from sdgen.prompting.encode import PromptEncoder
from sdgen.prompting.parse import extract_extra_networks
from sdgen.provenance import finish_images, preflight
from sdgen.runtime.fast import token_merging_ratio, uses_int8

# callback(image_index, step, total_steps, denoised_latents); raise Interrupted to stop.
StepCallback = Callable[[int, int, int, torch.Tensor], None]

# Above these sizes the VAE works on overlapping tiles (see tiling.py): a 2048x2048 decode then fits in 8 GiB.
DECODE_TILE, DECODE_OVERLAP, DECODE_ABOVE = 96, 24, 128 * 128  # in latents
ENCODE_TILE, ENCODE_OVERLAP, ENCODE_ABOVE = 768, 192, 1024 * 1024  # in pixels


@dataclass
class GenerationResult:
    """Images in request order with the seed and infotext of each."""

    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    latents: torch.Tensor | None = None
    paths: list[Path] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    nsfw: list[bool] = field(default_factory=list)  # per image: flagged by the safety checker (blacked out)
    watermarked: list[bool] = field(default_factory=list)  # per image: carries the invisible watermark

    def save(self, folder: Path, pattern: str | None = None, image_format: str = "png",
             metadata: bool = True) -> list[Path]:
        """Write the images atomically with their infotext: `NNNNN-SEED.png` (A1111's naming) or `pattern`.

        `pattern` takes fields such as `{seed}-{prompt_words}` (see naming.py); `image_format` is
        png, jpeg or webp (the infotext goes to EXIF UserComment for the latter two);
        `metadata=False` writes no infotext at all.
        """
        from sdgen.pipelines.naming import save_images

        self.paths = save_images(self.images, self.infotexts, Path(folder), pattern=pattern,
                                 image_format=image_format, request=self.request, seeds=self.seeds,
                                 metadata=metadata)
        return self.paths


@dataclass
class SamplingJob:
    """What the sampling core runs for a request: size, steps and the optional img2img / inpainting inputs."""

    shape: tuple[int, int, int]  # latent (channels, height, width)
    steps: int
    strength: float | None = None  # None: txt2img from pure noise; else img2img denoising strength
    init_latents: torch.Tensor | None = None  # (1 or n, c, h, w): the encoded image(s)
    keep: torch.Tensor | None = None  # (1, 1, h, w): 1 where the init latents are kept (inpainting)
    image_cond: torch.Tensor | None = None  # (1 or n, 5, h, w): an inpainting U-Net's mask + masked-image latents
    sampler: str | None = None  # None: the request's
    scheduler: str | None = None
    first_pass_steps: int | None = None  # a hires pass: the first pass's total steps (prompt editing counts on)


def _rows(tensor: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """The rows of a per-image tensor for one batch; a single row serves every image."""
    if tensor is None:
        return None
    if tensor.shape[0] == 1:
        return tensor.expand(count, *tensor.shape[1:])
    return tensor[start:start + count]


class StableDiffusion:
    """U-Net, VAE, text encoder, tokenizer and noise schedule of one SD 1.x / 2.x model."""

    safety_checker = None  # a sdgen.safety.checker.SafetyFilter, set by sdgen.load when the folder has one
    watermark = True  # invisible watermark on images of 256 px or more (see sdgen.provenance)
    lora_dir: Path | None = None  # where `<lora:name>` finds name.safetensors (--lora-dir)
    embeddings = None  # a sdgen.prompting.EmbeddingLibrary of textual inversions the prompts may name

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

    @property
    def is_inpainting_model(self) -> bool:
        """A U-Net that takes the mask and the masked image's latents as 5 extra input channels (SD inpainting)."""
        return self.unet.cfg.in_channels == self.vae.cfg.latent_channels + 5

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """A1111's prompt encoding (emphasis, BREAK, long prompts, `embeddings`) for this text encoder."""
        if getattr(self, "_prompt_encoder", None) is None or self._prompt_encoder_embeddings is not self.embeddings:
            self._prompt_encoder = PromptEncoder(self.tokenizer, self.text_encoder, self.embeddings)
            self._prompt_encoder_embeddings = self.embeddings
        return self._prompt_encoder

    def encode_prompt(self, prompt: str, clip_skip: int = 1) -> torch.Tensor:
        """The U-Net's cross-attention context (1, 77 * chunks, dim); `<lora:...>` tags are not encoded."""
        return self.prompt_encoder.encode(extract_extra_networks(prompt)[0], clip_skip)

    def encode(self, pixels: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Pixels (b, 3, H, W) in [-1, 1] to latents in the U-Net's scale: the posterior mean, so no randomness.

        A1111 draws a posterior sample; for SD's VAE its spread is far below a pixel step.
        """
        cfg = self.vae.cfg
        vae_dtype = next(self.vae.parameters()).dtype

        if tiled is None:
            tiled = pixels.shape[-2] * pixels.shape[-1] > ENCODE_ABOVE
        rows = []
        with torch.inference_mode():
            for image in pixels.split(1):
                image = image.to(self.device, vae_dtype)
                if tiled:
                    rows.append(tiled_vae_encode(self.vae, image, ENCODE_TILE, ENCODE_OVERLAP).float())
                else:
                    rows.append(self.vae.encode(image).mean.float())
        return (torch.cat(rows) - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Latents (in the U-Net's scale) to pixels in [-1, 1], one image at a time, in tiles when large."""
        cfg = self.vae.cfg
        given = latents
        latents = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        vae_dtype = next(self.vae.parameters()).dtype

        if tiled is None:
            tiled = latents.shape[-2] * latents.shape[-1] > DECODE_ABOVE
        rows = []
        with torch.inference_mode():
            for image in latents.split(1):
                image = image.to(vae_dtype)
                if tiled:
                    rows.append(tiled_vae_decode(self.vae, image, DECODE_TILE, DECODE_OVERLAP).float())
                else:
                    rows.append(self.vae.decode(image).float())
        pixels = torch.cat(rows)
        if not torch.isfinite(pixels).all():  # never a black image saved as a success
            from sdgen.runtime.numerics import redecode_in_float32

            pixels = redecode_in_float32(self, given, tiled)
        return pixels

    def inpainting_conditioning(self, pixels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """An inpainting U-Net's extra input (b, 5, h, w): the mask at latent size, then the masked image's latents.

        `mask` is (1, 1, H, W) with 1 = repaint (None: repaint everything, as for txt2img). The
        masked image is the input with the repainted part set to 0 (mid grey), as in A1111 and diffusers.
        """
        if mask is None:
            mask = torch.ones(1, 1, *pixels.shape[-2:])
        mask = mask.to(pixels)
        latents = self.encode(pixels * (1 - mask))
        small = torch.nn.functional.interpolate(mask, size=latents.shape[-2:])  # nearest
        return torch.cat([small.expand(latents.shape[0], -1, -1, -1).to(latents), latents], dim=1)

    def prompt_conditioning(self, request: GenerationRequest, width: int, height: int
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The U-Net's keyword conditioning (batch 1) for the prompt and, unless cfg_scale is 1, the negative
        prompt, for a pass at width x height (SDXL's size conditioning depends on it; see sdxl.py)."""
        if request.cfg_scale == 1.0:
            return {"context": self.encode_prompt(request.prompt, request.clip_skip)}, None
        # Both padded to the same number of 77-token chunks with the empty prompt's chunk (A1111's option).
        cond, uncond = self.prompt_encoder.encode_pair(extract_extra_networks(request.prompt)[0],
                                                       extract_extra_networks(request.negative_prompt)[0],
                                                       request.clip_skip)
        return {"context": cond}, {"context": uncond}

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  image_cond: torch.Tensor | None = None) -> torch.Tensor:
        if image_cond is not None:
            x = torch.cat([x, image_cond.to(x.dtype)], dim=1)
        with torch.inference_mode():
            return self.unet(x.to(self.dtype), t, context).float()

    def sample_latents(self, request: GenerationRequest, job: SamplingJob, *, progress: bool = False,
                       callback: StepCallback | None = None) -> torch.Tensor:
        """The sampling core: every image of `request` in batches, from noise or from `job.init_latents`.

        Image i uses seed i of `request.image_seeds()`; with a strength in (0, 1) the sampler runs
        the schedule's tail from init + noise * sigma (A1111's sample_img2img); strength 1 starts
        from noise alone (the input is ignored) and strength 0 returns the init latents unchanged.
        """
        spec, schedule_name = resolve_sampler(job.sampler or request.sampler, job.scheduler or request.scheduler)
        full_sigmas = None
        if job.strength is None or job.strength >= 1.0:
            sigmas = sigmas_for(spec, schedule_name, self.schedule, job.steps, model_family=self.family)
        else:
            full_sigmas, sigmas = img2img_sigmas(
                lambda n: sigmas_for(spec, schedule_name, self.schedule, n, model_family=self.family),
                job.steps, job.strength)
        with loras_applied(self, request.prompt):
            return self._sample_batches(request, job, spec, sigmas, full_sigmas, progress, callback)

    def _sample_batches(self, request, job, spec, sigmas, full_sigmas, progress, callback) -> torch.Tensor:
        start_from_image = job.strength is not None and job.strength < 1.0
        factor = self.latent_factor
        conditioning = conditioning_schedule(self, request, job.shape[2] * factor, job.shape[1] * factor,
                                             total_steps(spec, job.steps), job.first_pass_steps)
        denoiser = make_denoiser(self._model_fn, self.schedule, lcm=spec.lcm)
        seeds, subseeds = request.image_seeds()
        show = progress and sys.stderr.isatty()

        batches = []
        for start in range(0, request.n, request.batch_size):
            count = min(request.batch_size, request.n - start)
            init = _rows(job.init_latents, start, count)
            if job.strength == 0.0:
                batches.append(init.clone())  # nothing to denoise: the input as encoded
                continue
            extra = {} if job.image_cond is None else {"image_cond": _rows(job.image_cond, start, count)}
            guided = scheduled_cfg_denoiser(denoiser, conditioning, count, extra, request.cfg_scale)
            if job.keep is not None:
                guided = masked_denoiser(guided, init, job.keep.to(init))
            noise = ImageNoise(seeds[start:start + count], job.shape, subseeds=subseeds[start:start + count],
                               subseed_strength=request.subseed_strength, device=self.device)
            bar = tqdm(total=len(sigmas) - 1, desc=f"image {start + 1}/{request.n}", disable=not show, leave=False)

            def on_step(i: int, total: int, x: torch.Tensor, denoised: torch.Tensor, start: int = start) -> None:
                bar.update(1)
                if callback is not None:
                    callback(start, i, total, denoised)

            latents = sample(spec, guided, sigmas, noise, init_latent=init if start_from_image else None,
                             full_sigmas=full_sigmas, callback=on_step)
            bar.close()
            if job.keep is not None:
                keep = job.keep.to(latents)
                latents = init * keep + latents * (1 - keep)
            batches.append(latents)
        return torch.cat(batches)

    def txt2img_conditioning(self, width: int, height: int) -> torch.Tensor | None:
        """An inpainting model's extra channels for a run without an input image: all masked, nothing known."""
        if not self.is_inpainting_model:
            return None
        return self.inpainting_conditioning(torch.zeros(1, 3, height, width, device=self.device), None)

    def generate(self, request: GenerationRequest | None = None, *, progress: bool = False,
                 callback: StepCallback | None = None, output_type: str = "pil", **fields) -> GenerationResult:
        """Run txt2img (with the hires fix when `hires_scale` is set) for `request` or keyword fields."""
        from sdgen.pipelines.hires import hires_pass, hires_parameters

        request = replace(request or GenerationRequest(), **fields) if fields else (request or GenerationRequest())
        request = replace(request, width=self.native_size if request.width is None else request.width,
                          height=self.native_size if request.height is None else request.height)  # 0 stays 0: refused
        request.validate()
        request = request.with_seed()
        preflight(self, request)  # memory estimate, watermark package: refused before anything is allocated
        factor = self.latent_factor
        shape = (self.vae.cfg.latent_channels, request.height // factor, request.width // factor)
        job = SamplingJob(shape, request.steps, image_cond=self.txt2img_conditioning(request.width, request.height))
        latents = self.sample_latents(request, job, progress=progress, callback=callback)
        extra = {}
        if request.hires_scale is not None:
            latents = hires_pass(self, request, latents, progress=progress, callback=callback)
            extra = hires_parameters(request)
        return self.result(request, latents, output_type, extra)

    def img2img(self, request: Img2ImgRequest | None = None, *, progress: bool = False,
                callback: StepCallback | None = None, output_type: str = "pil", **fields) -> GenerationResult:
        """img2img, or inpainting when the request has a mask (see img2img.py for the image preparation)."""
        from sdgen.pipelines.img2img import run_img2img

        request = replace(request or Img2ImgRequest(), **fields)
        return run_img2img(self, request, progress=progress, callback=callback, output_type=output_type)

    def inpaint(self, request: Img2ImgRequest | None = None, *, progress: bool = False,
                callback: StepCallback | None = None, output_type: str = "pil", **fields) -> GenerationResult:
        """Inpainting: img2img whose request carries a mask (white = repaint)."""
        request = replace(request or Img2ImgRequest(), **fields)
        if request.mask is None:
            raise RequestError("mask is missing: inpainting needs a mask image (white = repaint)")
        return self.img2img(request, progress=progress, callback=callback, output_type=output_type)

    def outpaint(self, request: Img2ImgRequest | None = None, *, left: int = 0, right: int = 0, up: int = 0,
                 down: int = 0, progress: bool = False, callback: StepCallback | None = None,
                 output_type: str = "pil", **fields) -> GenerationResult:
        """Extend the canvas by the given pixels and inpaint the new border, the seam blended (img2img.py)."""
        from sdgen.pipelines.img2img import outpaint_request

        request = outpaint_request(replace(request or Img2ImgRequest(), **fields), left=left, right=right,
                                   up=up, down=down)
        return self.img2img(request, progress=progress, callback=callback, output_type=output_type)

    def result(self, request: GenerationRequest, latents: torch.Tensor, output_type: str = "pil",
               extra: dict | None = None, images: list[Image.Image] | None = None) -> GenerationResult:
        """Decode `latents` (unless `images` are given) and attach each image's seed and infotext."""
        if images is None and output_type == "pil":
            images = to_pil(self.decode(latents))
        seeds, subseeds = request.image_seeds()
        infotexts = [self.infotext(request, seed, subseed, extra) for seed, subseed in zip(seeds, subseeds)]
        # safety checker, then invisible watermark; each infotext records what was done (sdgen.provenance)
        done = finish_images(images or [], infotexts, safety=self.safety_checker, watermark=self.watermark)
        return GenerationResult(done.images, seeds, done.infotexts, request, latents=latents, subseeds=subseeds,
                                nsfw=done.nsfw, watermarked=done.watermarked)

    def infotext(self, request: GenerationRequest, seed: int, subseed: int | None = None,
                 extra: dict | None = None) -> str:
        """AUTOMATIC1111's parameters text for one image of `request`; `extra` adds hires / inpainting keys."""
        spec, schedule_name = resolve_sampler(request.sampler, request.scheduler)
        variation = request.subseed_strength != 0
        strength = request.strength if isinstance(request, Img2ImgRequest) else None
        if request.hires_scale is not None and not isinstance(request, Img2ImgRequest):
            strength = request.hires_strength
        width, height = request.resolved_size() if isinstance(request, Img2ImgRequest) else (request.width, request.height)
        return format_infotext(request.prompt, request.negative_prompt, {
            "Steps": request.steps,
            "Sampler": spec.name,
            "Schedule type": registry.schedule_label(spec, schedule_name),
            "CFG scale": request.cfg_scale,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model hash": self.model_hash,
            "Model": self.name,
            "VAE": self.vae_name,
            "Variation seed": subseed if variation else None,
            "Variation seed strength": request.subseed_strength if variation else None,
            "Denoising strength": strength,
            "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
            "RNG": "CPU",
            "Step cache": self.unet.step_cache.interval if getattr(self.unet, "step_cache", None) else None,
            "Token merging ratio": token_merging_ratio(self.unet) or None,
            "Int8": True if uses_int8(self.unet) else None,
            **(extra or {}),
            "Lora hashes": lora_hashes(self, request.prompt),
            "Version": f"sdgen {sdgen.__version__}",
        })
