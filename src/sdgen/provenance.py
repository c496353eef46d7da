"""What happens to generated images before anyone sees them, and what they say about where they came from.

Every pipeline result goes through `finish_images`: the safety checker (when the model folder
has one and it is on) blacks out flagged images, then every image whose shorter side is at
least 256 px gets sdgen's invisible watermark (unless turned off). Each image's infotext records
the outcome: `Watermark: sdgen dwtDct`, `Watermark: none (under 256 px)`, `Safety checker:
flagged`. Saving with `metadata=False` (`--strip-metadata`) writes no text at all; the
watermark is in the pixels and stays.

`preflight` runs before a job allocates anything: the memory estimate, and whether the
watermark package is there when the job's images will need it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sdgen.runtime.memory import check_job_memory
from sdgen.safety.checker import SafetyFilter, has_safety_checker, load_safety_checker
from sdgen.safety.watermark import (
    INSTALL_HINT, METHOD, MIN_SIDE, WatermarkUnavailable, add_watermark, can_carry_watermark, read_watermark,
    watermark_available,
)

log = logging.getLogger(__name__)
WATERMARK_APPLIED = f"sdgen {METHOD}"
WATERMARK_TOO_SMALL = f"none (under {MIN_SIDE} px)"


@dataclass
class FinishedImages:
    """Images ready to save, with their infotexts and what was done to each."""

    images: list[Image.Image]
    infotexts: list[str]
    nsfw: list[bool] = field(default_factory=list)
    watermarked: list[bool] = field(default_factory=list)


def add_infotext_fields(infotext: str, fields: dict[str, str]) -> str:
    """Append `Key: value` pairs to the parameters line of an infotext."""
    pairs = ", ".join(f"{key}: {value}" for key, value in fields.items())
    if not pairs:
        return infotext
    return f"{infotext}, {pairs}" if infotext else pairs


def finish_images(images: list[Image.Image], infotexts: list[str], *, safety: SafetyFilter | None = None,
                  watermark: bool = True) -> FinishedImages:
    """Safety screen, then watermark; infotexts extended with what happened (see the module docstring)."""
    if not images:
        return FinishedImages([], list(infotexts))
    nsfw = [False] * len(images)
    if safety is not None:
        images, nsfw = safety.screen(images)
    finished, texts, marked = [], [], []
    for image, infotext, flagged in zip(images, infotexts, nsfw):
        extra = {}
        applied = False
        if flagged:
            extra["Safety checker"] = "flagged"
        elif watermark and can_carry_watermark(image):
            image, applied = add_watermark(image), True
            extra["Watermark"] = WATERMARK_APPLIED
        elif watermark:
            extra["Watermark"] = WATERMARK_TOO_SMALL
        finished.append(image)
        texts.append(add_infotext_fields(infotext, extra))
        marked.append(applied)
    return FinishedImages(finished, texts, nsfw, marked)


def attach_provenance(pipeline, path: str | os.PathLike | None, *, safety_checker: bool = True,
                      watermark: bool = True):
    """Give a loaded pipeline its safety checker (from `path/safety_checker/` when present and on) and watermark setting."""
    folder = Path(path) if path is not None else None
    present = folder is not None and folder.is_dir() and has_safety_checker(folder)
    pipeline.safety_checker = None
    if present and safety_checker:
        pipeline.safety_checker = load_safety_checker(folder, pipeline.device, pipeline.dtype)
    elif present:
        log.warning("the safety checker of %s is turned off: generated images are not screened", folder)
    pipeline.watermark = watermark
    return pipeline


def preflight(pipeline, request) -> None:
    """Checks before a job allocates: memory estimate, and the watermark package when images will need it."""
    check_job_memory(pipeline, request)
    sizes = [(request.width, request.height)]
    if getattr(request, "hires_size", None):
        sizes.append(request.hires_size)
    if getattr(pipeline, "watermark", True) and any(min(size) >= MIN_SIDE for size in sizes if all(size)):
        if not watermark_available():
            raise WatermarkUnavailable(f"images of {MIN_SIDE} px or more carry an invisible watermark, but the "
                                       f"invisible-watermark package is not installed: {INSTALL_HINT}")


def describe_watermark(image: Image.Image) -> str:
    """One line for `sdgen info`: whether sdgen's invisible watermark is in the image."""
    try:
        return read_watermark(image).reason
    except WatermarkUnavailable as error:
        return f"unknown: {error}"
