"""What every reader returns: configs plus state dicts in diffusers / transformers names, and the file's identity."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdgen.checkpoints.formats import file_sha256

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}  # ours -> diffusers' scheduler `prediction_type`


@dataclass
class CheckpointParts:
    """A model ready to build: `unet_state` etc. load with `load_state_dict(strict=True, assign=True)`."""

    family: str  # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    variant: str  # "base" | "inpaint"
    prediction: str  # "eps" | "v"
    unet_config: dict
    unet_state: dict[str, torch.Tensor]
    vae_config: dict | None  # None: the file has no VAE weights, the loader needs one given (--vae)
    vae_state: dict[str, torch.Tensor]
    text_encoders: list[tuple[dict, dict[str, torch.Tensor]]]  # (transformers config, state) per encoder
    tokenizer_dirs: list[Path | None]  # None: the packaged CLIP vocabulary
    scheduler_config: dict
    source: Path
    metadata: dict[str, str] = field(default_factory=dict)
    weight_files: tuple[Path, ...] = ()  # the files the hash covers

    def sha256(self) -> str:
        """A single file's sha256 (AUTOMATIC1111's); for a folder, sha256 of its weight files' `path:sha256` lines."""
        if self.source.is_file():
            return file_sha256(self.source)
        files = sorted(self.weight_files)
        lines = "".join(f"{file.relative_to(self.source).as_posix()}:{file_sha256(file)}\n" for file in files)
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's "Model hash": the first 10 hex digits of the sha256 (computed once, then cached)."""
        return self.sha256()[:10]


def check_prediction(prediction: str | None) -> str | None:
    """Validate a user's `prediction` choice ('eps' or 'v'; 'epsilon' / 'v_prediction' accepted too)."""
    if prediction is None:
        return None
    aliases = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}
    if prediction not in aliases:
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    return aliases[prediction]


def default_scheduler_config(family: str, prediction: str) -> dict:
    """The training noise schedule every SD family shares (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    return {
        "_class_name": "EulerDiscreteScheduler" if family.startswith("sdxl") else "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": PREDICTIONS[prediction],
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "timestep_spacing": "leading",
    }
