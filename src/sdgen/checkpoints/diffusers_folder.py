"""diffusers pipeline folders (`model_index.json`, one folder per component), read without importing what they name.

Class names in `model_index.json` are checked against the set of components a Stable Diffusion
pipeline has; an unknown name is refused rather than looked up. Weights come from
`diffusion_pytorch_model.safetensors` / `model.safetensors`, a `.fp16` variant, a sharded
`*.safetensors.index.json`, or a `.bin` through the restricted unpickler. A weight file that
resolves outside the folder is refused, except into the `blobs/` store of a Hugging Face cache
snapshot (`.../snapshots/<revision>/`), whose files are symlinks by design.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.formats import load_state_dict
from sdgen.checkpoints.ldm_keys import normalize_clip_names
from sdgen.checkpoints.parts import CheckpointParts, check_prediction, default_scheduler_config

MAX_JSON_BYTES = 16 * 1024 * 1024
PIPELINES = {
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
}
SCHEDULERS = {
    "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler",
}
COMPONENT_CLASSES = {
    ("diffusers", "UNet2DConditionModel"), ("diffusers", "AutoencoderKL"),
    ("transformers", "CLIPTextModel"), ("transformers", "CLIPTextModelWithProjection"),
    ("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast"),
    ("stable_diffusion", "StableDiffusionSafetyChecker"), ("transformers", "CLIPImageProcessor"),
    ("transformers", "CLIPFeatureExtractor"), ("transformers", "CLIPVisionModelWithProjection"),
} | {("diffusers", name) for name in SCHEDULERS}
_WEIGHT_BASE = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
_BIN_BASE = {"diffusers": "diffusion_pytorch_model", "transformers": "pytorch_model"}
_AGAIN = "download the folder again"
_COMPLETE = "use a complete diffusers folder"
_DEPRECATED_VAE = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_VAE_KEY = re.compile(r"(.*\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)")


def read_json(path: Path) -> dict:
    """A small JSON object file; anything else is a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(path, "missing file", "the diffusers folder is incomplete: download it again")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(path, "JSON file over 16 MB", "this is not a diffusers config file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid JSON ({exc})", "the file is damaged: download it again") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, "JSON is not an object", "the file is damaged: download it again")
    return value


def read_model_index(folder: Path) -> dict[str, str]:
    """Components present (name -> class name), after checking every class name against the known set."""
    index_path = folder / "model_index.json"
    index = read_json(index_path)
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
        raise CheckpointError(
            index_path, f"unsupported pipeline class {str(pipeline)[:80]!r}",
            f"supported: {', '.join(sorted(PIPELINES))}",
        )
    components = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue  # metadata and flags such as requires_safety_checker
        if value in ([None, None], []):
            continue
        if len(value) != 2 or tuple(value) not in COMPONENT_CLASSES:
            raise CheckpointError(
                index_path, f"component {name!r} names an unknown class {str(value)[:80]}",
                "only Stable Diffusion components are loaded; nothing is imported by name",
            )
        components[name] = value[1]
    return components


def allowed_roots(folder: Path) -> list[Path]:
    """Where a weight file may resolve to: the folder, and a Hugging Face cache's blob store above it."""
    root = folder.resolve()
    roots = [root]
    for ancestor in [folder.absolute(), *folder.absolute().parents]:
        if ancestor.parent.name == "snapshots":
            roots.append((ancestor.parent.parent / "blobs").resolve())
            break
    return roots


def _checked(file: Path, roots: list[Path]) -> Path:
    real = file.resolve()
    if not any(real.is_relative_to(root) for root in roots):
        raise CheckpointError(
            file, f"symlink points outside the model folder (to {real})", "copy the real file into the folder"
        )
    return file


def _candidates(folder: Path, library: str, variant: str | None) -> list[Path]:
    base, bin_base = _WEIGHT_BASE[library], _BIN_BASE[library]
    variants = [variant, None] if variant else [None, "fp16"]
    names = []
    for v in variants:
        dot = f".{v}" if v else ""
        names += [f"{base}{dot}.safetensors", f"{base}.safetensors.index{dot}.json", f"{bin_base}{dot}.bin",
                  f"{bin_base}.bin.index{dot}.json"]
    return [folder / name for name in names]


def load_component_weights(
    folder: Path, library: str, roots: list[Path], variant: str | None = None
) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The state dict of one component folder, and the weight files it came from."""
    for candidate in _candidates(folder, library, variant):
        if not candidate.exists() and not candidate.is_symlink():
            continue
        if not candidate.name.endswith(".json"):
            return load_state_dict(_checked(candidate, roots))[0], [candidate]
        index = read_json(_checked(candidate, roots))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(candidate, "shard index without a weight_map", "download the folder again")
        shards = sorted(set(weight_map.values()), key=str)
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not isinstance(shard, str) or not re.fullmatch(r"[\w.\-]+", shard) or shard.startswith(".."):
                raise CheckpointError(candidate, f"shard name {str(shard)[:80]!r} is not a plain file name", _AGAIN)
            state.update(load_state_dict(_checked(folder / shard, roots))[0])
        missing = [name for name in weight_map if name not in state]
        if missing:
            problem = f"{len(missing)} tensors of the index are in no shard (e.g. {missing[0]!r})"
            raise CheckpointError(candidate, problem, _AGAIN)
        return state, [folder / shard for shard in shards]
    raise CheckpointError(folder, "no weights file (diffusion_pytorch_model / model .safetensors or .bin)", _AGAIN)


def normalize_vae_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Folders saved by diffusers < 0.14 name the VAE's mid attention query/key/value/proj_attn."""
    out = {}
    for key, tensor in state.items():
        old = _DEPRECATED_VAE_KEY.fullmatch(key)
        out[f"{old[1]}.{_DEPRECATED_VAE[old[2]]}.{old[3]}" if old else key] = tensor
    return out


def folder_family(components: dict[str, str], text_config: dict | None) -> str:
    """sdxl / sdxl_refiner by their second text encoder, sd2 by OpenCLIP's gelu, otherwise sd1."""
    if "text_encoder_2" in components:
        return "sdxl" if "text_encoder" in components else "sdxl_refiner"
    return "sd2" if (text_config or {}).get("hidden_act") == "gelu" else "sd1"


def _encoder_names(family: str) -> list[tuple[str, str]]:
    if family == "sdxl":
        return [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    if family == "sdxl_refiner":
        return [("text_encoder_2", "tokenizer_2")]
    return [("text_encoder", "tokenizer")]


def read_folder_configs(folder: str | Path) -> dict:
    """Configs of a diffusers folder (weights not needed): unet, vae, text encoders, scheduler, tokenizer dirs."""
    folder = Path(folder)
    components = read_model_index(folder)
    for needed in ("unet", "vae", "scheduler"):
        if needed not in components:
            raise CheckpointError(folder / "model_index.json", f"component {needed!r} is missing", _COMPLETE)
    first_text = folder / "text_encoder" / "config.json"
    family = folder_family(components, read_json(first_text) if "text_encoder" in components else None)
    encoders = _encoder_names(family)
    for encoder, tokenizer in encoders:
        for needed in (encoder, tokenizer):
            if needed not in components:
                raise CheckpointError(folder / "model_index.json", f"component {needed!r} is missing", _COMPLETE)
    return {
        "family": family,
        "components": components,
        "unet": read_json(folder / "unet" / "config.json"),
        "vae": read_json(folder / "vae" / "config.json"),
        "text_encoders": [read_json(folder / encoder / "config.json") for encoder, _ in encoders],
        "scheduler": read_json(folder / "scheduler" / "scheduler_config.json"),
        "tokenizer_dirs": [folder / tokenizer for _, tokenizer in encoders],
        "encoder_names": [encoder for encoder, _ in encoders],
    }


def read_diffusers_folder(
    folder: str | Path, *, prediction: str | None = None, variant: str | None = None
) -> CheckpointParts:
    """A diffusers pipeline folder -> CheckpointParts (weights mmapped where they are safetensors)."""
    folder = Path(folder)
    prediction = check_prediction(prediction)
    configs = read_folder_configs(folder)
    roots = allowed_roots(folder)
    unet_state, unet_files = load_component_weights(folder / "unet", "diffusers", roots, variant)
    vae_state, vae_files = load_component_weights(folder / "vae", "diffusers", roots, variant)
    files = unet_files + vae_files
    text_encoders = []
    for name, config in zip(configs["encoder_names"], configs["text_encoders"]):
        state, text_files = load_component_weights(folder / name, "transformers", roots, variant)
        text_encoders.append((config, normalize_clip_names(state)))
        files += text_files
    scheduler = dict(configs["scheduler"])
    if prediction is None:
        prediction = "v" if scheduler.get("prediction_type") == "v_prediction" else "eps"
    scheduler.setdefault("_class_name", default_scheduler_config(configs["family"], prediction)["_class_name"])
    scheduler["prediction_type"] = "v_prediction" if prediction == "v" else "epsilon"
    return CheckpointParts(
        family=configs["family"],
        variant="inpaint" if configs["unet"].get("in_channels") == 9 else "base",
        prediction=prediction,
        unet_config=configs["unet"],
        unet_state=unet_state,
        vae_config=configs["vae"],
        vae_state=normalize_vae_names(vae_state),
        text_encoders=text_encoders,
        tokenizer_dirs=configs["tokenizer_dirs"],
        scheduler_config=scheduler,
        source=folder,
        weight_files=tuple(files),
    )
