"""Reading images from users: checked before decoding, converted between PIL and tensors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdgen.errors import UserError

MAX_INPUT_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS  # Pillow then refuses decompression bombs


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open a PNG, JPEG or WEBP image, refusing anything else before it is decoded."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        image = Image.open(path, formats=["PNG", "JPEG", "WEBP"])
    except Image.DecompressionBombError as error:
        raise UserError(f"{path}: image too large ({error}); the limit is {MAX_INPUT_PIXELS} pixels") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: not a readable PNG, JPEG or WEBP image ({error})") from None
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise UserError(f"{path}: {image.width}x{image.height} is over the limit of {MAX_INPUT_PIXELS} pixels")
    return image


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open and decode an image (see `open_image`); a truncated or corrupt file is a UserError, not a traceback."""
    image = open_image(path)
    try:
        image.load()  # also parses text chunks after the pixel data, under Pillow's size limits
    except (OSError, SyntaxError, ValueError) as error:
        image.close()
        raise UserError(f"{path}: the image data is damaged or truncated ({error})") from None
    return image


def read_image_parameters(path: str | os.PathLike) -> str | None:
    """The infotext stored in an image (PNG `parameters` chunk), or None."""
    with open_image(path) as image:
        return image.info.get("parameters")


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(batch, 3, H, W) in [-1, 1] -> PIL images, rounded as AUTOMATIC1111 and diffusers do."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(item)) for item in array]
