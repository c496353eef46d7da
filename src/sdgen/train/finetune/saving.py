"""A fully fine-tuned model written back out: a diffusers folder and an original-format single file,
both readable by sdgen, diffusers and AUTOMATIC1111."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from sdgen.checkpoints.ldm_keys import parts_to_original
from sdgen.checkpoints.parts import CheckpointParts
from sdgen.models.clip_config import CLIPTextConfig
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.models.unet import UNetConfig
from sdgen.models.vae import VAEConfig
from sdgen.runtime.files import folder_written_atomically, write_bytes_atomically, write_json
from sdgen.train.export import DIFFUSERS_VERSION


def _weights(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", dtype).contiguous() for key, value in state.items()}


def updated_parts(parts: CheckpointParts, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> CheckpointParts:
    """`parts` with the trained U-Net (and text encoder) weights, in the dtype the model came in."""
    dtype = next(iter(parts.unet_state.values())).dtype
    text_encoders = parts.text_encoders
    if text_encoder is not None:
        config, state = parts.text_encoders[0]
        text_encoders = [(config, _weights(text_encoder.state_dict(), next(iter(state.values())).dtype))]
    return replace(parts, unet_state=_weights(unet.state_dict(), dtype), text_encoders=text_encoders)


def write_diffusers_folder(parts: CheckpointParts, tokenizer: CLIPTokenizer, out: str | Path) -> Path:
    """model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ of an SD 1.x / 2.x model,
    written aside and renamed into place once complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_written_atomically(out) as staging:
        write_json(staging / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [None, None], "safety_checker": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        })
        unet_config = UNetConfig.from_diffusers(parts.unet_config).to_diffusers()
        write_json(staging / "unet" / "config.json", {**unet_config, "_diffusers_version": DIFFUSERS_VERSION})
        save_file(parts.unet_state, str(staging / "unet" / "diffusion_pytorch_model.safetensors"), {"format": "pt"})
        vae_config = {**VAEConfig.from_diffusers(parts.vae_config).to_diffusers(),
                      "scaling_factor": parts.vae_config.get("scaling_factor", 0.18215)}
        write_json(staging / "vae" / "config.json", {**vae_config, "_diffusers_version": DIFFUSERS_VERSION})
        save_file(_weights(parts.vae_state, next(iter(parts.vae_state.values())).dtype),
                  str(staging / "vae" / "diffusion_pytorch_model.safetensors"), {"format": "pt"})
        text_config, text_state = parts.text_encoders[0]
        write_json(staging / "text_encoder" / "config.json", CLIPTextConfig.from_transformers(text_config).to_transformers())
        save_file(_weights(text_state, next(iter(text_state.values())).dtype),
                  str(staging / "text_encoder" / "model.safetensors"), {"format": "pt"})
        tokenizer.save_folder(staging / "tokenizer")
        scheduler = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                     **{k: v for k, v in parts.scheduler_config.items() if not k.startswith("_")}}
        write_json(staging / "scheduler" / "scheduler_config.json", scheduler)
    return out


def write_single_file(parts: CheckpointParts, path: str | Path) -> Path:
    """The model in the original (CompVis / Stability) key names, as one `.safetensors`."""
    state = {key: value.contiguous() for key, value in parts_to_original(parts).items()}
    return write_bytes_atomically(path, save(state, metadata={"format": "pt"}))
