"""Writing images: atomic files (temp + rename) with the infotext in a PNG `parameters` chunk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin


def png_with_parameters(image: Image.Image, infotext: str | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    return info


def save_png_atomic(image: Image.Image, path: str | os.PathLike, infotext: str | None = None) -> Path:
    """Write `image` to `path` so that no reader ever sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=png_with_parameters(image, infotext))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def next_free_index(folder: Path) -> int:
    """A1111-style running number: one past the highest `NNNNN-` prefix in the folder."""
    highest = -1
    if folder.is_dir():
        for entry in folder.iterdir():
            head = entry.name.split("-", 1)[0]
            if head.isdigit():
                highest = max(highest, int(head))
    return highest + 1

