"""Training batches drawn from the procedural scenes, each a pure function of the step number."""

from __future__ import annotations

import numpy as np
import torch

from sdgen.train.scenes.dataset import SceneDataset
from sdgen.train.scenes.vocabulary import vocabulary_words


class SceneStream:
    """Batches for the training stages; `step` picks the items, so a resumed run sees the same data."""

    def __init__(self, data: dict) -> None:
        self.size = int(data["size"])
        self.dataset = SceneDataset(seed=int(data["seed"]), size=self.size, split="train")

    def vocabulary_words(self) -> list[str]:
        return vocabulary_words()

    def _items(self, start: int, count: int) -> tuple[torch.Tensor, list[str]]:
        items = [self.dataset.item(i) for i in range(start, start + count)]
        pixels = torch.from_numpy(np.stack([image for image, _, _ in items]))
        images = pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
        return images, [caption for _, caption, _ in items]

    def images(self, step: int, batch_size: int, crop: int | None = None) -> torch.Tensor:
        """Images only; random `crop`-sized windows when given (the autoencoder is convolutional,
        so it trains on crops as SD's did, at a fraction of the cost)."""
        images, _ = self._items(step * batch_size, batch_size)
        if crop is None or crop >= self.size:
            return images
        rng = np.random.default_rng([step, 99])
        offsets = rng.integers(0, self.size - crop + 1, size=(batch_size, 2))
        return torch.stack([img[:, y:y + crop, x:x + crop] for img, (y, x) in zip(images, offsets)])

    def captioned(self, step: int, batch_size: int, unique_captions: bool = False) -> tuple[torch.Tensor, list[str]]:
        """Images with captions; with `unique_captions`, repeated captions are dropped from the
        batch (a contrastive loss would otherwise push apart two correct pairs)."""
        images, captions = self._items(step * batch_size, batch_size)
        if not unique_captions:
            return images, captions
        first: dict[str, int] = {}
        for index, caption in enumerate(captions):
            first.setdefault(caption, index)
        keep = sorted(first.values())
        return images[keep], [captions[i] for i in keep]
