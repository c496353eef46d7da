"""Invisible watermark and metadata: embedded at 256 px and up, read back after PNG and JPEG 90, reported
by `sdgen info`; small images recorded as not watermarked; `--no-watermark`, `--strip-metadata`."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import sdgen
from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.cli import main
from sdgen.pipelines.image_files import EXIF_IFD, USER_COMMENT
from sdgen.provenance import WATERMARK_APPLIED, WATERMARK_TOO_SMALL, finish_images
from sdgen.safety.watermark import MAX_BIT_ERRORS, add_watermark, can_carry_watermark, read_watermark

PROMPT = "a tranquil lake with the mountains"


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with grain, the kind of content generated images have."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [128 + 100 * np.sin(6 * x + seed), 128 + 90 * np.cos(5 * y + 2 * x), 100 + 80 * np.sin(3 * (x + y))]
    pixels = np.stack(channels, -1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def reencode(image: Image.Image, fmt: str, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("size, seed", [((256, 256), 0), ((384, 256), 1), ((512, 512), 2)])
def test_watermark_survives_png_and_jpeg_90(size, seed):
    image = textured(*size, seed=seed)
    marked = add_watermark(image)
    difference = np.abs(np.asarray(marked, dtype=int) - np.asarray(image, dtype=int))
    psnr = 10 * np.log10(255**2 / (difference.astype(float) ** 2).mean())
    assert psnr > 30  # invisible at a glance: SDXL's own setting measures about 33 dB
    png, jpeg = read_watermark(reencode(marked, "PNG")), read_watermark(reencode(marked, "JPEG", quality=90))
    assert png.present and png.bit_errors <= 2, png
    assert jpeg.present and jpeg.bit_errors <= 3, jpeg
    unmarked = read_watermark(image)
    assert not unmarked.present and unmarked.bit_errors > 3 * MAX_BIT_ERRORS  # far from a false positive


def test_small_images_cannot_carry_it():
    small = textured(320, 200)
    assert not can_carry_watermark(small)
    with pytest.raises(ValueError, match="too small"):
        add_watermark(small)
    assert "too small to carry" in read_watermark(small).reason


def test_finish_images_records_what_was_done():
    images = [textured(256, 256), textured(64, 64)]
    done = finish_images(images, ["a\nSteps: 2", "b\nSteps: 2"], watermark=True)
    assert done.watermarked == [True, False] and done.nsfw == [False, False]
    assert done.infotexts[0].endswith(f"Watermark: {WATERMARK_APPLIED}")
    assert done.infotexts[1].endswith(f"Watermark: {WATERMARK_TOO_SMALL}")
    off = finish_images(images, ["a\nSteps: 2", "b\nSteps: 2"], watermark=False)
    assert off.watermarked == [False, False] and off.infotexts == ["a\nSteps: 2", "b\nSteps: 2"]
    assert off.images[0] is images[0]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("watermark")
    return save_folder(make_reference_pipeline("sd1", workdir), workdir / "model")


def _chunks(path) -> list[bytes]:
    """PNG chunk types in order."""
    data = path.read_bytes()
    at, types = 8, []
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        types.append(kind)
        at += 12 + length
    return types


def test_generated_images_are_marked_and_info_reports_it(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", PROMPT, "--model", str(model_folder), "--seed", "5", "--steps", "2", "--sampler", "Euler",
            "--width", "256", "--height", "256", "--out", str(out)]
    assert main(args) == 0
    (path,) = out.glob("*.png")
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"Watermark: {WATERMARK_APPLIED}" in printed and "Invisible watermark: sdgen invisible watermark present" in printed
    jpeg = tmp_path / "copy.jpg"
    Image.open(path).save(jpeg, quality=90)
    assert main(["info", str(jpeg)]) == 0
    assert "Invisible watermark: sdgen invisible watermark present" in capsys.readouterr().out

    assert main(args[:-1] + [str(tmp_path / "plain"), "--no-watermark"]) == 0
    (plain,) = (tmp_path / "plain").glob("*.png")
    assert main(["info", str(plain)]) == 0
    printed = capsys.readouterr().out
    assert "Watermark:" not in printed.splitlines()[0] and "no sdgen invisible watermark" in printed


def test_small_images_say_so_in_their_infotext(model_folder):
    pipe = sdgen.load(model_folder)
    result = pipe.generate(prompt=PROMPT, seed=1, steps=2, sampler="Euler", width=64, height=128, n=2)
    assert result.watermarked == [False, False]
    assert all(text.endswith(f"Watermark: {WATERMARK_TOO_SMALL}") for text in result.infotexts)


def test_strip_metadata_writes_no_text(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", PROMPT, "--model", str(model_folder), "--seed", "3", "--steps", "2", "--width", "64",
                 "--height", "64", "--n", "2", "--out", str(out), "--strip-metadata"]) == 0
    paths = sorted(out.glob("*.png"))
    assert len(paths) == 2 and paths[0].name.endswith("-3.png")  # the seed still names the file
    for path in paths:
        assert not {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"} & set(_chunks(path))
        assert Image.open(path).info.get("parameters") is None
    capsys.readouterr()
    assert main(["info", str(paths[0])]) == 0
    assert "no generation parameters stored" in capsys.readouterr().out
    result = sdgen.load(model_folder).generate(prompt=PROMPT, seed=3, steps=2, width=64, height=64)
    (jpeg,) = result.save(tmp_path / "jpeg", image_format="jpeg", metadata=False)
    with Image.open(jpeg) as image:
        assert USER_COMMENT not in image.getexif().get_ifd(EXIF_IFD) and "exif" not in image.info
    (kept,) = result.save(tmp_path / "kept")
    assert Image.open(kept).info["parameters"] == result.infotexts[0]


def test_missing_package_refuses_before_sampling_unless_turned_off(model_folder, monkeypatch):
    from sdgen import provenance
    from sdgen.safety.watermark import WatermarkUnavailable

    pipe = sdgen.load(model_folder)
    monkeypatch.setattr(provenance, "watermark_available", lambda: False)
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(WatermarkUnavailable, match="--no-watermark"):
        pipe.generate(prompt=PROMPT, seed=1, steps=2, width=256, height=256)
    with pytest.raises(WatermarkUnavailable, match="256 px or more"):  # the hires pass makes 256 px images
        pipe.generate(prompt=PROMPT, seed=1, steps=2, width=128, height=128, hires_scale=2.0)
    monkeypatch.undo()
    assert len(sdgen.load(model_folder, watermark=False).generate(prompt=PROMPT, seed=1, steps=1, width=256,
                                                                   height=256).images) == 1
