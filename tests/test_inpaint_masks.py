"""Mask and resize helpers against independent computations (scipy, numpy, A1111's documented examples)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter1d

from sdgen.pipelines.masks import (
    binary_mask, blur_mask, crop_region, expand_to_ratio, fill_masked, latent_mask, outpaint_canvas, overlay_mask,
    paste_back, resize_image,
)
from sdgen.pipelines.tiling import tile_starts, tiled_apply


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("radius", [1, 4, 7])
def test_blur_matches_scipy_gaussian_with_opencv_kernel_and_border(radius):
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[10:25, 5:30] = 255
    mask[0:3, 45:50] = 255  # touches the border: reflect-101
    expected = mask.astype(np.float64)
    for axis in (1, 0):  # x then y, 8-bit rounding after each pass, kernel size 2 * int(2.5 r + 0.5) + 1
        expected = np.clip(np.round(gaussian_filter1d(expected, radius, axis=axis, mode="mirror", truncate=2.5)), 0, 255)
    ours = np.asarray(blur_mask(Image.fromarray(mask), radius)).astype(np.float64)
    assert np.abs(ours - expected).max() <= 1
    assert np.abs(ours - expected).mean() < 0.01


def test_blur_of_a_small_mask_with_a_wide_kernel_reflects_repeatedly():
    mask = Image.fromarray(np.array([[0, 255, 0]], dtype=np.uint8))
    assert np.asarray(blur_mask(mask, 8)).shape == (1, 3)


def test_crop_region_is_expanded_to_the_generation_ratio():
    # A1111's example: a 128x32 mask region processed at 512x512 becomes 128x128.
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[200:232, 100:228] = 255
    region = crop_region(Image.fromarray(mask), 0)
    assert region == (100, 200, 228, 232)
    x1, y1, x2, y2 = expand_to_ratio(region, 512, 512, 512, 512)
    assert (x2 - x1, y2 - y1) == (128, 128) and (x1, x2) == (100, 228) and (y1, y2) == (152, 280)


def test_crop_region_stays_inside_the_image():
    mask = np.zeros((100, 200), dtype=np.uint8)
    mask[0:10, 190:200] = 255
    region = crop_region(Image.fromarray(mask), 4)
    assert region == (186, 0, 200, 14)
    x1, y1, x2, y2 = expand_to_ratio(region, 64, 32, 200, 100)
    assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 100 and x2 == 200
    assert crop_region(Image.new("L", (8, 8)), 4) is None


def test_resize_modes():
    image = _noise_image(100, 50)
    assert resize_image("stretch", image, 64, 64).size == (64, 64)
    cropped = resize_image("crop", image, 64, 64)  # cover: 128x64 scaled, centre 64 columns kept
    expected = image.resize((128, 64), Image.Resampling.LANCZOS).crop((32, 0, 96, 64))
    assert np.array_equal(np.asarray(cropped), np.asarray(expected))
    filled = np.asarray(resize_image("fill", image, 64, 64))  # fit: 64x32 in the middle, bands stretched
    fitted = np.asarray(image.resize((64, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(filled[16:48], fitted)
    assert np.array_equal(filled[0], fitted[0]) and np.array_equal(filled[63], fitted[-1])
    same = resize_image("stretch", image, 100, 50)
    assert np.array_equal(np.asarray(same), np.asarray(image))


def test_transparent_mask_uses_alpha_and_invert():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[2:4, 2:4, 3] = 255
    mask = np.asarray(binary_mask(Image.fromarray(rgba, "RGBA")))
    assert mask[2, 2] == 255 and mask[0, 0] == 0
    inverted = np.asarray(binary_mask(Image.fromarray(rgba, "RGBA"), invert=True))
    assert inverted[2, 2] == 0 and inverted[0, 0] == 255


def test_fill_keeps_known_pixels_and_spreads_colours_inwards():
    image = Image.new("RGB", (32, 32), (200, 40, 10))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    filled = np.asarray(fill_masked(image, Image.fromarray(mask))).astype(int)
    assert np.array_equal(filled[mask == 0], np.asarray(image)[mask == 0])
    assert np.abs(filled - (200, 40, 10)).max() <= 8  # premultiplied-alpha rounding, as in A1111


def test_latent_mask_rounds_a_bicubic_resize():
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :36] = 255
    small = latent_mask(Image.fromarray(mask), 8, 8)
    assert small.shape == (1, 1, 8, 8)
    assert set(small.unique().tolist()) <= {0.0, 1.0}
    assert small[0, 0, :, :4].eq(1).all() and small[0, 0, :, 5:].eq(0).all()


def test_paste_back_keeps_the_original_outside_the_mask():
    original, generated = _noise_image(32, 32, 1), _noise_image(32, 32, 2)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[10:20, 10:20] = 255
    out = np.asarray(paste_back(generated, original, overlay_mask(Image.fromarray(mask))))
    assert np.array_equal(out[mask == 0], np.asarray(original)[mask == 0])
    assert np.array_equal(out[mask == 255], np.asarray(generated)[mask == 255])


def test_outpaint_canvas_and_mask():
    image = _noise_image(20, 10)
    canvas, mask = outpaint_canvas(image, 8, 0, 4, 0, mask_blur=1)
    assert canvas.size == (28, 14) and mask.size == (28, 14)
    m = np.asarray(mask)
    assert (m[:4 + 2] == 255).all() and (m[:, :8 + 2] == 255).all()  # border plus 2 * blur
    assert (m[6:, 10:] == 0).all()
    assert np.array_equal(np.asarray(canvas)[4:, 8:], np.asarray(image))
    assert np.array_equal(np.asarray(canvas)[0, 8:], np.asarray(image)[0])  # stretched edge


def test_tile_starts_cover_and_align():
    assert tile_starts(64, 96, 24) == [0]
    starts = tile_starts(256, 96, 24)
    assert starts[0] == 0 and starts[-1] == 160 and all(b - a <= 72 for a, b in zip(starts, starts[1:]))
    assert all(s % 8 == 0 for s in tile_starts(1000, 768, 192, align=8))


def test_tiled_apply_is_exact_for_a_pointwise_function():
    x = torch.randn(1, 3, 50, 70)
    out = tiled_apply(lambda tile, box: tile.repeat_interleave(2, -1).repeat_interleave(2, -2) * 3, x, 16, 6, ratio=2)
    expected = x.repeat_interleave(2, -1).repeat_interleave(2, -2) * 3
    assert torch.allclose(out, expected, atol=1e-6)
