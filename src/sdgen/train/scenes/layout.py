"""Random scene records: what a scene holds and where, before any pixel is drawn.

Coordinates are fractions of the image side (x to the right, y downwards), so one record renders
at any resolution. The samplers take a numpy Generator and are deterministic given its state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from sdgen.train.scenes.vocabulary import (
    COLOURS, GRADIENT_CLEARANCE, GRADIENTS, HELDOUT_COLOUR_SHAPES, HELDOUT_LANDSCAPES,
    HELDOUT_RELATIONS, HORIZON, LAKE_TOP, MAJOR_ELEMENTS, OBJECT_CONTRAST, PALETTE, POSITIONS,
    RELATIONS, SHAPE_ASPECT, SHAPES, SIZE_EXTENT, SIZES, TIMES,
)

SPLITS = ("train", "heldout")
FAMILIES = ("shapes", "landscapes")


@dataclass(frozen=True)
class Background:
    """One colour (plain) or two (vertical gradient, first at the top)."""

    colours: tuple[str, ...]


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: centre (x, y) and the longer side of its bounding box (extent)."""

    colour: str
    shape: str
    size: str
    x: float
    y: float
    extent: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1) in fractions of the image side."""
        aspect = SHAPE_ASPECT[self.shape]
        w, h = (self.extent, self.extent / aspect) if aspect >= 1 else (self.extent * aspect, self.extent)
        return (self.x - w / 2, self.y - h / 2, self.x + w / 2, self.y + h / 2)


@dataclass(frozen=True)
class ShapeGroup:
    """Objects a caption names together ("two small red circles"), optionally placed in a grid cell."""

    count: int
    colour: str
    shape: str
    size: str
    position: str | None = None


@dataclass(frozen=True)
class ShapesScene:
    """Groups of objects, an optional relation (groups[0] <relation> groups[1]), a background."""

    groups: tuple[ShapeGroup, ...]
    relation: str | None
    background: Background
    objects: tuple[ShapeObject, ...]  # group by group, in order
    family: str = field(default="shapes", init=False)

    def members(self, group_index: int) -> tuple[ShapeObject, ...]:
        start = sum(g.count for g in self.groups[:group_index])
        return self.objects[start:start + self.groups[group_index].count]


@dataclass(frozen=True)
class LandscapeScene:
    """Sky by time of day plus the elements' geometry (empty tuples / None for absent ones)."""

    time: str
    mountains: tuple[tuple[float, float, float], ...] = ()  # (centre x, half width, height)
    snowy: bool = False
    lake: bool = False
    trees: tuple[tuple[float, float, float], ...] = ()  # (x, base y, height)
    house: tuple[float, float, float] | None = None  # (x, base y, width)
    city: tuple[tuple[float, float, float], ...] = ()  # buildings (x0, x1, height above horizon)
    sun: tuple[float, float] | None = None
    moon: tuple[float, float] | None = None
    stars: tuple[tuple[float, float], ...] = ()
    clouds: tuple[tuple[float, float, float], ...] = ()  # (x, y, width)
    window_seed: int = 0
    family: str = field(default="landscapes", init=False)

    @property
    def elements(self) -> frozenset[str]:
        """Names of the elements present (vocabulary.ELEMENTS); a lake mirrors mountains or a city."""
        present = {
            "mountains": bool(self.mountains), "snow": self.snowy, "lake": self.lake,
            "reflection": self.lake and bool(self.mountains or self.city), "trees": bool(self.trees),
            "house": self.house is not None, "city": bool(self.city), "sun": self.sun is not None,
            "moon": self.moon is not None, "stars": bool(self.stars), "clouds": bool(self.clouds),
        }
        return frozenset(name for name, here in present.items() if here)


Scene = ShapesScene | LandscapeScene


def is_heldout(scene: Scene) -> bool:
    """Whether a scene contains a held-out combination (vocabulary.HELDOUT_*)."""
    if isinstance(scene, LandscapeScene):
        features = scene.elements | {scene.time}
        return any(combo <= features for combo in HELDOUT_LANDSCAPES)
    if any((o.colour, o.shape) in HELDOUT_COLOUR_SHAPES for o in scene.objects):
        return True
    if scene.relation is not None:
        a, b = scene.groups[0], scene.groups[1]
        return (a.shape, scene.relation, b.shape) in HELDOUT_RELATIONS
    return False


def sample_scene(rng: np.random.Generator, split: str = "train",
                 families: tuple[str, ...] = FAMILIES) -> Scene:
    """A random scene of one of `families`; "train" never holds a held-out combination, "heldout" always does."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if not families or any(f not in FAMILIES for f in families):
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families!r}")
    family = families[int(rng.integers(len(families)))]
    sampler = sample_shapes if family == "shapes" else sample_landscape
    while True:  # rejection keeps each split's distribution a restriction of the full one
        scene = sampler(rng, heldout=split == "heldout")
        if is_heldout(scene) == (split == "heldout"):
            return scene


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------

def _colour_distance(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(PALETTE[a], PALETTE[b])))


def _gradient_distance(colour: str, top: str, bottom: str) -> float:
    """Least RGB distance from `colour` to any colour along the top -> bottom gradient."""
    c, a, b = (np.asarray(PALETTE[n], float) for n in (colour, top, bottom))
    t = np.clip(np.dot(c - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
    return float(np.linalg.norm(c - (a + t * (b - a))))


def object_colours(background: Background) -> list[str]:
    """Palette colours that stand out on `background` (OBJECT_CONTRAST, GRADIENT_CLEARANCE)."""
    return list(_object_colours(background.colours))


@lru_cache(maxsize=None)
def _object_colours(colours: tuple[str, ...]) -> tuple[str, ...]:
    if len(colours) == 1:
        return tuple(c for c in COLOURS if _colour_distance(c, colours[0]) >= OBJECT_CONTRAST)
    return tuple(c for c in COLOURS if _gradient_distance(c, *colours) >= GRADIENT_CLEARANCE)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _sample_groups(rng: np.random.Generator, colours: list[str], heldout: bool):
    """Group structure: a relation between two groups, or one to four listed groups."""
    relation = _pick(rng, RELATIONS) if rng.random() < 0.3 else None
    if relation:
        counts = [int(rng.integers(1, 3)), 1] if rng.random() < 0.5 else [1, int(rng.integers(1, 3))]
    else:
        total = int(rng.integers(1, 5))
        counts = []
        while sum(counts) < total:
            counts.append(int(rng.integers(1, total - sum(counts) + 1)))
    groups, used = [], set()
    for i, count in enumerate(counts):
        colour, shape = _pick(rng, colours), _pick(rng, SHAPES)
        if heldout and i == 0 and (relation is None or rng.random() < 0.5):
            colour, shape = _pick(rng, sorted(HELDOUT_COLOUR_SHAPES))
            if colour not in colours:
                return None
        if (colour, shape) in used:  # two groups of the same kind would blur counting
            return None
        used.add((colour, shape))
        groups.append([count, colour, shape, _pick(rng, SIZES), None])
    if heldout and relation and rng.random() < 0.5:
        a, relation, b = _pick(rng, sorted(HELDOUT_RELATIONS))
        groups[0][2], groups[1][2] = a, b
    if relation is None and all(g[0] == 1 for g in groups) and rng.random() < 0.6:
        cells = rng.permutation(len(POSITIONS))[:len(groups)]
        for g, cell in zip(groups, cells):
            g[4] = list(POSITIONS)[int(cell)]
    return [ShapeGroup(*g) for g in groups], relation


def _separated(box, boxes, gap: float) -> bool:
    x0, y0, x1, y1 = box
    return all(x0 >= b[2] + gap or b[0] >= x1 + gap or y0 >= b[3] + gap or b[1] >= y1 + gap
               for b in boxes)


def _relation_ok(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """Clear spatial relation: main-axis gap >= 0.25, off-axis offset <= 0.7 of it."""
    dx, dy = b.x - a.x, b.y - a.y
    main, off = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return main >= 0.25 and abs(off) <= 0.7 * main


def _place(rng: np.random.Generator, groups: list[ShapeGroup], relation: str | None):
    """Rejection sampling of centres inside the image, 0.05 apart, in the named cell or relation half."""
    objects: list[ShapeObject] = []
    boxes: list[tuple[float, float, float, float]] = []
    for gi, group in enumerate(groups):
        for _ in range(group.count):
            for _attempt in range(30):
                extent = SIZE_EXTENT[group.size] * rng.uniform(0.92, 1.08)
                # sample centres only where the whole box fits, 0.02 from the edges
                half_w, half_h = (extent / 2, extent / 2 / SHAPE_ASPECT[group.shape]) \
                    if SHAPE_ASPECT[group.shape] >= 1 else (extent / 2 * SHAPE_ASPECT[group.shape], extent / 2)
                lo_x, hi_x, lo_y, hi_y = 0.02 + half_w, 0.98 - half_w, 0.02 + half_h, 0.98 - half_h
                if group.position:
                    cx, cy = POSITIONS[group.position]
                    x, y = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
                elif relation:  # each group in its own half keeps the relation satisfiable
                    first_half = (gi == 0) == (relation in ("left of", "above"))
                    horizontal = relation in ("left of", "right of")
                    lo, hi = (lo_x, hi_x) if horizontal else (lo_y, hi_y)
                    main = rng.uniform(lo, min(hi, 0.45)) if first_half else rng.uniform(max(lo, 0.55), hi)
                    x, y = (main, rng.uniform(lo_y, hi_y)) if horizontal else (rng.uniform(lo_x, hi_x), main)
                else:
                    x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
                obj = ShapeObject(group.colour, group.shape, group.size, float(x), float(y), float(extent))
                box = obj.box
                if min(box[0], box[1]) < 0.02 or max(box[2], box[3]) > 0.98 or not _separated(box, boxes, 0.05):
                    continue
                if relation and gi == 1 and not all(_relation_ok(a, obj, relation) for a in objects[:groups[0].count]):
                    continue
                objects.append(obj)
                boxes.append(box)
                break
            else:
                return None
    return tuple(objects)


def sample_shapes(rng: np.random.Generator, heldout: bool = False) -> ShapesScene:
    """1-4 objects in groups, a relation or grid positions or free placement, a plain or gradient background."""
    while True:
        if rng.random() < 0.3:
            background = Background(tuple(_pick(rng, GRADIENTS)))
        else:
            background = Background((_pick(rng, COLOURS),))
        sampled = _sample_groups(rng, object_colours(background), heldout)
        if sampled is None:
            continue
        groups, relation = sampled
        objects = _place(rng, groups, relation)
        if objects is not None:
            return ShapesScene(tuple(groups), relation, background, objects)


# --------------------------------------------------------------------------------------------
# Landscapes
# --------------------------------------------------------------------------------------------

_COLUMNS = np.linspace(0.0, 1.0, 129)


def skyline(scene: LandscapeScene) -> np.ndarray:
    """Highest point (smallest y) of anything standing on the ground, at x = 0, 1/128, ... 1."""
    x = _COLUMNS
    top = np.full_like(x, HORIZON)
    for cx, half, height in scene.mountains:
        top = np.minimum(top, HORIZON - height * np.clip(1 - np.abs(x - cx) / half, 0, None))
    for x0, x1, height in scene.city:
        top = np.where((x >= x0) & (x <= x1), np.minimum(top, HORIZON - height), top)
    for tx, base, height in scene.trees:
        top = np.where(np.abs(x - tx) <= 0.06, np.minimum(top, base - height), top)
    if scene.house is not None:
        hx, base, width = scene.house
        top = np.where(np.abs(x - hx) <= width / 2 + 0.02, np.minimum(top, base - width * 1.15), top)
    return top


def _clear_sky(tops: np.ndarray, x0: float, x1: float, bottom: float) -> bool:
    """Whether a sky object whose lowest point is `bottom` clears the skyline between x0 and x1 by 0.04."""
    i0, i1 = max(0, int(x0 * 128)), min(128, int(np.ceil(x1 * 128)))
    return bool(bottom + 0.04 <= tops[i0:i1 + 1].min())


def _sample_ground(rng: np.random.Generator, majors: set[str]) -> dict:
    parts: dict = {"lake": "lake" in majors}
    # peaks stand clear of a city in front of them
    low, high = (0.26, 0.34) if "city" in majors else (0.18, 0.32)
    tallest = 0.15 if "mountains" in majors else 0.3
    if "mountains" in majors:
        peaks, covered = [], 0.0
        while covered < 0.5:
            half = rng.uniform(0.18, 0.35)
            peaks.append((float(rng.uniform(0.1, 0.9)), float(half), float(rng.uniform(low, high))))
            covered += half
        parts["mountains"] = tuple(sorted(peaks, key=lambda p: -p[2]))  # tallest drawn first, behind
        parts["snowy"] = bool(rng.random() < 0.5)
    if "city" in majors:
        x = float(rng.uniform(0.0, 0.5))
        end = min(1.0, x + rng.uniform(0.45, 0.9))
        buildings = []
        while x < end:
            w = float(rng.uniform(0.07, 0.13))
            buildings.append((x, min(x + w, 1.0), float(rng.uniform(0.1, tallest))))
            x += w + float(rng.uniform(0.0, 0.02))
        parts["city"] = tuple(buildings)
    taken: list[tuple[float, float]] = []
    if "house" in majors:
        width = float(rng.uniform(0.15, 0.19))
        hx = float(rng.uniform(0.15, 0.85))
        parts["house"] = (hx, float(rng.uniform(HORIZON + 0.05, LAKE_TOP - 0.005)), width)
        taken.append((hx - width / 2 - 0.05, hx + width / 2 + 0.05))
    if "trees" in majors:
        trees = []
        for _ in range(int(rng.integers(2, 6))):
            tx = float(rng.uniform(0.05, 0.95))
            if all(not (a <= tx <= b) for a, b in taken):
                trees.append((tx, float(rng.uniform(HORIZON + 0.03, LAKE_TOP - 0.005)),
                              float(rng.uniform(0.14, 0.22))))
                taken.append((tx - 0.06, tx + 0.06))
        if not trees:
            trees.append((0.5 if "house" not in majors else (0.08 if parts["house"][0] > 0.5 else 0.92),
                          float(LAKE_TOP - 0.01), 0.18))
        parts["trees"] = tuple(sorted(trees, key=lambda t: t[1]))  # farther (higher base) first
    return parts


def sample_landscape(rng: np.random.Generator, heldout: bool = False) -> LandscapeScene:
    """Time of day, one to three of mountains/lake/trees/house/city, sky objects placed above the skyline."""
    time = _pick(rng, TIMES)
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    # a list, not a set, where order matters: a set of strings iterates in an order that changes
    # with each process's hash seed, and the scenes must be a pure function of the seed
    picked = [MAJOR_ELEMENTS[int(i)] for i in rng.permutation(len(MAJOR_ELEMENTS))[:count]]
    majors = set(picked)
    if heldout:  # the combination itself, and at most one more major element
        combo = _pick(rng, HELDOUT_LANDSCAPES)
        time = next(iter(combo & set(TIMES)))
        extra = set(picked[:1]) if rng.random() < 0.4 else set()
        majors = (combo - {"snow"} - set(TIMES)) | ({"mountains"} if "snow" in combo else set()) | extra
    parts = _sample_ground(rng, majors)
    if heldout and "snow" in combo:
        parts["snowy"] = True
    window_seed = int(rng.integers(2**31))
    tops = skyline(LandscapeScene(time, **parts))
    sky: dict = {}
    disc = "moon" if time == "night" else "sun"
    if rng.random() < (0.7 if time != "day" else 0.6):
        for _ in range(20):
            x = float(rng.uniform(0.12, 0.88))
            y = float(rng.uniform(0.3, 0.42) if time == "sunset" else rng.uniform(0.1, 0.3))
            if _clear_sky(tops, x - 0.07, x + 0.07, y + 0.07):
                sky[disc] = (x, y)
                break
    if time != "night" and rng.random() < 0.5:
        clouds = []
        for _ in range(int(rng.integers(1, 4))):
            x, y, w = float(rng.uniform(0.12, 0.88)), float(rng.uniform(0.07, 0.16)), float(rng.uniform(0.16, 0.26))
            near_disc = disc in sky and abs(x - sky[disc][0]) < w / 2 + 0.1 and abs(y - sky[disc][1]) < 0.15
            apart = all(abs(x - c[0]) > (w + c[2]) / 2 + 0.03 for c in clouds)
            if not near_disc and apart and _clear_sky(tops, x - w / 2, x + w / 2, y + 0.05):
                clouds.append((x, y, w))
        sky["clouds"] = tuple(clouds)
    if time == "night":
        stars, wanted = [], int(rng.integers(8, 16))
        for _ in range(80):
            if len(stars) == wanted:
                break
            x, y = float(rng.uniform(0.03, 0.97)), float(rng.uniform(0.03, HORIZON - 0.15))
            near_moon = "moon" in sky and np.hypot(x - sky["moon"][0], y - sky["moon"][1]) < 0.12
            apart = all(abs(x - sx) + abs(y - sy) > 0.06 for sx, sy in stars)  # single pixels stay apart
            if not near_moon and apart and _clear_sky(tops, x, x, y + 0.03):
                stars.append((x, y))
        sky["stars"] = tuple(stars)
    return LandscapeScene(time, window_seed=window_seed, **parts, **sky)
