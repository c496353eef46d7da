"""Objects of a shapes image: nearest-palette-colour segmentation, connected components, and shape
classification by overlap (IoU) with our own shape drawn in the object's bounding box.

numpy only (no scipy at run time): components by min-label propagation with pointer jumping.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from sdgen.train.scenes.render import draw_shape
from sdgen.train.scenes.vocabulary import COLOURS, PALETTE, SHAPE_ASPECT, SHAPES

_PALETTE = np.asarray([PALETTE[c] for c in COLOURS], np.float32)
MAX_COLOUR_DISTANCE = 70.0  # pixels farther than this from every palette colour belong to none


def nearest_colours(pixels: np.ndarray, max_distance: float = MAX_COLOUR_DISTANCE) -> np.ndarray:
    """Index into COLOURS of each pixel's nearest palette colour, -1 when farther than max_distance."""
    rgb = pixels.reshape(-1, 3).astype(np.float32)
    d2 = ((rgb[:, None, :] - _PALETTE[None]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    nearest[d2[np.arange(len(rgb)), nearest] > max_distance ** 2] = -1
    return nearest.reshape(pixels.shape[:-1])


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal labels >= 0; each pixel gets its component's smallest flat index, -1 elsewhere."""
    h, w = labels.shape
    n = h * w
    none = np.int64(n)
    parent = np.where(labels >= 0, np.arange(n).reshape(h, w), none)
    right = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] >= 0)
    down = (labels[1:] == labels[:-1]) & (labels[1:] >= 0)
    while True:
        p = parent.copy()
        np.minimum(p[:, 1:], np.where(right, parent[:, :-1], none), out=p[:, 1:])
        np.minimum(p[:, :-1], np.where(right, parent[:, 1:], none), out=p[:, :-1])
        np.minimum(p[1:], np.where(down, parent[:-1], none), out=p[1:])
        np.minimum(p[:-1], np.where(down, parent[1:], none), out=p[:-1])
        flat = p.reshape(-1)
        inside = flat < n
        flat[inside] = flat[flat[inside]]  # pointer jumping: every label is a member's index, smaller or equal
        if np.array_equal(p, parent):
            return np.where(parent < n, parent, -1)
        parent = p


@dataclass(frozen=True)
class DetectedObject:
    """One object-sized component: colour, pixel box (x0, y0, x1, y1) exclusive, centroid and extent as fractions."""

    colour: str
    area: int
    box: tuple[int, int, int, int]
    centroid: tuple[float, float]
    extent: float
    shape: str
    shape_scores: dict[str, float]


def _eroded_nonempty(mask: np.ndarray) -> bool:
    """Whether any pixel has all four neighbours inside: thin antialiasing halos have none."""
    core = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return bool(core.any())


@lru_cache(maxsize=8192)
def shape_template(shape: str, width: int, height: int, margin: float = 0.0) -> np.ndarray:
    """Boolean mask of `shape` drawn as the renderer draws it in a width x height pixel box grown by
    `margin` pixels each side (thin tips of a shape fall below half coverage and leave the box)."""
    f = 4  # supersampling
    canvas = Image.new("L", (width * f, height * f), 0)
    m = margin * f
    draw_shape(ImageDraw.Draw(canvas), shape, (-m, -m, width * f + m, height * f + m), 255)
    return np.asarray(canvas.reduce(f)) >= 128


ASPECT_WEIGHT = 0.5  # IoU given up per unit of |log(box aspect / the shape's aspect)|


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """Shape whose template in the mask's box overlaps the mask best (intersection over union),
    less a penalty when the box's aspect ratio is not the shape's (a small cross vs a diamond)."""
    h, w = mask.shape
    area = np.count_nonzero(mask)
    scores = {}
    for shape in SHAPES:
        best = 0.0
        for margin in (0.0, 0.5):
            template = shape_template(shape, w, h, margin)
            overlap = np.count_nonzero(template & mask)
            best = max(best, overlap / (area + np.count_nonzero(template) - overlap))
        scores[shape] = best - ASPECT_WEIGHT * abs(np.log(w / h / SHAPE_ASPECT[shape]))
    return max(scores, key=scores.get), scores


def _grow(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _is_hole(mask: np.ndarray, components: np.ndarray, box, boxes: dict[int, tuple]) -> bool:
    """Whether a component is the hole of another (a ring's middle): that other one surrounds it.

    Looks two pixels out, past the antialiased edge, and counts only pixels of object-sized
    components, since edge blends may take a third colour.
    """
    border = components[_grow(_grow(mask)) & ~mask]
    border = border[np.isin(border, list(boxes))]
    ids, counts = np.unique(border, return_counts=True)
    for other, count in zip(ids.tolist(), counts.tolist()):
        b = boxes[other]
        inside = b[0] < box[0] and b[1] < box[1] and box[2] < b[2] and box[3] < b[3]
        if inside and count >= 0.8 * len(border):
            return True
    return False


def find_objects(image: np.ndarray) -> tuple[list[DetectedObject], np.ndarray]:
    """Object components of a square RGB uint8 image and the boolean mask of all their pixels.

    An object is a component of one palette colour with area >= 0.5% of the image, a box no wider
    or taller than half the image (gradient bands and plain backgrounds are wider), a core that
    survives one erosion (antialiasing halos do not), and not the hole of another object.
    """
    size = image.shape[0]
    labels = nearest_colours(image)
    components = connected_components(labels)
    ids, areas = np.unique(components[components >= 0], return_counts=True)
    candidates = {}
    for cid, area in zip(ids.tolist(), areas.tolist()):
        if area < 0.005 * size * size:
            continue
        mask = components == cid
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if max(box[2] - box[0], box[3] - box[1]) > 0.5 * size:
            continue
        crop = mask[box[1]:box[3], box[0]:box[2]]
        if _eroded_nonempty(np.pad(crop, 1)):
            candidates[cid] = (mask, box, xs, ys, area)
    boxes = {cid: c[1] for cid, c in candidates.items()}
    objects, covered = [], np.zeros(labels.shape, bool)
    for cid, (mask, box, xs, ys, area) in candidates.items():
        if _is_hole(mask, components, box, boxes):
            continue
        shape, scores = classify_shape(mask[box[1]:box[3], box[0]:box[2]])
        objects.append(DetectedObject(
            colour=COLOURS[labels.flat[cid]], area=area, box=box,
            centroid=((xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size),
            extent=max(box[2] - box[0], box[3] - box[1]) / size, shape=shape, shape_scores=scores))
        covered |= mask
    return objects, covered
