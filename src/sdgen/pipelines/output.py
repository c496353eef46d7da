"""Writing images: atomic files (temp + rename) with the infotext in a PNG `parameters` chunk."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdgen.runtime.files import write_atomically


def png_with_parameters(image: Image.Image, infotext: str | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    return info


def save_png_atomic(image: Image.Image, path: str | os.PathLike, infotext: str | None = None) -> Path:
    """Write `image` to `path` so that no reader ever sees a half-written file."""
    pnginfo = png_with_parameters(image, infotext)
    return write_atomically(path, lambda handle: image.save(handle, format="PNG", pnginfo=pnginfo))


def next_free_index(folder: Path) -> int:
    """A1111-style running number: one past the highest `NNNNN-` prefix in the folder."""
    highest = -1
    if folder.is_dir():
        for entry in folder.iterdir():
            head = entry.name.split("-", 1)[0]
            if head.isdigit():
                highest = max(highest, int(head))
    return highest + 1

