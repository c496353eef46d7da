"""Training checkpoints that survive being killed mid-save: write aside, fsync, then rename."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdgen.runtime.files import write_atomically


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically replace `path` with `state`; the previous checkpoint stays intact until the rename."""
    write_atomically(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike) -> dict | None:
    """Our own checkpoint (tensors, numbers, lists only), read without running code; None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
