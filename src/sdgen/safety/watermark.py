"""Invisible watermark: a 48-bit mark in the image, DWT-DCT through the `invisible-watermark` package.

As SDXL's pipelines do (diffusers' `StableDiffusionXLWatermarker`), the image goes to the encoder
as float BGR in [0, 255] with the "dwtDct" method: a Haar wavelet transform of one YUV channel,
and in every 4x4 block of its approximation band the largest coefficient is quantised so that
its remainder modulo a step says one bit; the 48 bits repeat over the image and the decoder
averages the votes per bit. The reader converts to float the same way, so the chroma offset the
encoder saw is the one it reads back.

One difference from SDXL: SDXL marks the U (chroma) channel with step 36. Measured here on
textured 256-768 px images, that mark came back with 3-12 wrong bits after a lossless PNG round
trip and as noise (about 24 of 48 wrong) after a JPEG re-save at quality 90, whose chroma
quantisation erases it. sdgen marks the luma channel with step 20 (`SCALES`): 0-2 wrong bits
after PNG, at most 3 after JPEG 90, for the same PSNR (about 33 dB) as SDXL's setting. Large flat
or saturated areas hold the mark poorly (clipping, ties between coefficients): a found mark is
strong evidence, a missing one is not proof of absence.

The mark is ours (the first 48 bits of sha256("sdgen invisible watermark v1")), not Stability's.
The package refuses images under 256x256 pixels; sdgen watermarks images whose shorter side is
at least 256 px and records smaller ones as not watermarked. A found mark allows
`MAX_BIT_ERRORS` flipped bits; random bits match 48 with at most 6 errors with probability 5e-8,
and unmarked images measured here read 18-28 bits off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdgen.errors import UserError

WATERMARK_HEX = "a6eb02bc9fb0"
WATERMARK_BITS = [int(bit) for bit in bin(int(WATERMARK_HEX, 16))[2:].zfill(48)]
METHOD = "dwtDct"
SCALES = [20, 0, 0]  # quantisation step per YUV channel: luma only (see above)
MIN_SIDE = 256
MAX_BIT_ERRORS = 6
INSTALL_HINT = ("pip install opencv-python-headless PyWavelets && pip install --no-deps invisible-watermark==0.2.0 "
                "(or pass --no-watermark)")


class WatermarkUnavailable(UserError):
    """The `invisible-watermark` package (or OpenCV / PyWavelets under it) is not installed."""


def _package():
    """The package's encoder and decoder classes, imported on first use (OpenCV is slow to import)."""
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError as error:
        raise WatermarkUnavailable(f"cannot add or read the invisible watermark: {error}; {INSTALL_HINT}") from None
    return WatermarkEncoder, WatermarkDecoder


def watermark_available() -> bool:
    """True when the package and its OpenCV / PyWavelets dependencies import."""
    try:
        _package()
    except WatermarkUnavailable:
        return False
    return True


def can_carry_watermark(image: Image.Image) -> bool:
    """The package works on images of at least 256x256; we ask for 256 px on the shorter side."""
    return min(image.size) >= MIN_SIDE


def _bgr_float(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def add_watermark(image: Image.Image) -> Image.Image:
    """The image with sdgen's mark embedded; ValueError for an image under 256 px on a side."""
    if not can_carry_watermark(image):
        raise ValueError(f"a {image.width}x{image.height} image is too small for the watermark (needs {MIN_SIDE} px)")
    encoder_cls, _ = _package()
    encoder = encoder_cls()
    encoder.set_watermark("bits", WATERMARK_BITS)
    encoded = encoder.encode(_bgr_float(image), METHOD, scales=SCALES)
    rgb = np.clip(np.rint(encoded[:, :, ::-1]), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(rgb))


@dataclass(frozen=True)
class WatermarkReading:
    """What the decoder found: `present` when at most MAX_BIT_ERRORS of the 48 bits differ from ours."""

    present: bool
    bit_errors: int | None  # None: the image could not be read (too small)
    reason: str  # one line for `sdgen info`


def read_watermark(image: Image.Image) -> WatermarkReading:
    """Decode the 48 bits and compare them with sdgen's mark."""
    if not can_carry_watermark(image):
        return WatermarkReading(False, None, f"none: {image.width}x{image.height} is under {MIN_SIDE} px, "
                                             "too small to carry the invisible watermark")
    _, decoder_cls = _package()
    bits = decoder_cls("bits", len(WATERMARK_BITS)).decode(_bgr_float(image), METHOD, scales=SCALES)
    errors = int(sum(int(bool(a)) != b for a, b in zip(bits, WATERMARK_BITS)))
    if errors <= MAX_BIT_ERRORS:
        return WatermarkReading(True, errors, f"sdgen invisible watermark present ({METHOD}, "
                                              f"{len(WATERMARK_BITS) - errors} of {len(WATERMARK_BITS)} bits match)")
    return WatermarkReading(False, errors, f"no sdgen invisible watermark ({errors} of {len(WATERMARK_BITS)} bits differ)")
