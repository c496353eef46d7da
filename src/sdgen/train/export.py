"""Saving a trained model as a diffusers-layout folder, readable by sdgen and by the reference."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdgen.models.clip import CLIPModel
from sdgen.models.tiny_decoder import FOLDER_FILE, TinyDecoder
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.models.unet import UNet
from sdgen.models.vae import AutoencoderKL
from sdgen.runtime.files import folder_written_atomically, write_json
from sdgen.train.continue_from import write_training_record

DIFFUSERS_VERSION = "0.42.1"  # the format version we write, as diffusers records it


def _save_weights(path: Path, module: torch.nn.Module, keep=lambda key: True, dtype=torch.float16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items() if keep(k)}
    save_file(state, str(path), metadata={"format": "pt"})


def write_diffusers_folder(out: Path, *, unet: UNet, vae: AutoencoderKL, clip: CLIPModel,
                           tokenizer: CLIPTokenizer, scaling_factor: float,
                           training_steps: dict[str, int] | None = None,
                           tiny_decoder: TinyDecoder | None = None) -> Path:
    """Write model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ and clip/
    (the whole small CLIP, for ranking) into `out`, replacing it only once complete; with
    `training_steps`, also training.json, from which `sdgen train --init-from` continues; with
    `tiny_decoder`, its preview decoder as tiny_decoder.safetensors (an sdgen extra that
    diffusers' loader ignores)."""
    out = Path(out)
    with folder_written_atomically(out) as staging:
        write_json(staging / "model_index.json", {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "requires_safety_checker": False,
            "image_encoder": [None, None],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
        write_json(staging / "unet" / "config.json", {**unet.cfg.to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION})
        _save_weights(staging / "unet" / "diffusion_pytorch_model.safetensors", unet)
        vae_config = {**vae.cfg.to_diffusers(), "scaling_factor": scaling_factor, "_diffusers_version": DIFFUSERS_VERSION}
        write_json(staging / "vae" / "config.json", vae_config)
        _save_weights(staging / "vae" / "diffusion_pytorch_model.safetensors", vae)
        write_json(staging / "text_encoder" / "config.json", {**clip.config.text.to_transformers(), "torch_dtype": "float32"})
        _save_weights(staging / "text_encoder" / "model.safetensors", clip, keep=lambda k: k.startswith("text_model."))
        tokenizer.save_folder(staging / "tokenizer")
        write_json(staging / "scheduler" / "scheduler_config.json", {
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
            "timestep_spacing": "linspace", "interpolation_type": "linear", "use_karras_sigmas": False,
            "clip_sample": False, "set_alpha_to_one": False, "trained_betas": None,
        })
        write_json(staging / "clip" / "config.json", clip.config.to_transformers())
        _save_weights(staging / "clip" / "model.safetensors", clip)
        side = clip.config.vision.image_size  # trained on pixels in [-1, 1]: mean and std 0.5
        write_json(staging / "clip" / "preprocessor_config.json", {
            "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": side},
            "crop_size": {"height": side, "width": side}, "resample": 3, "do_resize": True,
            "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
        })
        if tiny_decoder is not None:
            _save_weights(staging / FOLDER_FILE, tiny_decoder)
        if training_steps:
            write_training_record(staging, training_steps)
    return out
