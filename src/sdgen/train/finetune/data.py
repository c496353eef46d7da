"""A folder of captioned images for fine-tuning, as kohya-ss sd-scripts and the diffusers training
examples take them, grouped into aspect-ratio buckets (NovelAI 2022, kohya's BucketManager).

Captions: `<image stem>.txt` (or `.caption`) beside each image, or a `metadata.jsonl` whose rows
are `{"file_name": "a.png", "text": "caption"}` (the diffusers ImageFolder layout; the caption
column is configurable). Images without a caption take `default_caption` (DreamBooth's instance
prompt) or are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdgen.errors import UserError
from sdgen.pipelines.images import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIXES = (".txt", ".caption")


class DatasetError(UserError, ValueError):
    """A training folder that cannot be used: the message names the file and the fix."""


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    caption: str


def read_image_folder(folder: str | Path, default_caption: str | None = None,
                      caption_column: str = "text") -> list[TrainingImage]:
    """Images of `folder` (sorted by name) with their captions; see the module docstring."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such image folder")
    from_metadata: dict[str, str] = {}
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                from_metadata[str(row["file_name"])] = str(row[caption_column])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DatasetError(f"{metadata}:{number}: expected a JSON object with \"file_name\" and "
                                   f"\"{caption_column}\"") from None
    images = []
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption = from_metadata.get(path.name)
        for suffix in CAPTION_SUFFIXES:
            if caption is None and path.with_suffix(suffix).is_file():
                caption = path.with_suffix(suffix).read_text(encoding="utf-8").strip()
        if caption is None:
            caption = default_caption
        if caption is None:
            raise DatasetError(f"{path}: no caption; add {path.stem}.txt, a metadata.jsonl row, "
                               "or give a caption for every image (--caption)")
        images.append(TrainingImage(path, caption))
    if not images:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return images


@dataclass(frozen=True)
class CaptionOptions:
    """kohya-ss's caption augmentations: `shuffle` the comma-separated tags after the first
    `keep_tokens`, drop each of those tags with `tag_dropout`, the whole caption with `dropout`
    (an empty caption teaches the unconditional prediction that guidance needs)."""

    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tag_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"caption {name} must be between 0 and 1, got {getattr(self, name)}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")

    def apply(self, caption: str, rng: np.random.Generator) -> str:
        """The caption as seen at one training step."""
        if self.dropout and rng.random() < self.dropout:
            return ""
        if not (self.shuffle or self.tag_dropout):
            return caption
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        if self.tag_dropout:
            rest = [tag for tag in rest if rng.random() >= self.tag_dropout]
        if self.shuffle:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        return ", ".join(kept + rest)


def make_buckets(resolution: int, step: int, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with at most resolution^2 pixels; for each width
    the tallest height that fits (kohya's `make_bucket_resolutions`)."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} must be a multiple of {step}")
    min_side = min_side or max(step, resolution // 2)
    max_side = max_side or resolution * 2
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_bucketed(path: Path, bucket: tuple[int, int]) -> torch.Tensor:
    """Image as (3, h, w) in [-1, 1]: scaled to cover the bucket, centre-cropped to it."""
    with read_image(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1).div(127.5).sub(1.0)


class BucketSchedule:
    """Which images form the batch of each step: each epoch shuffles every bucket's images, cuts
    them into batches and shuffles the batches, all from (seed, epoch), so a step's batch is a pure
    function of the step and a resumed run sees the same data."""

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.members: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.members.setdefault(bucket, []).append(index)
        self.batches_per_epoch = sum(math.ceil(len(m) / batch_size) for m in self.members.values())

    def epoch(self, number: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, number])
        batches = []
        for bucket in sorted(self.members):
            members = self.members[bucket]
            order = [members[i] for i in rng.permutation(len(members))]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch(self, step: int) -> list[int]:
        number, position = divmod(step, self.batches_per_epoch)
        return self.epoch(number)[position]
