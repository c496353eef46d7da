"""Images from scene records: Pillow drawing at `supersample` times the size, box-filtered down.

Box filtering a supersampled drawing is exact area antialiasing; all geometry is in fractions of
the image side so one record renders the same scene at 64 or 128 pixels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from sdgen.train.scenes.layout import LandscapeScene, Scene, ShapesScene
from sdgen.train.scenes.vocabulary import (
    HORIZON, LAKE_TOP, LANDSCAPE_COLOURS, PALETTE, REFLECTION_MIX, SKY, WATER,
)

RING_HOLE = 0.5  # inner over outer diameter of a ring
Box = tuple[float, float, float, float]


def _unit_star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = [math.pi / points * i - math.pi / 2 for i in range(2 * points)]
    return [((1 if i % 2 == 0 else inner) * math.cos(a), (1 if i % 2 == 0 else inner) * math.sin(a))
            for i, a in enumerate(angles)]


def _unit_heart(n: int = 48) -> list[tuple[float, float]]:
    """The classic parametric heart: x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t."""
    ts = [2 * math.pi * i / n for i in range(n)]
    return [(16 * math.sin(t) ** 3,
             -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in ts]


def _normalised(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Points scaled to fill the unit box exactly, so a shape's box is its bounding box."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return tuple(((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys)))
                 for x, y in points)


_third = 1 / 3
UNIT_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((0, 0), (1, 0), (1, 1), (0, 1)),
    "triangle": ((0.5, 0), (1, 1), (0, 1)),
    "diamond": ((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)),
    "cross": ((_third, 0), (2 * _third, 0), (2 * _third, _third), (1, _third), (1, 2 * _third),
              (2 * _third, 2 * _third), (2 * _third, 1), (_third, 1), (_third, 2 * _third),
              (0, 2 * _third), (0, _third), (_third, _third)),
    "star": _normalised(_unit_star()),
    "heart": _normalised(_unit_heart()),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill) -> None:
    """Draw `shape` filling the pixel box (x0, y0, x1, y1) exactly."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        width = max(1, round((1 - RING_HOLE) / 2 * min(x1 - x0, y1 - y0)))
        draw.ellipse(box, outline=fill, width=width)
    else:
        w, h = x1 - x0, y1 - y0
        draw.polygon([(x0 + u * w, y0 + v * h) for u, v in UNIT_POLYGONS[shape]], fill=fill)


@lru_cache(maxsize=64)
def _gradient(top: tuple[int, ...], bottom: tuple[int, ...], height: int, width: int) -> np.ndarray:
    t = ((np.arange(height) + 0.5) / height)[:, None, None]
    rows = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.ascontiguousarray(np.broadcast_to(np.rint(rows), (height, width, 3)).astype(np.uint8))


@lru_cache(maxsize=64)
def _gradient_image(top: tuple[int, ...], bottom: tuple[int, ...], side: int) -> Image.Image:
    return Image.fromarray(_gradient(top, bottom, side, side))


def render(scene: Scene, size: int = 64, supersample: int | None = None) -> np.ndarray:
    """RGB image (size, size, 3) uint8 of a scene record; supersampling 4x up to 64 pixels, then 2x."""
    if size < 16 or size > 1024:
        raise ValueError(f"size {size} is outside 16..1024 pixels")
    supersample = supersample or (4 if size <= 64 else 2)
    if isinstance(scene, ShapesScene):
        return _render_shapes(scene, size, supersample)
    return _render_landscape(scene, size, supersample)


def _render_shapes(scene: ShapesScene, size: int, supersample: int) -> np.ndarray:
    side = size * supersample
    colours = [PALETTE[c] for c in scene.background.colours]
    if len(colours) == 1:
        canvas = Image.new("RGB", (side, side), colours[0])
    else:
        canvas = _gradient_image(colours[0], colours[1], side).copy()
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        draw_shape(draw, obj.shape, tuple(v * side for v in obj.box), PALETTE[obj.colour])
    return np.asarray(canvas.reduce(supersample))


@lru_cache(maxsize=16)
def _empty_landscape(time: str, side: int) -> Image.Image:
    """Sky gradient above the horizon, grass below."""
    horizon = round(HORIZON * side)
    sky = _gradient(*SKY[time], horizon, side)
    grass = np.broadcast_to(np.asarray(LANDSCAPE_COLOURS["grass"], np.uint8), (side - horizon, side, 3))
    return Image.fromarray(np.concatenate([sky, grass]))


def _render_landscape(scene: LandscapeScene, size: int, supersample: int) -> np.ndarray:
    side, f = size * supersample, supersample
    canvas = _empty_landscape(scene.time, side).copy()
    draw = ImageDraw.Draw(canvas)
    colour = LANDSCAPE_COLOURS
    horizon = HORIZON * side

    for x, y in scene.stars:  # one whole output pixel each
        px, py = int(x * size) * f, int(y * size) * f
        draw.rectangle((px, py, px + f - 1, py + f - 1), fill=colour["star"])
    for name, radius in (("sun", 0.065), ("moon", 0.06)):
        centre = getattr(scene, name)
        if centre is not None:
            cx, cy, r = centre[0] * side, centre[1] * side, radius * side
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour[name])
    for x, y, w in scene.clouds:
        cx, cy, w = x * side, y * side, w * side
        for dx, rx, ry, dy in ((0, 0.28, 0.17, -0.04), (-0.24, 0.22, 0.12, 0.02), (0.24, 0.22, 0.12, 0.02)):
            bx, by = cx + dx * w, cy + dy * w
            draw.ellipse((bx - rx * w, by - ry * w, bx + rx * w, by + ry * w), fill=colour["cloud"])
    for cx, half, height in scene.mountains:
        cx, half, top = cx * side, half * side, horizon - height * side
        draw.polygon([(cx - half, horizon), (cx, top), (cx + half, horizon)], fill=colour["mountain"])
        if scene.snowy:
            cap = 0.35  # share of the peak's height under snow
            base = top + cap * (horizon - top)
            draw.polygon([(cx - cap * half, base), (cx, top), (cx + cap * half, base)], fill=colour["snow"])
    if scene.city:
        _draw_city(draw, scene, size, f)
    draw.rectangle((0, round(horizon), side, side), fill=colour["grass"])
    for x, base, height in scene.trees:
        x, base, height = x * side, base * side, height * side
        trunk = 0.2 * height
        draw.rectangle((x - 0.05 * height, base - trunk, x + 0.05 * height, base), fill=colour["trunk"])
        for lo, hi, half in ((base - trunk, base - 0.65 * height, 0.3), (base - 0.45 * height, base - height, 0.22)):
            draw.polygon([(x - half * height, lo), (x, hi), (x + half * height, lo)], fill=colour["tree"])
    if scene.house is not None:
        x, base, w = (v * side for v in scene.house)
        wall_top = base - 0.6 * w
        draw.rectangle((x - w / 2, wall_top, x + w / 2, base), fill=colour["wall"])
        draw.polygon([(x - 0.62 * w, wall_top), (x, base - 1.1 * w), (x + 0.62 * w, wall_top)], fill=colour["roof"])
        draw.rectangle((x - 0.1 * w, base - 0.35 * w, x + 0.1 * w, base), fill=colour["door"])

    image = np.asarray(canvas.reduce(supersample)).copy()
    if scene.lake:
        _add_lake(image, scene.time)
    return image


def _draw_city(draw: ImageDraw.ImageDraw, scene: LandscapeScene, size: int, f: int) -> None:
    """Dark towers with lit windows on whole output pixels, every other row and column."""
    side, horizon = size * f, HORIZON * size * f
    rng = np.random.default_rng(scene.window_seed)
    windows = (LANDSCAPE_COLOURS["window_cyan"], LANDSCAPE_COLOURS["window_warm"])
    for x0, x1, height in scene.city:
        top = horizon - height * side
        draw.rectangle((x0 * side, top, x1 * side, horizon), fill=LANDSCAPE_COLOURS["building"])
        cols = range(math.ceil(x0 * size) + 1, math.floor(x1 * size) - 1, 2)
        rows = range(math.ceil(top / f) + 1, round(HORIZON * size) - 1, 2)
        lit = rng.random((len(rows), len(cols))) < 0.55
        kind = rng.random((len(rows), len(cols))) < 0.6
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                if lit[i, j]:
                    draw.rectangle((c * f, r * f, c * f + f - 1, r * f + f - 1), fill=windows[0 if kind[i, j] else 1])


def _add_lake(image: np.ndarray, time: str) -> None:
    """Water from LAKE_TOP down, mirroring the rows above the horizon (row by row, in place)."""
    size = image.shape[0]
    horizon, lake_top = round(HORIZON * size), round(LAKE_TOP * size)
    rows = np.clip(horizon - 1 - (np.arange(lake_top, size) - lake_top), 0, None)
    mirrored = image[rows].astype(np.float32)
    water = np.asarray(WATER[time], np.float32)
    image[lake_top:] = np.rint((1 - REFLECTION_MIX) * water + REFLECTION_MIX * mirrored).astype(np.uint8)
