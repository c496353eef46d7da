"""The loader's entry points: any supported checkpoint -> CheckpointParts, any VAE -> (config, state)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdgen.checkpoints import detect
from sdgen.checkpoints.diffusers_folder import (
    allowed_roots, normalize_vae_names, load_component_weights, read_diffusers_folder, read_folder_configs, read_json,
    read_model_index,
)
from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.formats import load_state_dict
from sdgen.checkpoints.ldm_keys import (
    TEXT_ENCODERS, UNET_PREFIX, VAE_PREFIX, clip_to_transformers, openclip_to_transformers, unet_to_diffusers,
    vae_to_diffusers,
)
from sdgen.checkpoints.parts import CheckpointParts, check_prediction, default_scheduler_config

_SIDECAR_BYTES = 1 << 20
_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?(\w+)[\"']?\s*(#.*)?$", re.MULTILINE)
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}


def sidecar_prediction(path: Path) -> str | None:
    """AUTOMATIC1111's convention: `model.yaml` beside `model.safetensors`; `parameterization: "v"` means v."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file() or yaml.stat().st_size > _SIDECAR_BYTES:
        return None
    # A regex over the text, not a YAML parser: the one field we need, nothing the file says gets executed.
    match = _PARAMETERIZATION.search(yaml.read_text(encoding="utf-8", errors="replace"))
    if match is None:
        return None
    return {"v": "v", "eps": "eps"}.get(match[1])


def metadata_prediction(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """v-prediction as files declare it: ComfyUI's `v_pred` marker tensor, SAI ModelSpec, kohya's ss_ keys."""
    if "v_pred" in state:
        return "v"
    spec = metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction"):
        return "v"
    if spec in ("epsilon", "eps"):
        return "eps"
    if metadata.get("modelspec.architecture", "").endswith("-v"):  # e.g. stable-diffusion-v2-768-v
        return "v"
    if metadata.get("ss_v_parameterization", "").lower() in ("true", "1"):
        return "v"
    return None


def _text_encoders(state: dict, family: str, configs: dict | None) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    encoders = []
    for index, (kind, prefix) in enumerate(TEXT_ENCODERS[family]):
        weights = _strip(state, prefix)
        given = configs["text_encoders"][index] if configs else None
        if kind == "clip":
            converted = clip_to_transformers(weights)
        else:
            layers = given["num_hidden_layers"] if given else detect.openclip_layers_kept(weights, family)
            converted = openclip_to_transformers(weights, num_layers=layers, with_projection=family.startswith("sdxl"))
        encoders.append((given or detect.text_config(converted, kind), converted))
    return encoders


def read_checkpoint(
    path: str | Path,
    *,
    prediction: str | None = None,
    config_dir: str | Path | None = None,
    weights_variant: str | None = None,
) -> CheckpointParts:
    """A single file (.safetensors, .ckpt, .pt) or a diffusers folder -> configs + diffusers-named state dicts.

    prediction: 'eps' or 'v'; by default the file's metadata or `.yaml` sidecar decides, then
    config_dir's scheduler, then eps (SD 2.x 768-v files without metadata need prediction='v').
    config_dir: a diffusers folder whose configs replace the ones inferred from shapes.
    weights_variant: a diffusers folder's weight variant such as 'fp16'.
    """
    path = Path(path)
    prediction = check_prediction(prediction)
    if path.is_dir():
        if config_dir is not None:
            problem = "config_dir applies to single-file checkpoints only"
            raise CheckpointError(path, problem, "drop config_dir for a diffusers folder")
        return read_diffusers_folder(path, prediction=prediction, variant=weights_variant)
    state, metadata = load_state_dict(path)
    fix = "pass config_dir=<a diffusers folder of the same architecture> if the file is a supported model"
    try:
        family, variant = detect.detect_family(state)
        configs = read_folder_configs(config_dir) if config_dir is not None else None
        if configs and configs["family"] != family:
            raise ValueError(f"the file is {family} but config_dir holds a {configs['family']} model")
        unet_weights = _strip(state, UNET_PREFIX)
        unet_config = configs["unet"] if configs else detect.unet_config(unet_weights, family)
        vae_weights = {k: v for k, v in _strip(state, VAE_PREFIX).items() if k.startswith(_VAE_PARTS)}
        vae_config = None
        if vae_weights:
            vae_config = configs["vae"] if configs else detect.vae_config(vae_weights, family)
        text_encoders = _text_encoders(state, family, configs)
        unet_state = unet_to_diffusers(unet_weights, unet_config)
        vae_state = vae_to_diffusers(vae_weights, vae_config) if vae_weights else {}
    except (ValueError, KeyError, IndexError) as exc:
        message = str(exc) if isinstance(exc, ValueError) else f"missing tensor {exc}"
        raise CheckpointError(path, message, fix) from None

    configured = None
    if configs and "prediction_type" in configs["scheduler"]:
        configured = "v" if configs["scheduler"]["prediction_type"] == "v_prediction" else "eps"
    prediction = prediction or metadata_prediction(state, metadata) or sidecar_prediction(path) or configured or "eps"
    if family == "sd2" and prediction == "v" and not configs:
        unet_config["sample_size"] = 96  # the 768-v models
        if vae_config:
            vae_config["sample_size"] = 768
    scheduler = default_scheduler_config(family, prediction)
    if configs:
        scheduler = {**configs["scheduler"], "prediction_type": scheduler["prediction_type"]}
    return CheckpointParts(
        family=family,
        variant=variant,
        prediction=prediction,
        unet_config=unet_config,
        unet_state=unet_state,
        vae_config=vae_config,
        vae_state=vae_state,
        text_encoders=text_encoders,
        tokenizer_dirs=configs["tokenizer_dirs"] if configs else [None] * len(text_encoders),
        scheduler_config=scheduler,
        source=path,
        metadata=metadata,
        weight_files=(path,),
    )


def read_vae(path: str | Path, *, scaling_factor: float | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A VAE for `--vae`: a diffusers vae folder (or a pipeline folder's vae/), or a single file in
    original names (with or without `first_stage_model.`, so a full checkpoint works too) or diffusers names.

    The latent scaling factor is a property of the model the VAE serves (SD VAEs and SDXL VAEs have
    the same shapes), so a caller passes the main model's `scaling_factor`; the default is SD 1.x/2.x's.
    """
    path = Path(path)
    if path.is_dir():
        folder = path
        if (path / "model_index.json").exists():
            if "vae" not in read_model_index(path):
                raise CheckpointError(path, "the diffusers folder has no vae component", "pass a folder with a vae")
            folder = path / "vae"
        config = read_json(folder / "config.json")
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            problem = f"not an AutoencoderKL config ({str(config['_class_name'])[:60]})"
            raise CheckpointError(folder / "config.json", problem, "pass a VAE folder")
        state = normalize_vae_names(load_component_weights(folder, "diffusers", allowed_roots(folder))[0])
    else:
        weights, _ = load_state_dict(path)
        if any(key.startswith(VAE_PREFIX) for key in weights):
            weights = _strip(weights, VAE_PREFIX)
        weights = {k: v for k, v in weights.items() if k.startswith(_VAE_PARTS)}  # drops loss.*, model_ema.*
        try:
            if "encoder.down.0.block.0.conv1.weight" in weights:
                config = detect.vae_config(weights, None, "original")
                state = vae_to_diffusers(weights, config)
            elif "encoder.down_blocks.0.resnets.0.conv1.weight" in weights:
                state = normalize_vae_names(weights)
                config = detect.vae_config(state, None, "diffusers")
            else:
                raise ValueError("no VAE weights found (encoder.down.* or encoder.down_blocks.*)")
        except (ValueError, KeyError, IndexError) as exc:
            message = str(exc) if isinstance(exc, ValueError) else f"missing tensor {exc}"
            fix = "pass a VAE file (.safetensors, .pt, .ckpt) or a diffusers vae folder"
            raise CheckpointError(path, message, fix) from None
    if scaling_factor is not None:
        config = {**config, "scaling_factor": scaling_factor}
    return config, state
