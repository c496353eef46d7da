"""The embedded model's recipe: autoencoder, its decoder fine-tuned, a small CLIP, the U-Net, export.

Each stage trains with `train_stage` (resumable) and leaves its result in the run folder;
`export` writes the diffusers-layout folder that sdgen ships and loads by default.
"""

from __future__ import annotations

import json
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sdgen.errors import UserError
from sdgen.models.clip_config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from sdgen.models.clip import CLIPModel
from sdgen.models.tiny_decoder import TinyDecoder, TinyDecoderConfig
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.models.unet import UNet, UNetConfig
from sdgen.models.vae import AutoencoderKL, VAEConfig
from sdgen.runtime.files import write_bytes_atomically
from sdgen.train.checkpoint import load_checkpoint, save_checkpoint
from sdgen.train.continue_from import STAGE_WEIGHTS, seed_run
from sdgen.train.data import SceneStream
from sdgen.train.diffusion_loss import NoiseObjective
from sdgen.train.loop import StageSettings, train_stage
from sdgen.train.vocab import build_vocabulary

STAGES = ("autoencoder", "decoder", "clip", "unet", "tiny_decoder", "export")


@dataclass(frozen=True)
class Recipe:
    """The parsed `configs/embedded.toml`."""

    data: dict
    autoencoder: dict
    clip: dict
    unet: dict
    decoder: dict | None = None  # optional: fine-tune the autoencoder's decoder alone
    tiny_decoder: dict | None = None  # optional: distil a preview decoder from the VAE's

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such training config; see configs/embedded.toml")
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
        missing = [name for name in ("data", "autoencoder", "clip", "unet") if name not in raw]
        if missing:
            raise UserError(f"{path}: missing section(s) {', '.join(missing)}")
        return cls(raw["data"], raw["autoencoder"], raw["clip"], raw["unet"], raw.get("decoder"),
                   raw.get("tiny_decoder"))


def make_tokenizer(stream: SceneStream) -> CLIPTokenizer:
    vocab, merges = build_vocabulary(stream.vocabulary_words())
    return CLIPTokenizer(vocab, merges)


def vae_config(recipe: Recipe) -> VAEConfig:
    section = recipe.autoencoder
    return VAEConfig(
        latent_channels=section["latent_channels"], block_out_channels=tuple(section["block_out_channels"]),
        layers_per_block=section["layers_per_block"], norm_num_groups=section["norm_num_groups"],
        sample_size=recipe.data["size"], scaling_factor=1.0, force_upcast=False,
    )


def clip_config(recipe: Recipe, tokenizer: CLIPTokenizer) -> CLIPConfig:
    section = recipe.clip
    text = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=section["hidden_size"],
        intermediate_size=section["intermediate_size"], num_layers=section["num_layers"],
        num_heads=section["num_heads"], max_positions=tokenizer.model_max_length, hidden_act="gelu",
        bos_token_id=tokenizer.start_id, eos_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=section["vision_hidden_size"], intermediate_size=4 * section["vision_hidden_size"],
        num_layers=section["vision_layers"], num_heads=section["num_heads"], image_size=recipe.data["size"],
        patch_size=section["patch_size"], hidden_act="gelu",
    )
    return CLIPConfig(text, vision, projection_dim=section["projection_dim"])


def unet_config(recipe: Recipe, text: CLIPTextConfig, vae: VAEConfig) -> UNetConfig:
    section = recipe.unet
    channels = tuple(section["block_out_channels"])
    attention = tuple(section.get("attention", [True] * len(channels)))
    return UNetConfig(
        in_channels=vae.latent_channels, out_channels=vae.latent_channels, block_out_channels=channels,
        layers_per_block=(section["layers_per_block"],) * len(channels), attention=attention,
        num_heads=tuple(max(1, c // section["head_dim"]) for c in channels),
        transformer_depth=(1,) * len(channels), cross_attention_dim=text.hidden_size,
        sample_size=recipe.data["size"] // vae.downsample_factor,
    )


def tiny_decoder_config(recipe: Recipe) -> TinyDecoderConfig:
    """One stage per latent doubling plus the last (TAESD's layout), from `[tiny_decoder]`."""
    section, vae = recipe.tiny_decoder, vae_config(recipe)
    stages = vae.downsample_factor.bit_length()  # 4x -> 3 stages, 8x -> 4
    blocks = tuple(section["blocks"])
    if len(blocks) != stages:
        raise UserError(f"[tiny_decoder] blocks: {len(blocks)} stages given, the autoencoder's "
                        f"{vae.downsample_factor}x latents need {stages}")
    return TinyDecoderConfig(latent_channels=vae.latent_channels, channels=(section["channels"],) * stages,
                             blocks=blocks)


def _settings(name: str, section: dict, steps: int | None, **extra) -> StageSettings:
    return StageSettings(name=name, steps=steps or section["steps"], lr=section["lr"],
                         warmup=min(200, (steps or section["steps"]) // 10 + 1), **extra)


def _trained(run_dir: Path, stage: str, model: torch.nn.Module) -> torch.nn.Module:
    """The result of an earlier stage, read back from its checkpoint."""
    state = load_checkpoint(run_dir / stage / "checkpoint.pt")
    if state is None:
        raise UserError(f"{run_dir / stage}: stage '{stage}' has not been trained yet; run `sdgen train {stage}` first")
    model.load_state_dict(state.get("ema", state["model"]))
    return model.eval().requires_grad_(False)


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + MSE against the scenes (pixels in [-1, 1]), and the batch's PSNR for the log."""
    error = reconstruction.float() - images
    psnr = 10 * torch.log10(4.0 / error.detach().pow(2).mean().clamp_min(1e-10))
    return error.abs().mean() + error.pow(2).mean(), {"psnr": round(float(psnr), 2)}


def train_autoencoder(recipe: Recipe, run_dir: Path, stream: SceneStream, steps: int | None) -> AutoencoderKL:
    """KL autoencoder: L1 + MSE reconstruction plus a tiny KL term (Rombach et al. 2022, no GAN)."""
    section = recipe.autoencoder
    model = AutoencoderKL(vae_config(recipe))
    crop = section.get("crop", recipe.data["size"])

    def loss_fn(images: torch.Tensor, step: int):
        posterior = model.encode(images)
        generator = torch.Generator().manual_seed(step)
        loss, extra = reconstruction_loss(model.decode(posterior.sample(generator)), images)
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.logvar.float().exp() - 1 - posterior.logvar.float())
        return loss + section["kl_weight"] * kl.sum() / images.shape[0], extra

    def batch_at(step: int) -> torch.Tensor:
        return stream.images(step, section["batch_size"], crop=crop)

    return train_stage(_settings("autoencoder", section, steps, bf16=section.get("bf16", False)), run_dir, model, loss_fn, batch_at)


def train_decoder(recipe: Recipe, run_dir: Path, stream: SceneStream, steps: int | None) -> AutoencoderKL | None:
    """The trained autoencoder's decoder fine-tuned alone on whole scenes (as SD's ft-MSE VAE was).

    The encoder is frozen, so the latents the U-Net learns from are the same with or without this
    stage; only the pictures decoded from them get closer to the scenes.
    """
    section = recipe.decoder
    if section is None:
        print("decoder: the config has no [decoder] section; the autoencoder's decoder is used as trained", flush=True)
        return None
    model = _trained(run_dir, "autoencoder", AutoencoderKL(vae_config(recipe)))
    decoder = [*model.decoder.parameters(), *(model.post_quant_conv.parameters() if model.post_quant_conv else ())]
    for parameter in decoder:
        parameter.requires_grad_(True)

    def loss_fn(images: torch.Tensor, step: int):
        with torch.no_grad():
            latents = model.encode(images).mean
        return reconstruction_loss(model.decode(latents), images)

    def batch_at(step: int) -> torch.Tensor:
        # Steps from 2 * 10**6 on: scenes no other stage trains on.
        return stream.images(2 * 10**6 + step, section["batch_size"])

    settings = _settings("decoder", section, steps, bf16=section.get("bf16", False))
    return train_stage(settings, run_dir, model, loss_fn, batch_at, parameters=decoder)


def trained_vae(recipe: Recipe, run_dir: Path) -> AutoencoderKL:
    """The autoencoder to ship: with the fine-tuned decoder when the run has one."""
    stage = "decoder" if (run_dir / "decoder" / "checkpoint.pt").is_file() else "autoencoder"
    return _trained(run_dir, stage, AutoencoderKL(vae_config(recipe)))


def train_tiny_decoder(recipe: Recipe, run_dir: Path, stream: SceneStream, steps: int | None) -> TinyDecoder | None:
    """A preview decoder distilled from the shipped VAE (as TAESD was from SD's): it learns to
    reproduce the VAE's decoded picture from the same U-Net-scale latent."""
    section = recipe.tiny_decoder
    if section is None:
        print("tiny_decoder: the config has no [tiny_decoder] section; no preview decoder is trained", flush=True)
        return None
    model = TinyDecoder(tiny_decoder_config(recipe))
    scaling_factor = LatentCache.recorded_scaling_factor(run_dir / "latents")
    if scaling_factor is None:
        raise UserError(f"{run_dir / 'latents'}: no recorded scaling factor; run `sdgen train unet` first")
    pairs = DecodedLatents.build(run_dir / "tiny_decoder" / "pairs", trained_vae(recipe, run_dir), stream,
                                 section["pairs"], scaling_factor)

    def loss_fn(batch, step: int):
        latents, decoded = batch
        return reconstruction_loss(model(latents), decoded)

    def batch_at(step: int):
        return pairs.batch(step, section["batch_size"])

    return train_stage(_settings("tiny_decoder", section, steps), run_dir, model, loss_fn, batch_at)


def trained_tiny_decoder(recipe: Recipe, run_dir: Path) -> TinyDecoder | None:
    """The preview decoder to ship, if the recipe has one and the run has trained it."""
    if recipe.tiny_decoder is None or not (run_dir / "tiny_decoder" / "checkpoint.pt").is_file():
        return None
    return _trained(run_dir, "tiny_decoder", TinyDecoder(tiny_decoder_config(recipe)))


def train_clip(recipe: Recipe, run_dir: Path, stream: SceneStream, tokenizer: CLIPTokenizer,
               steps: int | None) -> CLIPModel:
    """Contrastive image-text pre-training (Radford et al. 2021) on the scenes."""
    section = recipe.clip
    model = CLIPModel(clip_config(recipe, tokenizer))

    def loss_fn(batch, step: int):
        images, captions = batch
        ids = tokenizer(captions, max_length=section.get("train_tokens", tokenizer.model_max_length))
        logits = model.image_text_similarity(images, ids).float()
        labels = torch.arange(len(captions))
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                      + torch.nn.functional.cross_entropy(logits.t(), labels))
        accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, {"accuracy": round(float(accuracy), 3)}

    def batch_at(step: int):
        return stream.captioned(step, section["batch_size"], unique_captions=True)

    return train_stage(_settings("clip", section, steps, bf16=section.get("bf16", False)), run_dir, model, loss_fn, batch_at)


def train_unet(recipe: Recipe, run_dir: Path, stream: SceneStream, tokenizer: CLIPTokenizer,
               steps: int | None) -> tuple[UNet, float]:
    """Noise-prediction training on cached latents, captions dropped now and then for guidance."""
    section = recipe.unet
    vae = _trained(run_dir, "autoencoder", AutoencoderKL(vae_config(recipe)))
    clip = _trained(run_dir, "clip", CLIPModel(clip_config(recipe, tokenizer)))
    cache = LatentCache.build(run_dir / "latents", vae, stream, section.get("cached_scenes", 65536))
    model = UNet(unet_config(recipe, clip.config.text, vae.cfg))
    objective = NoiseObjective()
    dropout = section["caption_dropout"]

    def batch_at(step: int):
        return cache.batch(step, section["batch_size"])

    def loss_fn(batch, step: int):
        latents, captions = batch
        generator = torch.Generator().manual_seed(10_000_019 * step + 7)
        keep = torch.rand(len(captions), generator=generator) >= dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        with torch.no_grad():
            context = clip.encode_text(tokenizer(captions)).hidden_states
        loss = objective(model, latents * cache.scaling_factor, context, generator)
        return loss, {}

    settings = _settings("unet", section, steps, bf16=section.get("bf16", False), ema_decay=section.get("ema_decay"),
                         checkpoint_every=200)
    return train_stage(settings, run_dir, model, loss_fn, batch_at), cache.scaling_factor


class LatentCache:
    """Scenes encoded once by the trained autoencoder (posterior means), kept in chunk files so
    the U-Net stage skips the encoder and a rebuild resumes where it stopped."""

    CHUNK = 4096
    SCALING_FILE = "scaling_factor.json"

    def __init__(self, latents: torch.Tensor, captions: list[str], scaling_factor: float | None = None) -> None:
        self.latents = latents
        self.captions = captions
        # As SD's 0.18215: scale latents to unit variance for the diffusion schedule.
        self.scaling_factor = float(1.0 / latents.float().std()) if scaling_factor is None else scaling_factor

    @classmethod
    def recorded_scaling_factor(cls, folder: Path) -> float | None:
        """The factor the U-Net trains with, once the cache (or `--init-from`) has recorded it."""
        path = folder / cls.SCALING_FILE
        return float(json.loads(path.read_text())["scaling_factor"]) if path.is_file() else None

    @classmethod
    def record_scaling_factor(cls, folder: Path, factor: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(folder / cls.SCALING_FILE, (json.dumps({"scaling_factor": factor}) + "\n").encode())

    @classmethod
    def build(cls, folder: Path, vae: AutoencoderKL, stream: SceneStream, count: int) -> "LatentCache":
        def encode(step: int, size: int) -> dict:
            # Steps from 10**6 on are never used by the other stages' data.
            images, captions = stream.captioned(10**6 + step, size)
            with torch.no_grad():
                return {"latents": vae.encode(images).mean.to(torch.float16), "captions": captions}

        chunks = cached_chunks(folder, count, cls.CHUNK, encode)
        recorded = cls.recorded_scaling_factor(folder)
        captions = [caption for chunk in chunks for caption in chunk["captions"]]
        cache = cls(torch.cat([chunk["latents"] for chunk in chunks])[:count], captions[:count], recorded)
        # Recorded once: the U-Net must keep the factor it started with, whatever the cache holds later.
        if recorded is None:
            cls.record_scaling_factor(folder, cache.scaling_factor)
        return cache

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
        generator = torch.Generator().manual_seed(step)
        index = torch.randint(0, len(self.captions), (size,), generator=generator)
        return self.latents[index].float(), [self.captions[i] for i in index.tolist()]


class DecodedLatents:
    """(latent, picture) pairs for distilling the tiny decoder: scenes encoded by the VAE (posterior
    means at U-Net scale) and decoded again, made once in chunk files and then drawn by step."""

    CHUNK = 1024

    def __init__(self, latents: torch.Tensor, pictures: torch.Tensor) -> None:
        self.latents, self.pictures = latents, pictures

    @classmethod
    def build(cls, folder: Path, vae: AutoencoderKL, stream: SceneStream, count: int,
              scaling_factor: float) -> "DecodedLatents":
        def round_trip(step: int, size: int) -> dict:
            # Steps from 3 * 10**6 on: scenes no other stage trains on.
            images = stream.images(3 * 10**6 + step, size)
            with torch.no_grad():
                latents = vae.encode(images).mean
                pictures = vae.decode(latents).clamp(-1, 1)
            return {"latents": (latents * scaling_factor).to(torch.float16), "pictures": pictures.to(torch.float16)}

        chunks = cached_chunks(folder, count, cls.CHUNK, round_trip)
        return cls(torch.cat([c["latents"] for c in chunks])[:count], torch.cat([c["pictures"] for c in chunks])[:count])

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(step)
        index = torch.randint(0, len(self.latents), (size,), generator=generator)
        return self.latents[index].float(), self.pictures[index].float()


def cached_chunks(folder: Path, count: int, chunk_size: int, make: Callable[[int, int], dict]) -> list[dict]:
    """`count` items made in parts of up to 256 by `make(step, size)` (the stream's batch `step` of
    `size` items), one file per chunk, so that a rebuild after an interruption resumes at the first
    missing chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    chunk_size = min(chunk_size, count)
    part = min(256, chunk_size)
    chunks = []
    for chunk in range((count + chunk_size - 1) // chunk_size):
        path = folder / f"chunk-{chunk:04d}-{chunk_size}.pt"
        state = load_checkpoint(path)
        if state is None:
            parts = [make((chunk * chunk_size + offset) // part, part) for offset in range(0, chunk_size, part)]
            state = {key: (torch.cat([p[key] for p in parts]) if isinstance(parts[0][key], torch.Tensor)
                           else [item for p in parts for item in p[key]]) for key in parts[0]}
            save_checkpoint(path, state)
        chunks.append(state)
    return chunks


def export(recipe: Recipe, run_dir: Path, out: Path) -> Path:
    """Write the trained model as a diffusers-layout folder (fp16 safetensors, configs, tokenizer)."""
    from sdgen.train.export import write_diffusers_folder

    stream = SceneStream(recipe.data)
    tokenizer = make_tokenizer(stream)
    vae = trained_vae(recipe, run_dir)
    clip = _trained(run_dir, "clip", CLIPModel(clip_config(recipe, tokenizer)))
    scaling_factor = LatentCache.recorded_scaling_factor(run_dir / "latents")
    if scaling_factor is None:
        scaling_factor = LatentCache.build(run_dir / "latents", vae, stream,
                                           recipe.unet.get("cached_scenes", 65536)).scaling_factor
    unet = _trained(run_dir, "unet", UNet(unet_config(recipe, clip.config.text, vae.cfg)))
    steps = {stage: int(load_checkpoint(run_dir / stage / "checkpoint.pt")["step"]) for stage in STAGE_WEIGHTS
             if (run_dir / stage / "checkpoint.pt").is_file()}
    return write_diffusers_folder(out, unet=unet, vae=vae, clip=clip, tokenizer=tokenizer,
                                  scaling_factor=scaling_factor, training_steps=steps,
                                  tiny_decoder=trained_tiny_decoder(recipe, run_dir))


def continue_from(recipe: Recipe, run_dir: Path, folder: Path, tokenizer: CLIPTokenizer) -> None:
    """Seed the run's missing stage checkpoints from an exported model folder (`--init-from`)."""
    vae = AutoencoderKL(vae_config(recipe))
    clip = CLIPModel(clip_config(recipe, tokenizer))
    unet = UNet(unet_config(recipe, clip.config.text, vae.cfg))
    decoder = AutoencoderKL(vae_config(recipe))
    models = {"autoencoder": vae, "decoder": decoder, "clip": clip, "unet": unet}
    if recipe.tiny_decoder is not None:
        models["tiny_decoder"] = TinyDecoder(tiny_decoder_config(recipe))
    seeded = seed_run(run_dir, folder, models)
    if "autoencoder" in seeded and LatentCache.recorded_scaling_factor(run_dir / "latents") is None:
        # the folder's U-Net was trained with the factor in its VAE config: keep it
        factor = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
        LatentCache.record_scaling_factor(run_dir / "latents", float(factor))
    if seeded:
        print(f"{run_dir}: {', '.join(seeded)} continued from {folder}", flush=True)


def stop_on_terminate() -> None:
    """Treat SIGTERM (kill, a session ending) like Ctrl-C: the loop saves a checkpoint, then stops."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run_training(stage: str, *, config_path: str, run_dir: str, threads: int | None = None,
                 steps: int | None = None, out: str | None = None, init_from: str | None = None) -> None:
    """`sdgen train STAGE`: one stage, or `all` of them in order (each resumes where it stopped)."""
    from sdgen.pipelines.loading import embedded_model_path

    if threads:
        torch.set_num_threads(threads)
    stop_on_terminate()
    recipe = Recipe.load(config_path)
    run = Path(run_dir)
    stream = SceneStream(recipe.data)
    tokenizer = make_tokenizer(stream)
    if init_from:
        continue_from(recipe, run, Path(init_from), tokenizer)
    for name in (STAGES if stage == "all" else (stage,)):
        if name == "autoencoder":
            train_autoencoder(recipe, run, stream, steps)
        elif name == "decoder":
            train_decoder(recipe, run, stream, steps)
        elif name == "clip":
            train_clip(recipe, run, stream, tokenizer, steps)
        elif name == "unet":
            train_unet(recipe, run, stream, tokenizer, steps)
        elif name == "tiny_decoder":
            train_tiny_decoder(recipe, run, stream, steps)
        elif name == "export":
            print(export(recipe, run, Path(out) if out else embedded_model_path()))
