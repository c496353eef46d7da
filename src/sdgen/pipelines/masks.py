"""Inpainting masks and image fitting as AUTOMATIC1111 1.10 does them (`processing.py`, `masking.py`, `images.py`).

A mask is a greyscale PIL image, white where the model repaints. Everything here works on PIL
images so that the pixels match what A1111 feeds its VAE: the input is fitted to the generation
size by one of three resize modes, the mask edge is blurred with a Gaussian, and the result is
pasted back over the original through the (blurred) mask so that unmasked pixels never change.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

LANCZOS = Image.Resampling.LANCZOS


def flatten(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """RGB image; transparency is composited over `background` (A1111's img2img background colour)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background)
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(mode: str, image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit `image` to width x height with Lanczos: "stretch", "crop" (cover, centre crop) or "fill" (fit, pad).

    "fill" pads the bands beside the fitted image with its first / last row or column stretched,
    as A1111's "Resize and fill".
    """
    if mode == "stretch":
        return image.resize((width, height), resample=LANCZOS)
    ratio, source_ratio = width / height, image.width / image.height
    # "crop" scales until both sides cover the target, "fill" until both fit inside it.
    width_bound = ratio > source_ratio if mode == "crop" else ratio < source_ratio
    fit_w = width if width_bound else image.width * height // image.height
    fit_h = image.height * width // image.width if width_bound else height
    resized = image.resize((fit_w, fit_h), resample=LANCZOS)
    result = Image.new(image.mode if image.mode in ("L", "RGB") else "RGB", (width, height))
    left, top = width // 2 - fit_w // 2, height // 2 - fit_h // 2
    result.paste(resized, (left, top))
    if mode == "fill":
        if ratio < source_ratio and top > 0:  # bands above and below
            first, last = resized.crop((0, 0, fit_w, 1)), resized.crop((0, fit_h - 1, fit_w, fit_h))
            result.paste(first.resize((width, top)), (0, 0))
            result.paste(last.resize((width, height - top - fit_h)), (0, top + fit_h))
        elif ratio > source_ratio and left > 0:  # bands left and right
            first, last = resized.crop((0, 0, 1, fit_h)), resized.crop((fit_w - 1, 0, fit_w, fit_h))
            result.paste(first.resize((left, height)), (0, 0))
            result.paste(last.resize((width - left - fit_w, height)), (left + fit_w, 0))
    return result


def binary_mask(mask: Image.Image, invert: bool = False) -> Image.Image:
    """A greyscale mask: a transparent RGBA mask means its alpha (> 128), anything else its luminance."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    else:
        mask = mask.convert("L")
    return ImageOps.invert(mask) if invert else mask


def gaussian_kernel(radius: int) -> torch.Tensor:
    """OpenCV's getGaussianKernel for A1111's mask blur: size 2 * int(2.5 r + 0.5) + 1, sigma r."""
    size = 2 * int(2.5 * radius + 0.5) + 1
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * radius**2))
    return (kernel / kernel.sum()).float()


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """Separable Gaussian blur, horizontal then vertical, each pass rounded to 8 bits (cv2.GaussianBlur).

    Borders reflect without repeating the edge pixel (OpenCV's BORDER_REFLECT_101).
    """
    if radius <= 0:
        return mask
    kernel = gaussian_kernel(radius)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    for horizontal in (True, False):
        pad = len(kernel) // 2
        padding = (pad, pad, 0, 0) if horizontal else (0, 0, pad, pad)
        weight = kernel.view(1, 1, 1, -1) if horizontal else kernel.view(1, 1, -1, 1)
        padded = _reflect_pad(pixels, padding)
        pixels = F.conv2d(padded, weight).round().clamp(0, 255)
    return Image.fromarray(pixels[0, 0].numpy().astype(np.uint8), "L")


def _reflect_pad(x: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect-101 padding that also works when the pad is wider than the image (repeated reflection)."""
    left, right, top, bottom = padding
    height, width = x.shape[-2:]
    rows = _reflect_index(torch.arange(-top, height + bottom), height)
    cols = _reflect_index(torch.arange(-left, width + right), width)
    return x[..., rows[:, None], cols[None, :]]


def _reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index < size, index, period - index)


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """Bounding box (x1, y1, x2, y2) of the non-black mask pixels grown by `padding`, or None for a blank mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_to_ratio(region: tuple[int, int, int, int], width: int, height: int,
                    image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """Grow `region` to the width:height ratio of the generation, staying inside the image where it can."""
    x1, y1, x2, y2 = region
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(low: int, high: int, extra: int, limit: int) -> tuple[int, int]:
    """Widen [low, high) by `extra` split evenly, shifted back inside [0, limit) and clipped to it."""
    low, high = low - extra // 2, high + extra - extra // 2
    if high > limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, high - low
    return low, min(high, limit)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area takes the blurred colours of its surroundings.

    The unmasked pixels are blurred at decreasing radii and composited over each other, so that
    colours spread inwards from the mask edge; the unmasked area itself ends up unchanged.
    """
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    result = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def latent_mask(mask: Image.Image, latent_width: int, latent_height: int) -> torch.Tensor:
    """(1, 1, h, w) with 1 where latents are repainted: the mask resized bicubically and rounded, as A1111."""
    small = mask.convert("L").resize((latent_width, latent_height), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.around(np.asarray(small, dtype=np.float32) / 255))[None, None]


def pixel_mask(mask: Image.Image) -> torch.Tensor:
    """(1, 1, H, W) mask rounded to 0 / 1: what an inpainting model's mask channel is built from."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255).round()[None, None]


def overlay_mask(mask: Image.Image) -> Image.Image:
    """A1111's paste-back mask for whole-picture inpainting: the blurred mask doubled, so its edge stays soft
    inside the masked area and the unmasked side is the original exactly."""
    doubled = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(doubled, "L")


def paste_back(generated: Image.Image, original: Image.Image, mask: Image.Image,
               region: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Composite `generated` over `original` through `mask` (white = generated).

    With a `region` ("only masked"), `generated` covers that box of the original: it is fitted
    to the box (cover and centre crop) and placed there first.
    """
    if region is not None:
        x1, y1, x2, y2 = region
        canvas = Image.new("RGBA", original.size)
        canvas.paste(resize_image("crop", generated, x2 - x1, y2 - y1), (x1, y1))
        generated = canvas
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    result = generated.convert("RGBA")
    result.alpha_composite(kept.convert("RGBA"))
    return result.convert("RGB")


def outpaint_canvas(image: Image.Image, left: int, right: int, up: int, down: int,
                    mask_blur: int) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) to outpaint: the image on a larger canvas, its new border filled by stretching the
    edge pixels, and a mask over the border that reaches 2 * mask_blur pixels into the image so that
    the seam is repainted and blended (A1111's "Poor man's outpainting")."""
    array = np.asarray(image.convert("RGB"))
    canvas = np.pad(array, ((up, down), (left, right), (0, 0)), mode="edge")
    height, width = canvas.shape[:2]
    mask = np.full((height, width), 255, dtype=np.uint8)
    reach = 2 * mask_blur
    top = up + (reach if up else 0)
    bottom = height - down - (reach if down else 0)
    start = left + (reach if left else 0)
    end = width - right - (reach if right else 0)
    mask[max(top, 0):max(bottom, 0), max(start, 0):max(end, 0)] = 0
    return Image.fromarray(canvas), Image.fromarray(mask, "L")


def round_up(value: int, multiple: int = 8) -> int:
    """The smallest multiple of `multiple` at or above `value`."""
    return int(math.ceil(value / multiple) * multiple)
