"""The scene checker: an image and the claims of its caption -> which claims hold.

Analytic throughout. Shapes: objects found by palette segmentation (segment.py); counts,
sizes (bounding box), positions (centroid cell) and relations (centroid offsets) read from them.
Landscapes: colour and region features at the fixed horizon and lake rows of the renderer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from sdgen.train.scenes.parse import CATEGORIES, Claim, Target, parse_caption
from sdgen.train.scenes.segment import DetectedObject, find_objects, nearest_colours
from sdgen.train.scenes.vocabulary import (
    COLOURS, HORIZON, LAKE_TOP, LANDSCAPE_COLOURS, POSITIONS, SIZE_SPLIT, SKY, TIMES,
)

RELATION_MARGIN = 0.05  # least centroid offset along the relation's axis, in image sides
# Rendered scenes show exactly the objects their captions count; blurred colour noise shows
# dozens of palette blobs, some of every colour and shape. Past this many extra objects an image
# is clutter, and none of its shapes claims holds.
MAX_EXTRA_OBJECTS = 2


@dataclass(frozen=True)
class ClaimResult:
    """Whether one claim holds; category is the claim's (parse.CATEGORIES)."""

    claim: Claim
    holds: bool

    @property
    def category(self) -> str:
        return self.claim.category


def as_rgb_array(image, size: int = 64) -> np.ndarray:
    """A PIL image or an (H, W, 3) array (uint8, or float in [0, 1]) as size x size RGB uint8, area-resampled."""
    if isinstance(image, Image.Image):
        picture = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image must be RGB with shape (H, W, 3), got {array.shape}")
        if array.dtype != np.uint8:
            if not np.isfinite(array).all():
                raise ValueError("image has NaN or infinite values")
            array = np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
        picture = Image.fromarray(array)
    if picture.size != (size, size):
        down = picture.width >= size and picture.height >= size
        picture = picture.resize((size, size), Image.Resampling.BOX if down else Image.Resampling.BICUBIC)
    return np.asarray(picture)


class _Image:
    """Features of one image, each computed at most once."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.size = pixels.shape[0]

    @cached_property
    def _objects(self) -> tuple[list[DetectedObject], np.ndarray]:
        return find_objects(self.pixels)

    def matching(self, target: Target) -> list[DetectedObject]:
        """Objects of the target's colour and shape; failing that, of its colour (so a wrong shape
        costs the shape and count claims, not the size, position and relation ones)."""
        same_colour = [o for o in self._objects[0] if o.colour == target.colour]
        return [o for o in same_colour if o.shape == target.shape] or same_colour

    def distance(self, rows: slice, colour: str) -> np.ndarray:
        return np.linalg.norm(self.pixels[rows].astype(np.float32) - LANDSCAPE_COLOURS[colour], axis=-1)

    def row(self, fraction: float) -> int:
        return round(fraction * self.size)

    @cached_property
    def luminance(self) -> np.ndarray:
        return self.pixels.astype(np.float32).mean(-1)

    @cached_property
    def saturation(self) -> np.ndarray:
        return self.pixels.max(-1).astype(np.float32) - self.pixels.min(-1)

    @cached_property
    def _neighbour_max(self) -> np.ndarray:
        padded = np.pad(self.luminance, 1, mode="edge")
        h, w = self.luminance.shape
        return np.max([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]], axis=0)

    def peaks(self, rows: slice, contrast: float) -> np.ndarray:
        """Pixels brighter than each of their 4 neighbours by `contrast` (stars, lit windows)."""
        return self.luminance[rows] - self._neighbour_max[rows] >= contrast

    @cached_property
    def time(self) -> str:
        """Time of day from the median colour of the top rows of the sky."""
        top = np.median(self.pixels[:max(1, self.size // 16)].reshape(-1, 3), axis=0)
        return min(TIMES, key=lambda t: np.linalg.norm(top - SKY[t][0]))

    def strip_colour(self, rows: slice) -> str:
        """Palette colour of a strip's background: the median of pixels no object covers."""
        strip = self.pixels[rows][~_grow(self._objects[1])[rows]]
        if len(strip) == 0:
            strip = self.pixels[rows].reshape(-1, 3)
        median = np.median(strip.reshape(-1, 3), axis=0).astype(np.uint8)
        index = nearest_colours(median[None], max_distance=1e9)[0]
        return COLOURS[index]


def _grow(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _cell(x: float, y: float) -> str:
    column = "left" if x < 1 / 3 else "right" if x > 2 / 3 else None
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else None
    return " ".join(p for p in (row, column) if p) or "center"


def _related(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    dx, dy = b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1]
    main, off = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return main >= RELATION_MARGIN and main >= 0.5 * abs(off)


def _check_shapes_claim(view: _Image, claim: Claim) -> bool:
    objects = view._objects[0]
    target = claim.target
    if claim.category == "colour":
        return any(o.colour == claim.value for o in objects)
    if claim.category == "shape":
        return any(o.shape == claim.value for o in objects)
    if claim.category == "count":
        return sum(o.colour == target.colour and o.shape == target.shape for o in objects) == claim.value
    if claim.category == "background":
        edge = max(1, round(0.1 * view.size))
        top, bottom = view.strip_colour(slice(0, edge)), view.strip_colour(slice(view.size - edge, view.size))
        kind, *colours = claim.value
        return [top, bottom] == (colours * 2 if kind == "solid" else colours)
    found = view.matching(target)
    if not found:
        return False
    if claim.category == "size":
        return all((o.extent >= SIZE_SPLIT) == (claim.value == "large") for o in found)
    if claim.category == "position":
        return any(_cell(*o.centroid) == claim.value for o in found)
    if claim.category == "relation":
        others = view.matching(claim.other)
        return bool(others) and all(_related(a, b, claim.value) for a in found for b in others)
    raise ValueError(f"unknown claim category {claim.category!r}")


def _check_landscape_claim(view: _Image, element: str) -> bool:
    size, horizon, lake_top = view.size, view.row(HORIZON), view.row(LAKE_TOP)
    area = size * size
    if element in TIMES:
        return view.time == element
    if element == "mountains":
        return np.count_nonzero(view.distance(slice(0, horizon), "mountain") < 40) >= 0.01 * area
    if element == "snow":
        # white patches (not lone star pixels) below the clouds' rows and above the horizon
        white = view.distance(slice(view.row(0.22), horizon), "snow") < 40
        neighbour = np.zeros_like(white)
        neighbour[1:] |= white[:-1]
        neighbour[:-1] |= white[1:]
        neighbour[:, 1:] |= white[:, :-1]
        neighbour[:, :-1] |= white[:, 1:]
        paired = white & neighbour
        return np.count_nonzero(paired) >= max(3, 0.0015 * area)
    if element == "lake":
        bottom = view.pixels[lake_top + (size - lake_top) // 3:].astype(np.int32)
        r, g, b = bottom[..., 0], bottom[..., 1], bottom[..., 2]
        return np.mean((b > r + 15) & (b > g + 15)) >= 0.6
    if element == "reflection":
        lake = view.pixels[lake_top:].astype(np.float32).mean(-1)
        rows = np.clip(horizon - 1 - np.arange(size - lake_top), 0, None)
        mirrored = view.pixels[rows].astype(np.float32).mean(-1)
        if lake.std() < 2 or mirrored.std() < 2:
            return False
        return np.corrcoef(lake.ravel(), mirrored.ravel())[0, 1] >= 0.5
    ground = slice(view.row(HORIZON - 0.3), lake_top)
    if element == "trees":
        return np.count_nonzero(view.distance(ground, "tree") < 30) >= max(4, 0.002 * area)
    if element == "house":
        near = slice(view.row(HORIZON - 0.2), lake_top)
        roof = np.count_nonzero(view.distance(near, "roof") < 40)
        wall = np.count_nonzero(view.distance(near, "wall") < 30)
        return min(roof, wall) >= max(3, 0.001 * area)
    if element == "city":
        # lit windows: saturated pixels brighter than their neighbours, in the towers' band
        band = slice(view.row(HORIZON - 0.35), horizon)
        return np.count_nonzero(view.peaks(band, 10) & (view.saturation[band] >= 60)) >= 4
    sky = slice(0, horizon)
    if element in ("sun", "moon"):
        if (view.time == "night") != (element == "moon"):  # the sun never shines at night here
            return False
        radius = 0.065 if element == "sun" else 0.06
        found = np.count_nonzero(view.distance(sky, element) < (45 if element == "sun" else 40))
        return found >= 0.4 * np.pi * (radius * size) ** 2
    if element == "stars":
        # single bright, unsaturated pixels in the night sky
        bright = view.peaks(sky, 10) & (view.luminance[sky] >= 50) & (view.saturation[sky] < 80)
        return view.time == "night" and np.count_nonzero(bright) >= 4
    if element == "clouds":
        high = slice(0, view.row(0.24))
        return view.time != "night" and np.count_nonzero(view.distance(high, "cloud") < 40) >= 0.003 * area
    raise ValueError(f"unknown landscape element {element!r}")


def check(image, claims: list[Claim], size: int = 64) -> list[ClaimResult]:
    """Which of `claims` hold in `image` (PIL or array, any size, resampled to size x size)."""
    view = _Image(as_rgb_array(image, size))
    described = sum(claim.value for claim in claims if claim.category == "count")
    clutter = any(c.category != "landscape" for c in claims) and len(view._objects[0]) > described + MAX_EXTRA_OBJECTS
    results = []
    for claim in claims:
        if claim.category == "landscape":
            holds = _check_landscape_claim(view, claim.value)
        else:
            holds = not clutter and _check_shapes_claim(view, claim)
        results.append(ClaimResult(claim, bool(holds)))
    return results


def check_caption(image, caption: str, size: int = 64) -> list[ClaimResult]:
    """Parse a caption (parse.parse_caption) and check its claims on an image."""
    return check(image, parse_caption(caption), size)


def accuracy_by_category(results: list[ClaimResult]) -> dict[str, tuple[int, int]]:
    """(claims that hold, claims) per category, in parse.CATEGORIES order, plus "all"."""
    table = {c: [0, 0] for c in CATEGORIES}
    for r in results:
        table[r.category][0] += r.holds
        table[r.category][1] += 1
    table["all"] = [sum(v[0] for v in table.values()), sum(v[1] for v in table.values())]
    return {k: (v[0], v[1]) for k, v in table.items() if v[1]}
