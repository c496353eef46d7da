"""Output file names: A1111's running number by default, or a pattern such as `{seed}-{prompt_words}`.

Fields (A1111's filename pattern names, written in braces): number, seed, subseed, prompt,
prompt_spaces, prompt_words, negative_prompt, steps, cfg, sampler, scheduler, width, height,
model, model_hash, date, datetime, index (the image's place in the request). Every value and the
whole name are sanitized: no path separators, no characters Windows forbids, no leading dots or
spaces, at most 128 characters per field and 200 in all, so a name never leaves the output folder.
An existing file is never overwritten: `-1`, `-2`, ... is appended.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from sdgen.errors import UserError
from sdgen.pipelines.image_files import EXTENSIONS, image_format as pil_format, save_image_atomic
from sdgen.pipelines.infotext import parse_infotext
from sdgen.pipelines.output import next_free_index

FIELDS = ("number", "seed", "subseed", "prompt", "prompt_spaces", "prompt_words", "negative_prompt", "steps",
          "cfg", "sampler", "scheduler", "width", "height", "model", "model_hash", "date", "datetime", "index")
_FIELD = re.compile(r"\{(\w*)\}")
_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_NON_WORD = re.compile(r"[\W_]+")
_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)
MAX_FIELD, MAX_NAME, PROMPT_WORDS = 128, 200, 8


class OutputError(UserError):
    """An image could not be written (disk full, read-only folder); no partial file is left."""


class FilenamePatternError(UserError, ValueError):
    """A filename pattern naming a field we do not know."""


def sanitize(text: str, replace_spaces: bool = False) -> str:
    """One file-name part: forbidden characters -> `_`, no leading spaces or dots, no trailing ones."""
    text = _FORBIDDEN.sub("_", str(text))
    if replace_spaces:
        text = text.replace(" ", "_")
    return text.lstrip(" .")[:MAX_FIELD].rstrip(" .")


def check_pattern(pattern: str) -> None:
    """FilenamePatternError for an unknown `{field}`, naming the known ones."""
    for name in _FIELD.findall(pattern):
        if name not in FIELDS:
            raise FilenamePatternError(f"unknown filename field {{{name}}}; use {', '.join('{%s}' % f for f in FIELDS)}")


def pattern_fields(infotext: str, index: int, number: int) -> dict[str, str]:
    """Field values for one image, read from its infotext (so they are what the image records)."""
    params = parse_infotext(infotext)
    prompt = params.get("Prompt", "")
    words = [w for w in _NON_WORD.split(prompt) if w][:PROMPT_WORDS] or ["empty"]
    now = datetime.datetime.now()
    return {
        "number": f"{number:05d}",
        "seed": params.get("Seed", ""),
        "subseed": params.get("Variation seed", ""),
        "prompt": sanitize(prompt, replace_spaces=True),
        "prompt_spaces": sanitize(prompt),
        "prompt_words": sanitize(" ".join(words)),
        "negative_prompt": sanitize(params.get("Negative prompt", ""), replace_spaces=True),
        "steps": params.get("Steps", ""),
        "cfg": params.get("CFG scale", ""),
        "sampler": sanitize(params.get("Sampler", "")),
        "scheduler": sanitize(params.get("Schedule type", "")),
        "width": params.get("Size-1", ""),
        "height": params.get("Size-2", ""),
        "model": sanitize(params.get("Model", "")),
        "model_hash": sanitize(params.get("Model hash", "")),
        "date": now.strftime("%Y-%m-%d"),
        "datetime": now.strftime("%Y%m%d%H%M%S"),
        "index": str(index),
    }


def format_name(pattern: str, values: dict[str, str]) -> str:
    """The file stem for `pattern`: fields substituted, then the whole name sanitized again."""
    check_pattern(pattern)
    name = _FIELD.sub(lambda m: sanitize(values.get(m.group(1), "")), pattern)
    name = sanitize(name)[:MAX_NAME].rstrip(" .")
    if not name or set(name) <= {"_", "-"}:
        name = f"image{name}"
    if _RESERVED.match(name):
        name = "_" + name
    return name


def free_path(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/stem+suffix`, or with `-1`, `-2`, ... appended when taken; always directly inside `folder`."""
    candidate = folder / f"{stem}{suffix}"
    counter = 1
    while candidate.exists():
        candidate = folder / f"{stem}-{counter}{suffix}"
        counter += 1
    if candidate.resolve().parent != folder.resolve():
        raise UserError(f"refusing to write {candidate}: it is outside {folder}")
    return candidate


def save_images(images: Sequence[Image.Image], infotexts: Sequence[str], folder: Path, *,
                pattern: str | None = None, image_format: str = "png", request=None,
                seeds: Sequence[int] = (), metadata: bool = True) -> list[Path]:
    """Save each image with its infotext; `NNNNN-SEED` names by default, else `pattern` (see FIELDS).

    `metadata=False` writes no infotext (`--strip-metadata`); names still use the parameters."""
    fmt = pil_format(image_format)
    if pattern is not None:
        check_pattern(pattern)
    folder = Path(folder)
    start = next_free_index(folder)
    paths = []
    for i, (image, infotext) in enumerate(zip(images, infotexts)):
        if pattern is None:
            seed = seeds[i] if i < len(seeds) else parse_infotext(infotext).get("Seed", "")
            stem = f"{start + i:05d}-{seed}"
        else:
            stem = format_name(pattern, pattern_fields(infotext, i, start + i))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = free_path(folder, stem, EXTENSIONS[fmt])
            paths.append(save_image_atomic(image, path, infotext if metadata else None, fmt))
        except OSError as error:  # disk full, read-only or missing folder: the reason, not a traceback
            saved = f" ({len(paths)} image(s) saved before it)" if paths else ""
            raise OutputError(f"cannot write images to {folder}: {error.strerror or error}{saved}; "
                              "free some space or choose another output folder") from None
    return paths


def save_grid(grid: Image.Image, infotext: str | None, folder: Path, *, image_format: str = "png",
              prefix: str = "grid") -> Path:
    """Save a grid as `grid-NNNN` (A1111's grid naming) beside the images."""
    fmt = pil_format(image_format)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(p.stem.split("-")[1]) for p in folder.glob(f"{prefix}-*") if re.fullmatch(rf"{prefix}-\d+", p.stem)]
    number = max(taken, default=-1) + 1
    return save_image_atomic(grid, free_path(folder, f"{prefix}-{number:04d}", EXTENSIONS[fmt]), infotext, fmt)
