"""Textual-inversion embeddings (Gal et al. 2022) in the file formats AUTOMATIC1111 1.10 reads.

- webui / original textual_inversion `.pt`: `{"string_to_param": {"*": tensor(n, dim)}, "name", "step", ...}`
- webui `.safetensors`: `{"emb_params": tensor(n, dim)}`
- diffusers concepts: `{"<token>": tensor(n, dim)}` (a single tensor, `(dim,)` meaning one vector)
- SDXL: `{"clip_l": tensor(n, 768), "clip_g": tensor(n, 1280)}`, one set per text encoder

An embedding is used by its file stem: a prompt word that tokenizes like the name is replaced by
the embedding's vectors (the encoder does this). Pickled `.pt` files go through the restricted
unpickler of `sdgen.checkpoints`, never `torch.load`. Loading a folder follows webui: an unreadable
file is reported and skipped, an embedding of another width than the model's is listed as skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.formats import file_sha256, load_state_dict, sniff_format
from sdgen.checkpoints.pickle_io import load_pickle
from sdgen.errors import UserError

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")
MAX_VECTORS = 75  # one prompt chunk: a longer embedding can never be placed


class EmbeddingError(UserError):
    """An embedding file that cannot be used: `path: problem`."""


@dataclass(frozen=True)
class Embedding:
    """Vectors per text encoder: key "" for single-encoder models, "clip_l"/"clip_g" for SDXL."""

    name: str
    vectors: Mapping[str, torch.Tensor]
    path: Path | None = None
    step: int | None = None

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def dim(self) -> int:
        """Width as webui compares it with the model's: the sum over encoders for SDXL."""
        return sum(v.shape[-1] for v in self.vectors.values())

    def vectors_for(self, key: str | None = None) -> torch.Tensor:
        """The (n, dim) vectors for one text encoder (`key` "clip_l"/"clip_g" for SDXL files)."""
        if key in self.vectors:
            return self.vectors[key]
        if "" in self.vectors:
            return self.vectors[""]
        raise EmbeddingError(f"embedding {self.name!r} has vectors for {', '.join(self.vectors)}, not for {key!r}")

    @property
    def shorthash(self) -> str | None:
        """First 12 hex digits of the file's sha256, as webui's "TI hashes" infotext shows."""
        return file_sha256(self.path)[:12] if self.path is not None else None


def _matrix(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"{what} is not a floating-point tensor")
    matrix = value.detach().unsqueeze(0) if value.ndim == 1 else value.detach()
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)}, expected (vectors, width)")
    return matrix.to(torch.float32)


def embedding_from_data(data: Any, name: str, path: Path | None = None) -> Embedding:
    """An Embedding from the object a file holds, in any of the formats above."""
    if not isinstance(data, Mapping):
        raise ValueError(f"holds a {type(data).__name__}, not a dict")
    step = data.get("step") if type(data.get("step")) is int else None
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise ValueError("string_to_param must hold exactly one tensor (multi-term embeddings are not supported)")
        vectors = {"": _matrix(next(iter(params.values())), "string_to_param")}
    elif all(key in data for key in SDXL_KEYS):
        vectors = {key: _matrix(data[key], key) for key in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise ValueError("clip_l and clip_g hold different numbers of vectors")
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise ValueError("not a textual-inversion embedding (expected string_to_param, emb_params, "
                             "clip_l + clip_g, or a single tensor)")
        key, tensor = next(iter(tensors.items()))
        vectors = {"": _matrix(tensor, repr(key))}
    return Embedding(name, vectors, path, step)


def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Load one embedding file; the name defaults to the file stem. Errors name the file."""
    path = Path(path)
    try:
        if sniff_format(path) == "safetensors":
            data: Any = load_state_dict(path)[0]
        else:
            data = load_pickle(path)
        return embedding_from_data(data, name or path.stem, path)
    except CheckpointError as error:
        raise EmbeddingError(str(error)) from None
    except ValueError as error:
        raise EmbeddingError(f"{path}: {error}") from None


@dataclass
class EmbeddingLibrary:
    """Embeddings by name, and what was left out: `skipped` (name -> reason: width, length,
    duplicate) and `errors` (file -> one-line error)."""

    embeddings: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.embeddings

    def __getitem__(self, name: str) -> Embedding:
        return self.embeddings[name]

    def __len__(self) -> int:
        return len(self.embeddings)

    def add(self, embedding: Embedding, expected_dim: int | None = None) -> bool:
        """Register an embedding unless its width, length or name rules it out (then `skipped`)."""
        reason = None
        if expected_dim is not None and embedding.dim != expected_dim:
            reason = f"width {embedding.dim}, the model's text encoder expects {expected_dim}"
        elif embedding.num_vectors > MAX_VECTORS:
            reason = f"{embedding.num_vectors} vectors do not fit in one {MAX_VECTORS}-token chunk"
        elif embedding.name in self.embeddings:
            reason = f"duplicate name (already loaded from {self.embeddings[embedding.name].path})"
        if reason is not None:
            self.skipped[embedding.name] = reason
            log.warning("textual inversion embedding %r skipped: %s", embedding.name, reason)
            return False
        self.embeddings[embedding.name] = embedding
        return True

    @classmethod
    def load_folder(cls, folder: str | Path, expected_dim: int | None = None,
                    warn: Callable[[str], None] | None = None) -> EmbeddingLibrary:
        """Every embedding file under `folder` (subfolders too, in sorted order; symlinks that lead
        outside the folder are refused); `expected_dim` is the model's text-encoder width
        (768 SD 1.x, 1024 SD 2.x, 768 + 1280 SDXL)."""
        root = Path(folder)
        if not root.is_dir():
            raise EmbeddingError(f"{root}: no such embeddings folder; create it or pass another --embeddings-dir")
        real_root = root.resolve()
        library = cls()
        for path in _embedding_files(root):
            try:
                if not path.resolve().is_relative_to(real_root):
                    raise EmbeddingError(f"{path}: a link that leads outside {root}; refused")
                if path.stat().st_size == 0:
                    continue  # webui skips empty files silently
                library.add(read_embedding(path), expected_dim)
            except (EmbeddingError, OSError) as error:
                message = " ".join(str(error).split())
                library.errors[str(path)] = message
                (warn or log.warning)(message)
        return library


def _embedding_files(root: Path) -> list[Path]:
    files = []
    for directory, subdirectories, names in os.walk(root):  # does not follow symlinked folders
        subdirectories.sort()
        files += [Path(directory, n) for n in sorted(names) if n.lower().endswith(EMBEDDING_SUFFIXES)]
    return files
