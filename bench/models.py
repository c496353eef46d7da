"""Random-weight Stable Diffusion models for the benchmark: the published full-size shapes, no downloads.

`write_folder` saves a diffusers folder (fp16 safetensors, as published checkpoints ship) with
weights drawn fast from scaled normals; both sdgen and diffusers load that same folder.
`sdgen_from_reference` builds sdgen's modules on the meta device and assigns the reference's own
tensors, so an interleaved comparison in one process holds one copy of the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sdgen.diffusion.schedules import DiscreteSchedule
from sdgen.models.clip_config import CLIPTextConfig
from sdgen.models.clip import CLIPTextModel
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.models.unet import UNet, UNetConfig
from sdgen.models.vae import AutoencoderKL, VAEConfig
from sdgen.pipelines.stable_diffusion import StableDiffusion

# SD 1.x's scheduler as published, with the linspace spacing that makes diffusers' Euler and
# A1111's (k-diffusion) Euler take the same sigmas.
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "steps_offset": 1, "timestep_spacing": "linspace"}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of one model family: U-Net, VAE and (SD 1.x) CLIP text tower."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    image_size: int  # the native image side
    text_2: CLIPTextConfig | None = None  # SDXL's second encoder (with a projection)

    def key(self) -> str:
        """A short fingerprint of the shapes, so a cached folder is rebuilt when a config changes."""
        texts = [t.to_transformers() for t in (self.text, self.text_2) if t is not None]
        raw = json.dumps([self.unet.to_diffusers(), self.vae.to_diffusers(), texts], sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}"


CLIP_L = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, eos_token_id=2)
OPENCLIP_BIGG = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20,
                               hidden_act="gelu", projection_dim=1280, eos_token_id=2)
SD15 = ModelSpec("sd15", UNetConfig(), VAEConfig(), CLIP_L, 512)
SDXL = ModelSpec("sdxl", UNetConfig(
    block_out_channels=(320, 640, 1280), layers_per_block=(2, 2, 2), attention=(False, True, True),
    num_heads=(5, 10, 20), transformer_depth=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    sample_size=128), replace(VAEConfig(), scaling_factor=0.13025, force_upcast=False, sample_size=1024), CLIP_L, 1024,
    OPENCLIP_BIGG)
# --smoke: SD's layout (4 levels, attention on the first three) at tiny widths, 64x64 images.
TINY = ModelSpec("tiny", UNetConfig(
    block_out_channels=(32, 32, 64, 64), num_heads=(2, 2, 2, 2), cross_attention_dim=32, norm_num_groups=8,
    sample_size=8), VAEConfig(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, sample_size=64),
    CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, eos_token_id=2), 64)
TINY_XL = ModelSpec("tiny-xl", replace(
    SDXL.unet, block_out_channels=(32, 64, 64), num_heads=(2, 2, 2), transformer_depth=(1, 1, 2),
    cross_attention_dim=64, projection_class_embeddings_input_dim=32 + 6 * 256, norm_num_groups=8, sample_size=8),
    TINY.vae, TINY.text, 64, replace(TINY.text, hidden_act="gelu", projection_dim=32))
SPECS = {spec.name: spec for spec in (SD15, SDXL, TINY, TINY_XL)}


@torch.no_grad()
def random_init_(module: nn.Module, seed: int) -> nn.Module:
    """Fill weights in place: N(0, 1/fan_in) for linear and conv (activations keep their scale), norms at 1/0."""
    generator = torch.Generator().manual_seed(seed)

    def normal_(tensor: torch.Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)

    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            normal_(child.weight, 1.0 / math.sqrt(child.weight[0].numel()))
            if child.bias is not None:
                normal_(child.bias, 0.02)
        elif isinstance(child, (nn.GroupNorm, nn.LayerNorm)):
            child.weight.fill_(1.0)
            child.bias.zero_()
        elif isinstance(child, nn.Embedding):
            normal_(child.weight, 0.02)
    return module


def _empty_fp16(factory) -> nn.Module:
    """A module built without touching memory, then given uninitialised fp16 storage."""
    with torch.device("meta"):
        module = factory()
    return module.to(torch.float16).to_empty(device="cpu")


def write_folder(spec: ModelSpec, folder: Path, seed: int = 0) -> Path:
    """A diffusers folder of random fp16 weights with spec's shapes; reused when already complete."""
    import transformers
    from diffusers import AutoencoderKL as RefVAE, EulerDiscreteScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel

    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    unet = random_init_(_empty_fp16(lambda: UNet2DConditionModel(**_clean(spec.unet.to_diffusers()))), seed)
    vae = random_init_(_empty_fp16(lambda: RefVAE(**_clean(spec.vae.to_diffusers()))), seed + 1)
    text_config = transformers.CLIPTextConfig(**_clean(spec.text.to_transformers()))
    text = random_init_(_empty_fp16(lambda: transformers.CLIPTextModel(text_config)), seed + 2)
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER)
    if spec.unet.addition_embed_type == "text_time":  # SDXL: CLIP-L and OpenCLIP bigG with projection
        from diffusers import StableDiffusionXLPipeline

        bigg_config = transformers.CLIPTextConfig(**_clean(spec.text_2.to_transformers()))
        text_2 = random_init_(_empty_fp16(lambda: transformers.CLIPTextModelWithProjection(bigg_config)), seed + 3)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2,
                                         tokenizer=_tokenizer(folder, "<|endoftext|>"),
                                         tokenizer_2=_tokenizer(folder, "!"), unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=_tokenizer(folder, "<|endoftext|>"),
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    done.write_text(spec.key())
    return folder


def _tokenizer(folder: Path, pad: str):
    """transformers' CLIPTokenizer over the original CLIP vocabulary (written by sdgen's tokenizer)."""
    import transformers

    vocab = folder / "vocab-files"
    CLIPTokenizer.default().save_folder(vocab)
    return transformers.CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token=pad,
                                      model_max_length=77)


def _clean(config: dict) -> dict:
    """A config dict without the `_class_name` / `architectures` bookkeeping fields."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def load_reference(folder: Path, dtype: torch.dtype):
    """diffusers' StableDiffusionPipeline (or XL pipeline) from the folder, Euler sampler, progress bar off."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if (folder / "text_encoder_2").exists():
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assigned(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def sdgen_unet(reference: nn.Module) -> UNet:
    """sdgen's U-Net holding the reference U-Net's tensors (no copy)."""
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_diffusers(dict(reference.config)))
    return _assigned(unet, reference.state_dict())


def sdgen_vae(reference: nn.Module) -> AutoencoderKL:
    """sdgen's VAE holding the reference VAE's tensors (no copy)."""
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.from_diffusers(dict(reference.config)))
    return _assigned(vae, reference.state_dict())


def sdgen_from_reference(pipe, dtype: torch.dtype) -> StableDiffusion:
    """sdgen's pipeline over the reference pipeline's weights: same tensors, sdgen's code."""
    text_cfg = CLIPTextConfig.from_transformers(pipe.text_encoder.config.to_dict())
    state = pipe.text_encoder.state_dict()
    # transformers 5 keeps CLIPTextModel weights without the `text_model.` prefix the files use
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    with torch.device("meta"):
        text = CLIPTextModel(text_cfg)
    text = _assigned(text, state)
    schedule = DiscreteSchedule.from_diffusers_scheduler_config(dict(pipe.scheduler.config))
    return StableDiffusion(sdgen_unet(pipe.unet), sdgen_vae(pipe.vae), text, CLIPTokenizer.default(), schedule,
                           family="sd1", name="random", hash_fn=lambda: "0" * 64, device=torch.device("cpu"),
                           dtype=dtype)
