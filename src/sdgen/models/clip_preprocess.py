"""CLIP's image preprocessing (Radford et al. 2021) as transformers' `CLIPImageProcessor` does it.

1. RGB: transparency is composited onto white, other modes converted;
2. resize so that the shortest side is `shortest_edge` (the long side `int(edge * long / short)`),
   with PIL's bicubic filter on the 8-bit image;
3. center crop to (crop_height, crop_width) at ((H - h) // 2, (W - w) // 2), zero-padding an
   image smaller than the crop;
4. rescale by 1/255 (in float64, then float32) and normalize per channel with CLIP's mean and std.
A folder's `preprocessor_config.json` can change the sizes, filter, mean and std and turn steps off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's normalisation statistics (its training images).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
            3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


@dataclass(frozen=True)
class CLIPImagePreprocess:
    """Images -> (batch, 3, crop_height, crop_width) float32 pixels for a CLIP image tower."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    resample: int = 3  # PIL's numbering: 3 is bicubic
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        for name in ("shortest_edge", "crop_height", "crop_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"preprocessor {name} must be a positive integer, got {value!r}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"preprocessor resample must be one of {sorted(RESAMPLE)} (PIL filters), got {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError("preprocessor image_mean and image_std need 3 values each, std positive")

    @classmethod
    def for_image_size(cls, size: int) -> "CLIPImagePreprocess":
        """The defaults for an image tower of `size` pixels (resize and crop to it)."""
        return cls(shortest_edge=size, crop_height=size, crop_width=size)

    @classmethod
    def from_config(cls, config: dict, image_size: int = 224) -> "CLIPImagePreprocess":
        """Read a `preprocessor_config.json` dict (old `size: 224` form or `{"shortest_edge": 224}`)."""
        if not isinstance(config, dict):
            raise ValueError("preprocessor_config.json must hold an object")
        size = config.get("size", image_size)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"preprocessor size {size} is not supported; CLIP resizes by its shortest_edge")
            size = size["shortest_edge"]
        crop = config.get("crop_size", size)
        crop_height, crop_width = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(
            shortest_edge=size, crop_height=crop_height, crop_width=crop_width,
            resample=config.get("resample", 3),
            mean=tuple(config.get("image_mean") or CLIP_MEAN), std=tuple(config.get("image_std") or CLIP_STD),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            **{name: bool(config.get(name, True)) for name in
               ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")},
        )

    def rgb(self, image: Image.Image) -> Image.Image:
        if not self.do_convert_rgb:
            return image
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")

    def resize(self, image: Image.Image) -> Image.Image:
        """Shortest side to `shortest_edge`; the long side truncated, as torchvision's Resize(int)."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        return image.resize(size, resample=RESAMPLE[self.resample])

    def center_crop(self, array: np.ndarray) -> np.ndarray:
        """(H, W, C) -> (crop_height, crop_width, C), zero-padded around an image smaller than the crop."""
        height, width = array.shape[:2]
        out_h, out_w = self.crop_height, self.crop_width
        if height < out_h or width < out_w:
            padded = np.zeros((max(height, out_h), max(width, out_w), array.shape[2]), dtype=array.dtype)
            top, left = math.ceil((padded.shape[0] - height) / 2), math.ceil((padded.shape[1] - width) / 2)
            padded[top:top + height, left:left + width] = array
            array, height, width = padded, padded.shape[0], padded.shape[1]
        top, left = (height - out_h) // 2, (width - out_w) // 2
        return array[top:top + out_h, left:left + out_w]

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """A batch of pixel tensors; with cropping off, all images must come out the same size."""
        arrays = []
        for image in images:
            image = self.rgb(image)
            if self.do_resize:
                image = self.resize(image)
            array = np.asarray(image)
            if array.ndim == 2:
                array = array[:, :, None]
            if self.do_center_crop:
                array = self.center_crop(array)
            if self.do_rescale:
                array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
            array = array.astype(np.float32)
            if self.do_normalize:
                array = (array - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
            arrays.append(array.transpose(2, 0, 1))
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("images come out in different sizes; enable center cropping to batch them")
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
