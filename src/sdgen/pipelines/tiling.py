"""Tiled processing of large images: overlapping tiles, blended with linear ramps across each overlap.

A function that maps an input tile to an output tile `ratio` times its size (the VAE decoder:
8, its encoder: 1/8, a denoiser: 1) runs on tiles of at most `tile` x `tile` input pixels that
overlap by `overlap`; where tiles overlap, their outputs are averaged with weights that fall
linearly towards each tile's inner edges, so seams fade instead of showing. Memory then grows
with the tile size, not with the image (a 2048x2048 image decodes in about 2 GB).

Tiles do not see each other's context, so GroupNorm statistics differ slightly per tile: the
result is close to the untiled one, not equal to it. Tiling only starts above a size where a
whole pass would need several GB.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor

# Box of a tile in input coordinates: (top, left, height, width).
Box = tuple[int, int, int, int]


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets covering [0, size) with tiles of `tile` overlapping by at least `overlap`, multiples of `align`."""
    if size <= tile:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride))
    last = (size - tile) // align * align
    if last > starts[-1]:
        starts.append(last)
    return starts


def _ramp(length: int, overlap: int, fade_start: bool, fade_end: bool) -> Tensor:
    """Weights along one side of a tile: 1 inside, rising linearly over `overlap` at faded edges (never 0)."""
    weights = torch.ones(length)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        n = min(overlap, length)
        if fade_start:
            weights[:n] = torch.minimum(weights[:n], ramp[:n])
        if fade_end:
            weights[length - n:] = torch.minimum(weights[length - n:], ramp[:n].flip(0))
    return weights


def tiled_apply(fn: Callable[[Tensor, Box], Tensor], x: Tensor, tile: int, overlap: int,
                ratio: float | Fraction = 1, align: int = 1) -> Tensor:
    """Run `fn(x_tile, box)` over overlapping tiles of `x` (b, c, h, w) and blend the outputs.

    The output of a tile of h x w input pixels must be h * ratio x w * ratio; `align` keeps tile
    offsets on multiples of it so that they map to whole output pixels (8 for the VAE encoder).
    """
    ratio = Fraction(ratio).limit_denominator(64)
    height, width = x.shape[-2:]
    rows, cols = tile_starts(height, tile, overlap, align), tile_starts(width, tile, overlap, align)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x, (0, 0, height, width))
    out_overlap = int(overlap * ratio)
    result = weight_sum = None
    for top in rows:
        for left in cols:
            th, tw = min(tile, height - top), min(tile, width - left)
            out = fn(x[..., top:top + th, left:left + tw], (top, left, th, tw))
            if result is None:
                shape = (*out.shape[:-2], int(height * ratio), int(width * ratio))
                result = torch.zeros(shape, dtype=torch.float32, device=out.device)
                weight_sum = torch.zeros(shape[-2:], dtype=torch.float32, device=out.device)
            oh, ow = out.shape[-2:]
            weight = (_ramp(oh, out_overlap, top > 0, top + th < height)[:, None]
                      * _ramp(ow, out_overlap, left > 0, left + tw < width)[None, :]).to(out.device)
            y, x0 = int(top * ratio), int(left * ratio)
            result[..., y:y + oh, x0:x0 + ow] += out.float() * weight
            weight_sum[y:y + oh, x0:x0 + ow] += weight
    return result / weight_sum
