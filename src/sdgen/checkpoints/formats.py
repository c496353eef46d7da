"""One weights file of any supported format -> a flat state dict; format chosen by magic bytes, never by extension."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import torch

from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.pickle_io import load_pickle
from sdgen.checkpoints.safetensors_io import load_safetensors

_UNSUPPORTED = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GGUF": "a GGUF file (llama.cpp / stable-diffusion.cpp quantized format), which is not supported",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
}


def sniff_format(path: str | Path) -> str:
    """'safetensors', 'zip' (PyTorch zip pickle) or 'pickle' (legacy stream) from the first bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file", "check the path")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        raise CheckpointError(path, "the file is empty", "download it again")
    if len(head) >= 9 and head[8:9] == b"{":
        # 8-byte little-endian header length then JSON: safetensors even if its length byte is 0x80.
        (header_len,) = struct.unpack("<Q", head[:8])
        if 8 + header_len <= size or head[0] != 0x80:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:1] in (b"(", b"c", b"}", b"]", b")"):
        return "pickle"  # protocol 0/1 pickles have no header: MARK, GLOBAL or an empty container first
    for magic, what in _UNSUPPORTED.items():
        if head.startswith(magic):
            fix = "pass a .safetensors, .ckpt or .pt model file"
            raise CheckpointError(path, f"this is {what}, not a model checkpoint", fix)
    raise CheckpointError(
        path,
        f"unrecognised file format (starts with {head[:8].hex()})",
        "pass a .safetensors file, a PyTorch .ckpt/.pt/.bin file or a diffusers folder",
    )


def _unwrap(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """SD training checkpoints nest the weights: `{"state_dict": {...}, "global_step": ...}`."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        problem = f"the pickle holds a {type(obj).__name__}, not a dict of weights"
        raise CheckpointError(path, problem, "pass a model checkpoint")
    # detach(): a fresh tensor object, whatever attributes the pickle's BUILD opcodes set on the original.
    tensors = {k: v.detach() for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "the file holds no tensors", "pass a model checkpoint")
    return tensors


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat `{name: tensor}` (mmapped where the format allows) and the file's string metadata."""
    path = Path(path)
    kind = sniff_format(path)
    if kind == "safetensors":
        return load_safetensors(path)
    return _unwrap(path, load_pickle(path)), {}


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, cached per (real path, size, mtime) for this process."""
    path = Path(path)
    stat = path.stat()
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
