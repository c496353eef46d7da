"""Tiny random-weight reference pipelines (diffusers + transformers), saved in the real formats.

Test side only. `make_reference_pipeline("sd1")` builds a StableDiffusionPipeline with
Stable Diffusion's block layout shrunk to small channel counts, the real CLIP vocabulary
and a tiny text encoder; `save_folder` writes the diffusers layout and `save_single_file`
the original (CompVis / Stability) key names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from reference_clip import randomize
from reference_models import make_reference_unet, make_reference_vae, SD1_CONTEXT_DIM, SD2_CONTEXT_DIM
from sdgen.models.tokenizer import CLIPTokenizer

FAMILY_SETTINGS = {
    # SD 1.x: OpenAI CLIP (quick_gelu), pads with the end token, legacy eos_token_id 2
    "sd1": dict(context=SD1_CONTEXT_DIM, act="quick_gelu", pad="<|endoftext|>", eos=2, prediction="epsilon"),
    # SD 2.x: OpenCLIP (gelu), pads with "!", v-prediction (the 768-v models)
    "sd2": dict(context=SD2_CONTEXT_DIM, act="gelu", pad="!", eos=2, prediction="v_prediction"),
}


def reference_tokenizer(folder: Path, pad: str) -> transformers.CLIPTokenizer:
    """The original CLIP vocabulary as vocab.json + merges.txt, read by transformers."""
    CLIPTokenizer.default(pad_token=pad).save_folder(folder)
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad,
                                    model_max_length=77)


def make_reference_pipeline(family: str, workdir: Path, seed: int = 0) -> StableDiffusionPipeline:
    settings = FAMILY_SETTINGS[family]
    text_config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=settings["context"], intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=settings["act"],
        bos_token_id=49406, eos_token_id=settings["eos"], pad_token_id=1,
    )
    torch.manual_seed(seed)
    text_encoder = randomize(transformers.CLIPTextModel(text_config), seed, scale=0.3)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=settings["prediction"], timestep_spacing="linspace", steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=make_reference_vae(seed=seed + 1), text_encoder=text_encoder,
        tokenizer=reference_tokenizer(workdir / f"{family}-vocab", settings["pad"]),
        unet=make_reference_unet(family, seed=seed + 2), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_folder(pipeline: StableDiffusionPipeline, folder: Path) -> Path:
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def reference_euler_image(folder: Path, prompt: str, seed: int, steps: int, cfg_scale: float, side: int,
                          sigma_max: float) -> np.ndarray:
    """diffusers' StableDiffusionPipeline on a folder with Euler over linspace timesteps (A1111's
    and sdgen's "Euler"), started from sdgen's seeded CPU noise: (side, side, 3) floats in [0, 1]."""
    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config, timestep_spacing="linspace")
    reference.scheduler.set_timesteps(steps)
    latent_side = side // (2 ** (len(reference.vae.config.block_out_channels) - 1))
    noise = torch.randn((1, 4, latent_side, latent_side), generator=torch.Generator().manual_seed(seed))
    latents = noise * sigma_max / reference.scheduler.init_noise_sigma
    return reference(prompt, num_inference_steps=steps, guidance_scale=cfg_scale, height=side, width=side,
                     latents=latents, output_type="np").images[0]
