"""`sdgen img2img / inpaint / outpaint / upscale` from the command line: results, and bad input as one line with exit 2."""

from __future__ import annotations

import pytest
from PIL import Image

from img2img_reference import sample_image, sample_mask
from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd1-cli")
    model = save_folder(make_reference_pipeline("sd1", workdir), workdir / "model")
    image, mask, small_mask, text = (workdir / name for name in ("in.png", "mask.png", "small.png", "notes.png"))
    sample_image().save(image)
    sample_mask().save(mask)
    sample_mask(32, (4, 4, 20, 20)).save(small_mask)
    text.write_text("not an image")
    return {"model": str(model), "image": str(image), "mask": str(mask), "small_mask": str(small_mask),
            "text": str(text)}


def _run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_img2img_and_outpaint_write_images(files, tmp_path, capsys):
    code, _ = _run(capsys, "img2img", files["image"], "a lake", "--model", files["model"], "--steps", "2",
                   "--strength", "0.5", "--seed", "1", "--out", tmp_path / "a")
    assert code == 0
    [path] = list((tmp_path / "a").iterdir())
    with Image.open(path) as image:
        assert image.size == (64, 64) and "Denoising strength: 0.5" in image.info["parameters"]
    code, _ = _run(capsys, "outpaint", files["image"], "a lake", "--model", files["model"], "--steps", "2",
                   "--left", "16", "--down", "8", "--out", tmp_path / "b")
    assert code == 0
    [path] = list((tmp_path / "b").iterdir())
    with Image.open(path) as image:
        assert image.size == (80, 72)


@pytest.mark.parametrize("argv, message", [
    (["inpaint", "{image}", "{small_mask}", "x"], "mask is 32x32 but the image is 64x64"),
    (["img2img", "{text}", "x"], "not a readable PNG, JPEG or WEBP image"),
    (["img2img", "{image}", "x", "--width", "100000", "--height", "64"], "width 100000 is over the limit"),
    (["img2img", "{image}", "x", "--strength", "1.5"], "strength must be between 0.0 and 1.0"),
    (["img2img", "{image}", "x", "--strength", "-0.2"], "strength must be between 0.0 and 1.0"),
    (["img2img", "{image}", "x", "--hires", "2"], "unrecognized"),
    (["generate", "x", "--hires", "9"], "hires_scale must be between"),
    (["generate", "x", "--hires", "2", "--hires-upscaler", "ESRGAN"], "hires_upscaler must be one of"),
    (["generate", "x", "--subseed-strength", "2"], "subseed_strength must be between"),
    (["generate", "x", "--filename", "{{nope}}"], "unknown filename field"),
    (["outpaint", "{image}", "x"], "left, right, up and down are all 0"),
    (["img2img", "{image}", "x", "--xy", "speed=1,2"], "X/Y axis"),
    (["upscale", "{image}", "x", "--model", "{text}"], "not a diffusers folder"),
    (["replay", "{image}"], "no generation parameters stored"),
])
def test_bad_input_is_one_line_and_exit_2(files, capsys, argv, message):
    argv = [a.format(**files) for a in argv]
    if argv[0] not in ("upscale", "replay"):
        argv += ["--model", files["model"], "--steps", "1"]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    error = capsys.readouterr().err
    assert code == 2
    assert message in error
    if "unrecognized" not in message:
        assert error.count("\n") == 1 and error.startswith("sdgen: error: ")
