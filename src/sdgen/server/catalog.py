"""The checkpoints a server offers: `--model`, the embedded model, and a scanned `--models-dir`.

Entries carry AUTOMATIC1111's `/sdapi/v1/sd-models` fields. The title is
`"<file name> [<first 10 hex of sha256>]"` as A1111 writes it; hashes are cached in
`data_dir/hashes.json` by (path, size, mtime) so a rescan never rereads an unchanged file.
A diffusers folder's sha256 is that of its weight files' `relative/path:sha256` lines (the
same rule as `CheckpointParts.sha256`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from sdgen.checkpoints.formats import file_sha256
from sdgen.pipelines.loading import embedded_model_path
from sdgen.pipelines.request import RequestError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


@dataclass(frozen=True)
class CheckpointEntry:
    """One loadable model: where it is and how A1111 names it."""

    path: Path | None  # None: the embedded model
    filename: str
    model_name: str
    sha256: str | None

    @property
    def hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.filename} [{self.hash}]" if self.hash else self.filename

    def item(self) -> dict:
        """A `/sdapi/v1/sd-models` item."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": str(self.path) if self.path else "embedded", "config": None}

    def matches(self, name: str) -> bool:
        """A1111 accepts a title, a file name or a model name (with or without the hash)."""
        name = name.strip()
        return name in (self.title, self.filename, self.model_name) or (bool(self.hash) and name == self.hash)


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return path.suffix.lower() in CHECKPOINT_SUFFIXES


class Catalog:
    """Models by title; `refresh()` rescans the models folder (hashes from the cache when unchanged)."""

    def __init__(self, data_dir: Path, model: str | None, models_dir: str | None):
        self.cache_path = Path(data_dir) / "hashes.json"
        self.model = Path(model).expanduser() if model else None
        self.models_dir = Path(models_dir).expanduser() if models_dir else None
        self._lock = threading.Lock()
        self._cache = self._read_cache()
        self.entries: list[CheckpointEntry] = []
        self.refresh()

    def _read_cache(self) -> dict:
        try:
            data = json.loads(self.cache_path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_cache(self) -> None:
        tmp = self.cache_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._cache, indent=1))
        os.replace(tmp, self.cache_path)

    def _sha256(self, path: Path) -> str:
        """sha256 of a file, or of a folder's weight files, from the cache when size and mtime agree."""
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
        stamp = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        key = str(path.resolve())
        cached = self._cache.get(key)
        if cached and cached.get("stamp") == stamp:
            return cached["sha256"]
        if path.is_file():
            digest = file_sha256(path)
        else:
            lines = "".join(f"{p.relative_to(path).as_posix()}:{file_sha256(p)}\n" for p in files)
            digest = hashlib.sha256(lines.encode()).hexdigest()
        self._cache[key] = {"stamp": stamp, "sha256": digest}
        return digest

    def _entry(self, path: Path | None) -> CheckpointEntry:
        if path is None:
            folder = embedded_model_path()
            sha = self._sha256(folder) if (folder / "model_index.json").is_file() else None
            return CheckpointEntry(None, "sdgen-embedded", "sdgen-embedded", sha)
        name = path.name
        stem = path.stem if path.is_file() else path.name
        return CheckpointEntry(path.resolve(), name, stem, self._sha256(path))

    def refresh(self) -> list[CheckpointEntry]:
        """Rescan: the default model first, then the models folder in name order."""
        with self._lock:
            entries = [self._entry(self.model)]
            if self.models_dir is not None and self.models_dir.is_dir():
                default = entries[0].path
                for path in sorted(self.models_dir.iterdir()):
                    if _is_checkpoint(path) and path.resolve() != default:
                        entries.append(self._entry(path))
            self.entries = entries
            try:
                self._write_cache()
            except OSError:
                pass  # a read-only data folder only costs rehashing next time
            return entries

    @property
    def default(self) -> CheckpointEntry:
        return self.entries[0]

    def find(self, name: str | None) -> CheckpointEntry | None:
        """The entry a request names; None for an unknown name."""
        if name is None:
            return self.default
        for entry in self.entries:
            if entry.matches(name):
                return entry
        return None

    def require(self, name: str | None, field: str) -> CheckpointEntry:
        """The entry a request's `field` names; RequestError listing the available titles for an unknown name."""
        entry = self.find(name)
        if entry is None:
            titles = ", ".join(e.title for e in self.entries)
            raise RequestError(f"{field}: unknown model {name!r}; available: {titles}")
        return entry
