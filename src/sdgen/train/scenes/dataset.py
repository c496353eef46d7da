"""The scene data set: deterministic, seeded, unlimited, random access by index.

Item i draws everything from its own generator seeded (seed, split, i), so any batch can be
rebuilt alone (resuming training needs no data-loader state) and the two splits never share a
stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch

from sdgen.train.scenes.captions import write_caption
from sdgen.train.scenes.layout import FAMILIES, SPLITS, Scene, sample_scene
from sdgen.train.scenes.parse import claims_heldout, parse_caption
from sdgen.train.scenes.render import render

_SPLIT_KEY = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class SceneBatch:
    """images: float (N, 3, H, W) in [-1, 1]; captions and records in the same order."""

    images: torch.Tensor
    captions: list[str]
    records: list[Scene]


class SceneDataset:
    """Procedural captioned scenes (docs/SCENES.md): `batch(k)` is items k*batch_size ... onwards."""

    def __init__(self, seed: int, size: int = 64, split: str = "train",
                 families: tuple[str, ...] = FAMILIES, batch_size: int = 32) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        families = tuple(families)
        if not families or any(f not in FAMILIES for f in families):
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families!r}")
        if not 16 <= size <= 1024 or size % 8:
            raise ValueError(f"size must be a multiple of 8 in 16..1024, got {size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.seed, self.size, self.split = int(seed), size, split
        self.families, self.batch_size = families, batch_size

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, _SPLIT_KEY[self.split], index])

    def item(self, index: int) -> tuple[np.ndarray, str, Scene]:
        """(uint8 image (H, W, 3), caption, record) of item `index`."""
        if index < 0:
            raise ValueError(f"item index must be >= 0, got {index}")
        rng = self._rng(index)
        scene = sample_scene(rng, self.split, self.families)
        return render(scene, self.size), write_caption(scene, rng), scene

    def batch(self, index: int) -> SceneBatch:
        """Batch `index`: images scaled to [-1, 1], as the autoencoder and U-Net train on them."""
        start = index * self.batch_size
        items = [self.item(i) for i in range(start, start + self.batch_size)]
        pixels = np.stack([image for image, _, _ in items])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return SceneBatch(images.contiguous(), [c for _, c, _ in items], [r for _, _, r in items])

    def __iter__(self) -> Iterator[SceneBatch]:
        index = 0
        while True:
            yield self.batch(index)
            index += 1


@lru_cache(maxsize=4)
def _heldout_prompts(count: int) -> tuple[str, ...]:
    prompts: list[str] = []
    quotas = {"shapes": count * 2 // 3, "landscapes": count - count * 2 // 3}
    for family, quota in quotas.items():
        dataset = SceneDataset(seed=20240601, split="heldout", families=(family,))
        index, found = 0, 0
        while found < quota:
            rng = dataset._rng(index)
            scene = sample_scene(rng, "heldout", (family,))
            caption = write_caption(scene, rng)
            index += 1
            # the caption itself must name the held-out combination, and each prompt appears once
            if caption not in prompts and claims_heldout(parse_caption(caption)):
                prompts.append(caption)
                found += 1
    return tuple(prompts)


def heldout_prompts(count: int = 150) -> list[str]:
    """The fixed evaluation prompts for `sdgen eval`: each names a combination training never shows."""
    if not 3 <= count <= 1000:
        raise ValueError(f"count must be in 3..1000, got {count}")
    return list(_heldout_prompts(count))
