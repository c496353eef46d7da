"""Images carry their parameters (PNG chunk, JPEG / WEBP EXIF UserComment) and `sdgen replay` redraws the same pixels.

Also: file name patterns stay inside the output folder, and `sdgen info` reads every format.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from img2img_reference import sample_image, sample_mask
from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.cli import main
from sdgen.pipelines.image_files import EXIF_IFD, USER_COMMENT, parse_user_comment, read_infotext, user_comment
from sdgen.pipelines.infotext import parse_infotext
from sdgen.pipelines.naming import FilenamePatternError, format_name, free_path, pattern_fields, sanitize


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd1-replay")
    return save_folder(make_reference_pipeline("sd1", workdir), workdir / "model")


def _single(folder):
    files = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg", ".webp"))
    assert len(files) == 1, files
    return files[0]


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_txt2img_with_hires_and_variation_replays_exactly(model_folder, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["generate", "a red boat", "--model", str(model_folder), "--seed", "11", "--steps", "3",
                 "--sampler", "DPM++ 2M", "--scheduler", "karras", "--width", "32", "--height", "32",
                 "--hires", "2", "--hires-strength", "0.55", "--hires-steps", "2", "--subseed", "5",
                 "--subseed-strength", "0.25", "--cfg", "6.5", "--out", str(first)]) == 0
    original = _single(first)
    params = parse_infotext(read_infotext(original))
    assert params["Hires upscale"] == "2.0" and params["Variation seed"] == "5" and params["RNG"] == "CPU"
    assert params["Schedule type"] == "Karras" and params["Seed"] == "11" and "Model hash" in params
    assert main(["replay", str(original), "--model", str(model_folder), "--out", str(second)]) == 0
    assert np.array_equal(_pixels(original), _pixels(_single(second)))
    assert read_infotext(_single(second)) == read_infotext(original)


@pytest.mark.parametrize("image_format, suffix", [("jpeg", ".jpg"), ("webp", ".webp")])
def test_jpeg_and_webp_carry_the_infotext_in_exif(model_folder, tmp_path, capsys, image_format, suffix):
    out = tmp_path / image_format
    assert main(["generate", "a cabin, snow: deep", "--model", str(model_folder), "--seed", "3", "--steps", "2",
                 "--width", "32", "--height", "32", "--format", image_format, "--out", str(out)]) == 0
    path = _single(out)
    assert path.suffix == suffix
    with Image.open(path) as image:
        exif = image.getexif()
        assert 0x0110 not in exif  # never an EXIF Model tag
        comment = exif.get_ifd(EXIF_IFD)[USER_COMMENT]
    assert comment.startswith(b"UNICODE\x00")
    text = parse_user_comment(comment)
    assert text.startswith("a cabin, snow: deep\n") and "Seed: 3" in text
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    assert "Seed: 3" in capsys.readouterr().out
    replayed = tmp_path / f"{image_format}-replayed"
    assert main(["replay", str(path), "--model", str(model_folder), "--out", str(replayed)]) == 0
    assert parse_infotext(read_infotext(_single(replayed)))["Seed"] == "3"


def test_user_comment_readers_accept_both_byte_orders():
    text = "prompt\nSteps: 2, Seed: 1, Size: 8x8"
    assert parse_user_comment(user_comment(text)) == text
    assert parse_user_comment(b"UNICODE\x00" + text.encode("utf-16-le")) == text
    assert parse_user_comment(b"ASCII\x00\x00\x00" + text.encode()) == text


def test_inpainting_replays_with_its_input_and_mask(model_folder, tmp_path):
    image_path, mask_path = tmp_path / "in.png", tmp_path / "mask.png"
    sample_image().save(image_path)
    sample_mask().save(mask_path)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["inpaint", str(image_path), str(mask_path), "a stone", "--model", str(model_folder), "--seed", "4",
                 "--steps", "3", "--strength", "0.6", "--mask-blur", "2", "--masked-content", "fill",
                 "--out", str(first)]) == 0
    original = _single(first)
    params = parse_infotext(read_infotext(original))
    assert params["Denoising strength"] == "0.6" and params["Mask blur"] == "2" and params["Masked content"] == "fill"
    assert main(["replay", str(original), "--model", str(model_folder), "--out", str(second)]) == 2  # needs --init
    assert main(["replay", str(original), "--model", str(model_folder), "--init", str(image_path),
                 "--mask", str(mask_path), "--out", str(second)]) == 0
    assert np.array_equal(_pixels(original), _pixels(_single(second)))


def test_replay_refuses_another_model(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "x", "--model", str(model_folder), "--seed", "1", "--steps", "1", "--width", "32",
                 "--height", "32", "--out", str(out)]) == 0
    path = _single(out)
    text = read_infotext(path).replace("Model hash: ", "Model hash: 0123456789, Old hash: ")
    edited = tmp_path / "edited.png"
    from sdgen.pipelines.image_files import save_image_atomic

    with Image.open(path) as image:
        save_image_atomic(image, edited, text)
    capsys.readouterr()
    assert main(["replay", str(edited), "--model", str(model_folder), "--out", str(tmp_path / "again")]) == 2
    error = capsys.readouterr().err
    assert "hash 0123456789" in error and error.count("\n") == 1


def test_filename_patterns_stay_in_the_folder(tmp_path):
    infotext = 'a/../../etc/passwd: "cat"\nSteps: 2, Sampler: Euler, Seed: 42, Size: 64x64, Model: m'
    values = pattern_fields(infotext, 0, 7)
    assert values["seed"] == "42" and values["number"] == "00007"
    name = format_name("{seed}-{prompt_words}", values)
    assert name == "42-a etc passwd cat"
    for pattern in ("../{seed}", "/abs/{seed}", "..", "{prompt}", "con", "  .hidden{seed}", "a\\b{seed}"):
        stem = format_name(pattern, values)
        path = free_path(tmp_path, stem, ".png")
        assert path.parent == tmp_path and "/" not in stem and "\\" not in stem and not stem.startswith(".")
    assert len(format_name("{prompt}" * 5, {"prompt": "x" * 500})) <= 200
    with pytest.raises(FilenamePatternError, match="unknown filename field"):
        format_name("{sed}", values)
    assert sanitize(' <a:b|c?>. ') == "_a_b_c__"


def test_filename_pattern_and_collisions(model_folder, tmp_path):
    out = tmp_path / "named"
    for _ in range(2):
        assert main(["generate", "a red boat at dawn", "--model", str(model_folder), "--seed", "9", "--steps", "1",
                     "--width", "32", "--height", "32", "--filename", "{seed}-{prompt_words}", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["9-a red boat at dawn-1.png", "9-a red boat at dawn.png"]
