"""Tiled processing of large images: overlapping tiles, blended with linear ramps across each overlap.

A function that maps an input tile to an output tile `ratio` times its size (the VAE decoder:
8, its encoder: 1/8, a denoiser: 1) runs on tiles of at most `tile` x `tile` input pixels that
overlap by `overlap`; where tiles overlap, their outputs are averaged with weights that fall
linearly towards each tile's inner edges, so seams fade instead of showing. Memory then grows
with the tile size, not with the image (a 2048x2048 image decodes in about 2 GB).

Tiles do not see each other. For the VAE (`tiled_vae_decode` / `tiled_vae_encode`) only the
convolutional part at high resolution is tiled: the single self-attention runs on the whole
latent (it is small there, and attention is what tiles would lose most). GroupNorm would
normalise each tile by its own statistics and shift colours from tile to tile, so the tiles run
twice: the first pass gathers every GroupNorm call's sums over all tiles (for the decoder it
already normalises with statistics probed on a subsampled copy of the whole latent), the second
normalises every tile with those whole-image statistics. What remains is the missing context of
convolutions near inner edges, hidden by the overlap, so the result is close to the untiled one,
not equal. Tiling starts only above a size where a whole pass would need several GB.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class SharedGroupNorm:
    """Make every GroupNorm inside `model` use statistics pooled over the whole input on the previous pass.

    GroupNorm calls happen in the same order in every tile, so call k of a tile is matched with
    call k of the others. `start_tile(region)` resets the counter and says which fractions of the
    tile it owns (overlaps are counted once); `end_pass()` turns the pooled sums into the mean
    and variance used from then on (per image and group).
    """

    def __init__(self, model: nn.Module) -> None:
        self.norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[int, tuple[Tensor, Tensor]] | None = None
        self.sums: dict[int, list] = {}
        self.call, self.region = 0, (0.0, 1.0, 0.0, 1.0)

    def __enter__(self) -> "SharedGroupNorm":
        for norm in self.norms:
            norm.forward = lambda x, norm=norm: self.forward(norm, x)
        return self

    def __exit__(self, *exc) -> None:
        for norm in self.norms:
            norm.__dict__.pop("forward", None)

    def start_tile(self, region: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)) -> None:
        self.call, self.region = 0, region

    def end_pass(self) -> None:
        self.stats = {}
        for call, (total, squares, count) in self.sums.items():
            mean = total / count
            self.stats[call] = mean, (squares / count - mean**2).clamp(min=0)
        self.sums = {}

    def forward(self, norm: nn.GroupNorm, x: Tensor) -> Tensor:
        call, self.call = self.call, self.call + 1
        owned = x
        if x.ndim == 4:
            (y0, y1, x0, x1), (height, width) = self.region, x.shape[-2:]
            owned = x[..., round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)]
        grouped = owned.float().reshape(x.shape[0], norm.num_groups, -1)
        sums = self.sums.setdefault(call, [0.0, 0.0, 0])
        sums[0] = sums[0] + grouped.sum(-1)
        sums[1] = sums[1] + (grouped * grouped).sum(-1)
        sums[2] += grouped.shape[-1]
        if self.stats is None:
            return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        mean, var = self.stats[call]
        grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)
        normed = ((grouped - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
        affine = (1, -1) + (1,) * (x.ndim - 2)
        return normed.to(x.dtype) * norm.weight.view(affine) + norm.bias.view(affine)


def _owned(starts: list[int], size: int, tile: int, index: int) -> tuple[float, float]:
    """The fraction of tile `index` it owns along one axis: up to the middle of each overlap."""
    start, end = starts[index], min(starts[index] + tile, size)
    low = start if index == 0 else (starts[index - 1] + tile + start) / 2
    high = end if index == len(starts) - 1 else (start + tile + starts[index + 1]) / 2
    return (low - start) / (end - start), (high - start) / (end - start)


def tiled_with_shared_norms(fn: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor, tile: int, overlap: int,
                            ratio: float | Fraction = 1, align: int = 1, probe: bool = False) -> Tensor:
    """`tiled_apply` of `fn` with GroupNorm statistics of the whole input (see the module notes).

    A pass over the tiles gathers the statistics (each tile counting the part it owns), the
    second makes the output with them. With `probe`, the first pass already normalises with the
    statistics of a subsampled copy of the whole input (every k-th pixel, no larger than a
    tile): better for the decoder's smooth latent features; subsampling pixels aliases, so the
    encoder's first pass uses each tile's own statistics.
    """
    height, width = x.shape[-2:]
    rows, cols = tile_starts(height, tile, overlap, align), tile_starts(width, tile, overlap, align)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    with SharedGroupNorm(model) as norms:
        if probe:
            stride = -(-max(height, width) // tile)
            norms.start_tile()
            fn(x[..., ::stride, ::stride])
            norms.end_pass()

        def run(tile_x: Tensor, box: Box) -> Tensor:
            top, left, _, _ = box
            norms.start_tile((*_owned(rows, height, tile, rows.index(top)), *_owned(cols, width, tile, cols.index(left))))
            return fn(tile_x)

        tiled_apply(run, x, tile, overlap, ratio, align)  # statistics only
        norms.end_pass()
        return tiled_apply(run, x, tile, overlap, ratio, align)


def _mid(stage: nn.Module, h: Tensor) -> Tensor:
    """A VAE mid block: res block, self-attention (if any), res block."""
    h = stage.resnets[0](h)
    if len(stage.attentions):
        h = stage.attentions[0](h)
    return stage.resnets[1](h)


def tiled_vae_decode(vae: nn.Module, latents: Tensor, tile: int, overlap: int) -> Tensor:
    """AutoencoderKL.decode with the decoder's up blocks in tiles of `tile` latents (stem and attention whole)."""
    decoder = vae.decoder
    if vae.post_quant_conv is not None:
        latents = vae.post_quant_conv(latents)
    h = _mid(decoder.mid_block, decoder.conv_in(latents))

    def up(h: Tensor) -> Tensor:
        for stage in decoder.up_blocks:
            for resnet in stage.resnets:
                h = resnet(h)
            if stage.upsamplers is not None:
                h = stage.upsamplers[0](h)
        return decoder.conv_out(F.silu(decoder.conv_norm_out(h)))

    return tiled_with_shared_norms(up, decoder, h, tile, overlap, ratio=vae.cfg.downsample_factor, probe=True)


def tiled_vae_encode(vae: nn.Module, pixels: Tensor, tile: int, overlap: int) -> Tensor:
    """The posterior mean of AutoencoderKL.encode with the encoder's down blocks in tiles of `tile` pixels."""
    encoder, factor = vae.encoder, vae.cfg.downsample_factor

    def down(h: Tensor) -> Tensor:
        h = encoder.conv_in(h)
        for stage in encoder.down_blocks:
            for resnet in stage.resnets:
                h = resnet(h)
            if stage.downsamplers is not None:
                h = stage.downsamplers[0](h)
        return h

    h = tiled_with_shared_norms(down, encoder, pixels, tile, overlap, ratio=Fraction(1, factor), align=factor)
    h = _mid(encoder.mid_block, h.to(pixels.dtype))
    moments = encoder.conv_out(F.silu(encoder.conv_norm_out(h)))
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    return moments.chunk(2, dim=1)[0]
