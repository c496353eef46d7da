"""Tiny random-weight SDXL base and refiner reference pipelines (diffusers + transformers), test side only.

The base has SDXL's two text encoders (OpenAI-CLIP-style quick_gelu without projection, then
OpenCLIP-style gelu with a projection giving the pooled `text_embeds`), the refiner only the
second. Both use the real CLIP vocabulary (49,408 tokens) so that prompts tokenize as in the
published models; the CLIP-L-style tokenizer pads with the end token, the bigG-style one with "!"
(id 0), as SDXL's `tokenizer/` and `tokenizer_2/` do. Text configs keep transformers' legacy
`eos_token_id` 2 of the published SDXL configs (pooling at the largest id).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from reference_clip import randomize
from reference_models import (
    SDXL_CONTEXT_DIM, SDXL_POOLED_DIM, SDXL_REFINER_CONTEXT_DIM, make_reference_unet, make_reference_vae,
    randomize_weights,
)
from reference_pipelines import reference_tokenizer

SDXL_VAE_SCALING = 0.13025
# The shared U-Net gain (1.5) makes the tiny SDXL U-Nets chaotic under CFG 7.5: one Euler step
# multiplies a float32 rounding difference by 10-17, so 10-step runs of two correct implementations
# drift apart by 7/120. At gain 1.2 the difference stays at float32 level over the whole run.
UNET_GAIN = 1.2


def text_encoder(width: int, act: str, projection: bool, seed: int) -> torch.nn.Module:
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=act, bos_token_id=49406, eos_token_id=2, pad_token_id=1,
        projection_dim=SDXL_POOLED_DIM,
    )
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return randomize(cls(config), seed, scale=0.3)


def unet(family: str, seed: int) -> torch.nn.Module:
    return randomize_weights(make_reference_unet(family, seed=seed), seed, gain=UNET_GAIN)


def scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, timestep_spacing="linspace", steps_offset=1)


def make_sdxl_base(workdir: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL base: context 32 + 32 = the tiny U-Net's 64, pooled 32, 6 size ids."""
    half = SDXL_CONTEXT_DIM // 2
    pipeline = StableDiffusionXLPipeline(
        vae=make_reference_vae(seed=seed + 1, scaling_factor=SDXL_VAE_SCALING),
        text_encoder=text_encoder(half, "quick_gelu", False, seed + 2),
        text_encoder_2=text_encoder(SDXL_CONTEXT_DIM - half, "gelu", True, seed + 3),
        tokenizer=reference_tokenizer(workdir / "vocab-l", "<|endoftext|>"),
        tokenizer_2=reference_tokenizer(workdir / "vocab-g", "!"),
        unet=unet("sdxl", seed + 4), scheduler=scheduler(),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def make_sdxl_refiner(workdir: Path, vae=None, seed: int = 10) -> StableDiffusionXLImg2ImgPipeline:
    """SDXL refiner: bigG-style encoder only (context 32, pooled 32), 5 ids with the aesthetic score."""
    pipeline = StableDiffusionXLImg2ImgPipeline(
        vae=vae if vae is not None else make_reference_vae(seed=seed + 1, scaling_factor=SDXL_VAE_SCALING),
        text_encoder=None,
        text_encoder_2=text_encoder(SDXL_REFINER_CONTEXT_DIM, "gelu", True, seed + 3),
        tokenizer=None,
        tokenizer_2=reference_tokenizer(workdir / "vocab-g", "!"),
        unet=unet("sdxl_refiner", seed + 4), scheduler=scheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_both_formats(pipeline, workdir: Path, name: str) -> tuple[Path, Path, Path]:
    """(diffusers folder, original-format single file, config folder without weights) of `pipeline`."""
    from safetensors.torch import save_file

    from sdgen.checkpoints.ldm_keys import normalize_clip_names, to_original_checkpoint

    folder = workdir / name
    pipeline.save_pretrained(folder, safe_serialization=True)
    config_dir = workdir / f"{name}-configs"
    shutil.copytree(folder, config_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    family = "sdxl" if isinstance(pipeline, StableDiffusionXLPipeline) else "sdxl_refiner"
    texts = [t for t in (pipeline.text_encoder, pipeline.text_encoder_2) if t is not None]
    state = to_original_checkpoint(family, (dict(pipeline.unet.config), pipeline.unet.state_dict()),
                                   (dict(pipeline.vae.config), pipeline.vae.state_dict()),
                                   [normalize_clip_names(t.state_dict()) for t in texts])
    single = workdir / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, single)
    return folder, single, config_dir
