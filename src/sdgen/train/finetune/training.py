"""`sdgen finetune`: LoRA, textual inversion or DreamBooth-style full fine-tuning of a model on a
folder of captioned images, through the shared resumable loop (`sdgen.train.loop.train_stage`:
atomic checkpoints, EMA, gradient accumulation, bf16 autocast, progress bar, metrics and loss
curve). Sample images are drawn at every checkpoint.

Run folder (`out`): `<method>/` checkpoint, metrics.jsonl and loss.png; `latents/` the cache;
`samples/`; and the result: `<name>.safetensors` (LoRA or embedding), or for DreamBooth the
diffusers folder `<name>/` and the single file `<name>.safetensors`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdgen.errors import UserError
from sdgen.pipelines.images import open_image
from sdgen.train.finetune.arguments import METHODS
from sdgen.pipelines.output import save_png_atomic
from sdgen.train.finetune.cache import cache_latents
from sdgen.train.finetune.data import (
    BucketSchedule, CaptionOptions, TrainingImage, make_buckets, nearest_bucket, read_image_folder,
)
from sdgen.train.finetune.lora_network import LoraNetwork
from sdgen.train.finetune.objective import denoising_loss
from sdgen.train.finetune.textual_inversion import TextualInversion
from sdgen.train.loop import StageSettings, train_stage

DEFAULT_LR = {"lora": 1e-4, "textual-inversion": 5e-3, "dreambooth": 5e-6}


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `sdgen finetune` takes; defaults follow kohya-ss and the diffusers examples."""

    method: str
    data: str
    out: str
    model: str | None = None  # None: the embedded model
    name: str = "finetuned"  # output name; for textual inversion also the prompt word
    steps: int = 500
    lr: float | None = None  # None: DEFAULT_LR of the method
    batch_size: int = 1
    accumulate: int = 1
    ema_decay: float | None = None
    bf16: bool = True
    seed: int = 0
    resolution: int | None = None  # None: the model's native size
    buckets: bool = True  # aspect-ratio buckets; False: every image centre-cropped square
    caption: str | None = None  # for images without a caption file (DreamBooth's instance prompt)
    caption_column: str = "text"
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    rank: int = 4
    alpha: float = 1.0
    conv_rank: int | None = None  # LoRA on the ResNet blocks' 3x3 convolutions too (kohya's conv_dim)
    conv_alpha: float | None = None  # None: alpha
    train_text_encoder: bool = False  # LoRA and DreamBooth
    num_vectors: int = 1  # textual inversion
    init_text: str = "*"
    class_data: str | None = None  # DreamBooth prior preservation: class images (made if missing)
    class_prompt: str | None = None
    num_class_images: int = 50
    prior_weight: float = 1.0
    snr_gamma: float | None = None
    save_every: int = 100  # checkpoint and sample images every N steps
    sample_prompts: tuple[str, ...] = ()  # None given: the first two training captions
    sample_steps: int = 20
    device: str = "auto"
    embedding_format: str = "safetensors"  # textual inversion: safetensors or pt

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("steps", "batch_size", "accumulate", "save_every", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.method == "dreambooth" and (self.class_data or self.class_prompt) and not self.class_prompt:
            raise ValueError("prior preservation needs --class-prompt (what the class images show)")
        if self.embedding_format not in ("safetensors", "pt"):
            raise ValueError(f"embedding format must be safetensors or pt, got {self.embedding_format!r}")


@dataclass
class FinetuneResult:
    outputs: list[Path]
    run_dir: Path


class CachedImages:
    """Training images as cached latents (in the U-Net's scale) and captions, batched by bucket."""

    def __init__(self, images: list[TrainingImage], pipeline, run_dir: Path, resolution: int,
                 use_buckets: bool, batch_size: int, seed: int) -> None:
        step = pipeline.latent_factor * pipeline.unet.cfg.downsample_factor
        resolution = max(step, resolution // step * step)
        choices = make_buckets(resolution, step) if use_buckets else [(resolution, resolution)]
        buckets = []
        for image in images:
            with open_image(image.path) as opened:
                buckets.append(nearest_bucket(*opened.size, choices))
        vae_cfg = pipeline.vae.cfg
        raw = cache_latents([i.path for i in images], buckets, pipeline.vae, run_dir / "latents")
        self.latents = [(latent - (vae_cfg.shift_factor or 0.0)) * vae_cfg.scaling_factor for latent in raw]
        self.captions = [image.caption for image in images]
        self.schedule = BucketSchedule(buckets, batch_size, seed)
        self.seed = seed

    def batch(self, step: int, options: CaptionOptions) -> tuple[torch.Tensor, list[str]]:
        items = self.schedule.batch(step)
        captions = [options.apply(self.captions[i], np.random.default_rng([self.seed, step, i])) for i in items]
        return torch.stack([self.latents[i] for i in items]), captions


class FullModel(torch.nn.Module):
    """The U-Net (and text encoder) trained in full, as one module for the loop's checkpoints and EMA."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


def ensure_class_images(pipeline, folder: Path, prompt: str, count: int, steps: int, seed: int) -> list[TrainingImage]:
    """DreamBooth's prior-preservation set: `count` images of the class prompt drawn by the base
    model before training (only the missing ones are drawn), captioned with the prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = folder / f"class-{index:05d}.png"
        if not path.exists():
            result = pipeline.generate(prompt=prompt, seed=seed + index, steps=steps)
            save_png_atomic(result.images[0], path, result.infotexts[0])
            (folder / f"class-{index:05d}.txt").write_text(prompt + "\n", encoding="utf-8")
    return read_image_folder(folder, default_caption=prompt)[:count]


@contextlib.contextmanager
def prompts_with_embedding(pipeline, inversion: TextualInversion | None):
    """Let the pipeline's prompts use a textual-inversion embedding while drawing samples."""
    if inversion is None:
        yield
        return
    # Every prompt path (encode_prompt and the guidance pair) goes through pipeline.prompt_encoder,
    # which is rebuilt whenever pipeline.embeddings changes.
    previous = pipeline.embeddings
    pipeline.embeddings = [inversion.embedding()]
    try:
        yield
    finally:
        pipeline.embeddings = previous


def run_finetune(config: FinetuneConfig, pipeline=None) -> FinetuneResult:
    """Fine-tune `config.model` (or the given pipeline, changed in place) on `config.data`."""
    import sdgen

    config.validate()
    run_dir = Path(config.out)
    if pipeline is None:
        pipeline = sdgen.load(config.model, device=config.device, dtype="fp32")
    if pipeline.family not in ("sd1", "sd2"):
        raise UserError(f"fine-tuning takes SD 1.x and 2.x models; {pipeline.family} is not supported yet")
    resolution = config.resolution or pipeline.native_size
    images = read_image_folder(config.data, config.caption, config.caption_column)
    data = CachedImages(images, pipeline, run_dir, resolution, config.buckets, config.batch_size, config.seed)
    prior = None
    if config.method == "dreambooth" and config.class_prompt:
        folder = Path(config.class_data) if config.class_data else run_dir / "class_images"
        class_images = ensure_class_images(pipeline, folder, config.class_prompt, config.num_class_images,
                                           config.sample_steps, config.seed + 10_000)
        prior = CachedImages(class_images, pipeline, run_dir, resolution, config.buckets, config.batch_size,
                             config.seed + 1)

    unet, text_encoder, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    inversion = None
    if config.method == "lora":
        trainable = LoraNetwork(unet, text_encoder if config.train_text_encoder else None, config.rank,
                                config.alpha, config.seed, config.conv_rank, config.conv_alpha).to(pipeline.device).attach()
    elif config.method == "textual-inversion":
        trainable = inversion = TextualInversion(config.name, tokenizer, text_encoder, config.num_vectors,
                                                 config.init_text).to(pipeline.device)
    else:
        for module in (unet, text_encoder) if config.train_text_encoder else (unet,):
            for parameter in module.parameters():  # own memory: the loaded weights may be a mapped file
                parameter.data = parameter.data.clone()
            module.requires_grad_(True)
        trainable = FullModel(unet, text_encoder if config.train_text_encoder else None)
    text_grad = config.method != "textual-inversion" and config.train_text_encoder

    def encode(captions: list[str]) -> torch.Tensor:
        if inversion is not None:
            return inversion.encode(captions)
        with contextlib.nullcontext() if text_grad else torch.no_grad():
            return pipeline.prompt_encoder.encode_differentiable(captions)  # A1111's chunks and emphasis

    def batch_at(step: int):
        latents, captions = data.batch(step, config.captions)
        if prior is None:
            return latents, captions, latents.shape[0]
        class_latents, class_captions = prior.batch(step, CaptionOptions())
        if class_latents.shape[2:] != latents.shape[2:]:  # another bucket: one loss call per shape
            return [(latents, captions), (class_latents, class_captions)], None, latents.shape[0]
        return torch.cat([latents, class_latents]), captions + class_captions, latents.shape[0]

    def loss_fn(batch, step: int):
        latents, captions, instances = batch
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        groups = latents if captions is None else [(latents, captions)]
        losses = [denoising_loss(unet, lat.to(pipeline.device), encode(caps), pipeline.schedule, generator,
                                 config.snr_gamma) for lat, caps in groups]
        per_sample = torch.cat(losses)
        instance = per_sample[:instances].mean()
        if per_sample.shape[0] == instances:
            return instance, {}
        prior_loss = per_sample[instances:].mean()
        return instance + config.prior_weight * prior_loss, {"prior_loss": round(float(prior_loss.detach()), 5)}

    prompts = list(config.sample_prompts) or list(dict.fromkeys(data.captions))[:2]
    if inversion is not None:
        prompts = [inversion.prompt(p) for p in prompts]

    def draw_samples(step: int, _model: torch.nn.Module) -> None:
        with prompts_with_embedding(pipeline, inversion):
            for index, prompt in enumerate(prompts):
                result = pipeline.generate(prompt=prompt, seed=config.seed + index, steps=config.sample_steps)
                save_png_atomic(result.images[0], run_dir / "samples" / f"step-{step:06d}-{index}.png",
                                result.infotexts[0])

    settings = StageSettings(name=config.method, steps=config.steps, lr=config.lr or DEFAULT_LR[config.method],
                             warmup=min(100, config.steps // 10 + 1), grad_clip=1.0, ema_decay=config.ema_decay,
                             bf16=config.bf16, checkpoint_every=config.save_every, log_every=1,
                             accumulate=config.accumulate)
    trained = train_stage(settings, run_dir, trainable, loss_fn, batch_at, on_checkpoint=draw_samples)
    return FinetuneResult(save_result(config, pipeline, trained, run_dir), run_dir)


def save_result(config: FinetuneConfig, pipeline, trained: torch.nn.Module, run_dir: Path) -> list[Path]:
    """Write the method's result files (see the module docstring)."""
    info = {"ss_output_name": config.name, "ss_sd_model_name": pipeline.name, "ss_steps": str(config.steps),
            "ss_learning_rate": str(config.lr or DEFAULT_LR[config.method])}
    if config.method == "lora":
        return [trained.save(run_dir / f"{config.name}.safetensors", metadata=info)]
    if config.method == "textual-inversion":
        path = run_dir / f"{config.name}.{config.embedding_format}"
        return [trained.save(path, step=config.steps, model_hash=pipeline.model_hash, model_name=pipeline.name)]
    from sdgen.checkpoints.reader import read_checkpoint
    from sdgen.train.finetune.saving import updated_parts, write_diffusers_folder, write_single_file

    source = Path(config.model) if config.model else None
    if source is None:
        from sdgen.pipelines.loading import embedded_model_path

        source = embedded_model_path()
    parts = updated_parts(read_checkpoint(source), trained.unet, trained.text_encoder)
    folder = write_diffusers_folder(parts, pipeline.tokenizer, run_dir / config.name)
    return [folder, write_single_file(parts, run_dir / f"{config.name}.safetensors")]
