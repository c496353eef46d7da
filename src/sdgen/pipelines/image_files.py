"""Image files with their infotext: PNG `parameters` chunk, JPEG / WEBP EXIF UserComment (A1111's `save_image`).

JPEG and WEBP carry the text as A1111 writes it with piexif: the Exif IFD's UserComment
(0x9286), the 8-byte charset code "UNICODE\\0" followed by UTF-16 big-endian. No other EXIF
tag is written; in particular no `Model` (0x0110) tag, which some readers parse as JSON.
Files are written to a temporary name and renamed, so no reader sees half a file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from sdgen.errors import UserError
from sdgen.pipelines.images import open_image
from sdgen.pipelines.output import png_with_parameters
from sdgen.runtime.files import write_bytes_atomically

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
_UNICODE, _ASCII = b"UNICODE\x00", b"ASCII\x00\x00\x00"
QUALITY = 90  # A1111's default jpeg_quality (also used for WEBP)


def image_format(name: str) -> str:
    """PIL's format name for png / jpeg / jpg / webp (any case); UserError otherwise."""
    key = str(name).strip().lower().lstrip(".")
    if key not in FORMATS:
        raise UserError(f"unknown image format {name!r}; choose png, jpeg or webp")
    return FORMATS[key]


def user_comment(text: str) -> bytes:
    """EXIF UserComment bytes for `text`: "UNICODE\\0" + UTF-16BE (piexif's `UserComment.dump(..., "unicode")`)."""
    return _UNICODE + text.encode("utf-16-be")


def parse_user_comment(value: bytes | str) -> str:
    """Text of an EXIF UserComment in any of its charset codes (UTF-16 either byte order, ASCII, undefined)."""
    if isinstance(value, str):
        return value
    head, body = value[:8], value[8:]
    if head == _UNICODE:
        # piexif writes big-endian; some tools write little-endian with a BOM or without one.
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16")
        big, little = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")
        return big if sum(c.isprintable() for c in big) >= sum(c.isprintable() for c in little) else little
    if head in (_ASCII, b"\x00" * 8):
        return body.decode("utf-8", "replace").rstrip("\x00")
    return value.decode("utf-8", "replace").rstrip("\x00")


def encode_image(image: Image.Image, fmt: str, infotext: str | None) -> bytes:
    """The file bytes of `image` in `fmt` (PNG, JPEG, WEBP) carrying `infotext`."""
    buffer = io.BytesIO()
    if fmt == "PNG":
        image.save(buffer, format="PNG", pnginfo=png_with_parameters(image, infotext))
    else:
        options = {}
        if infotext:  # without one, no EXIF block at all (--strip-metadata)
            exif = Image.Exif()
            exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(infotext)
            options["exif"] = exif.tobytes()
        image.convert("RGB").save(buffer, format=fmt, quality=QUALITY, **options)
    return buffer.getvalue()


def save_image_atomic(image: Image.Image, path: str | os.PathLike, infotext: str | None = None,
                      fmt: str = "PNG") -> Path:
    """Write `image` to `path` in `fmt` with its infotext, through a temporary file and a rename."""
    return write_bytes_atomically(path, encode_image(image, fmt, infotext))


def read_infotext(path: str | os.PathLike) -> str | None:
    """The infotext stored in a PNG, JPEG or WEBP image (PNG chunk first, then EXIF UserComment), or None."""
    with open_image(path) as image:
        text = image.info.get("parameters")
        if text:
            return text
        try:  # a PNG's EXIF may follow the pixel data, so Pillow decodes them to reach it
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
        except (OSError, SyntaxError, ValueError) as error:
            raise UserError(f"{path}: the image data is damaged or truncated ({error})") from None
    if not comment:
        return None
    return parse_user_comment(comment) or None
