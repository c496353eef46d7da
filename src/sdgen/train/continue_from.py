"""Continuing the recipe from an exported model folder instead of a run folder.

A run folder holds checkpoints with optimizer state; the exported folder (the shipped model)
holds only fp16 weights and `training.json`, the step each stage had reached. That is enough to
resume on a machine that has the package but not the run: each stage starts from the exported
weights at its recorded step, with fresh optimizer moments (a warm restart at the scheduled
learning rate).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdgen.checkpoints.formats import load_state_dict
from sdgen.errors import UserError
from sdgen.train.checkpoint import save_checkpoint

TRAINING_RECORD = "training.json"

# stage -> its weights in the exported folder (the whole small CLIP lives in clip/); the decoder
# stage fine-tunes the autoencoder's decoder, so both are in vae/
STAGE_WEIGHTS = {
    "autoencoder": "vae/diffusion_pytorch_model.safetensors",
    "decoder": "vae/diffusion_pytorch_model.safetensors",
    "clip": "clip/model.safetensors",
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "tiny_decoder": "tiny_decoder.safetensors",
}


# every export has these; the decoder stages are optional (a recipe without [decoder] or
# [tiny_decoder] skips it)
REQUIRED_STAGES = ("autoencoder", "clip", "unet")


def write_training_record(folder: Path, steps: dict[str, int]) -> None:
    (folder / TRAINING_RECORD).write_text(json.dumps({"steps": steps}, indent=2) + "\n")


def read_training_record(folder: Path) -> dict[str, int]:
    path = folder / TRAINING_RECORD
    if not path.is_file():
        raise UserError(f"{folder}: no {TRAINING_RECORD}, so the step each stage reached is unknown; "
                        "pass a folder written by `sdgen train export`")
    try:
        steps = json.loads(path.read_text())["steps"]
        recorded = {stage: int(steps[stage]) for stage in STAGE_WEIGHTS if stage in steps}
        missing = [stage for stage in REQUIRED_STAGES if stage not in recorded]
        if missing:
            raise KeyError(", ".join(missing))
        return recorded
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a training record ({error}); re-export the model") from None


def seed_run(run_dir: Path, folder: Path, models: dict[str, torch.nn.Module]) -> list[str]:
    """Write `run_dir/<stage>/checkpoint.pt` from `folder` for each stage in `models` that has no
    checkpoint yet and a step in the folder's record (a run's own progress is never replaced).
    Returns the stages seeded."""
    steps = read_training_record(folder)
    seeded = []
    for stage, model in models.items():
        checkpoint = run_dir / stage / "checkpoint.pt"
        if checkpoint.exists() or stage not in steps:
            continue
        weights, _ = load_state_dict(folder / STAGE_WEIGHTS[stage])
        try:
            model.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
        except RuntimeError as error:
            first = str(error).strip().splitlines()[-1].strip()
            raise UserError(f"{folder / STAGE_WEIGHTS[stage]}: does not fit this config's {stage} ({first}); "
                            "use the config the model was trained with") from None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        state = model.state_dict()
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, {"model": state, "ema": state, "optimizer": optimizer.state_dict(),
                                     "step": steps[stage]})
        seeded.append(stage)
    return seeded
