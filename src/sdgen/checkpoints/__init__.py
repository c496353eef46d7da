"""Reading checkpoints safely: safetensors, restricted-pickle .ckpt/.pt, diffusers folders, original key maps."""

from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.formats import file_sha256, load_state_dict
from sdgen.checkpoints.parts import CheckpointParts
from sdgen.checkpoints.reader import read_checkpoint, read_vae

__all__ = ["CheckpointError", "CheckpointParts", "file_sha256", "load_state_dict", "read_checkpoint", "read_vae"]
