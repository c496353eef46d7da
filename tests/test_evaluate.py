"""`sdgen eval` end to end on a tiny random model: prompt files, the report, the contact sheet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.cli import main
from sdgen.errors import UserError
from sdgen.train.evaluate import evaluate, read_prompts
from sdgen.train.scenes import CATEGORIES


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("eval")
    return save_folder(make_reference_pipeline("sd1", workdir), workdir / "model")


def test_prompt_files_skip_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# written by hand\n\na red circle\n  # indented comment\na lake at night\n")
    assert read_prompts(path, 150) == ["a red circle", "a lake at night"]
    assert len(read_prompts(None, 5)) == 5
    with pytest.raises(UserError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.txt", 5)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt", 5)


def test_eval_reports_every_category_and_writes_its_files(model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle above a blue square on a white background\n"
                       "a tranquil lake with the mountains at sunset\nthe open world\n")
    report = evaluate(str(model), str(prompts), steps=2, out=tmp_path / "out", progress=False)
    assert report.skipped == ["the open world"]
    assert set(report.accuracy) <= set(CATEGORIES) | {"all"} and {"colour", "landscape", "all"} <= set(report.accuracy)
    passed, total = report.accuracy["all"]
    assert 0 <= passed <= total and total == sum(t for k, (_, t) in report.accuracy.items() if k != "all")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["prompts"] == 2 and saved["skipped"] == ["the open world"] and saved["psnr_db"] == report.psnr_db
    with Image.open(tmp_path / "out" / "contact-sheet.png") as sheet:
        assert sheet.width > 0 and sheet.height > 0


def test_cli_eval_refuses_a_file_outside_the_grammar_in_one_line(model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the open world\n")
    assert main(["eval", "--model", str(model), "--prompts", str(prompts), "--steps", "1",
                 "--out", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err.strip()
    assert "none is in the scene grammar" in error and "\n" not in error and "Traceback" not in error
    assert not (tmp_path / "out" / "report.json").exists()


def test_tiny_decoder_quality_scores_a_decoder_against_the_vae(model):
    """A stand-in that is the VAE itself scores as identical; a random tiny decoder scores low."""
    import sdgen
    from sdgen.models.tiny_decoder import TinyDecoder, TinyDecoderConfig
    from sdgen.train.evaluate import tiny_decoder_quality

    pipe = sdgen.load(model)

    class SameAsTheVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, latents):
            return pipe.decode(latents, tiled=False)

    side = pipe.native_size // pipe.latent_factor
    latents = [torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    perfect = tiny_decoder_quality(pipe, SameAsTheVAE(), latents[:1], latents[1:], scenes=8)
    assert min(perfect[key] for key in ("scenes_psnr_db", "final_psnr_db", "preview_psnr_db")) > 100
    assert 0 < perfect["time_ratio"] < 10
    blocks = (1,) * (pipe.latent_factor.bit_length())
    random = tiny_decoder_quality(pipe, TinyDecoder(TinyDecoderConfig(channels=(8,) * len(blocks), blocks=blocks)),
                                  latents[:1], latents[1:], scenes=8)
    assert max(random[key] for key in ("scenes_psnr_db", "final_psnr_db", "preview_psnr_db")) < 25


def test_eval_scores_the_models_own_tiny_decoder(model, tmp_path):
    import shutil

    from safetensors.torch import save_file

    import sdgen
    from sdgen.models.tiny_decoder import FOLDER_FILE, TinyDecoder, TinyDecoderConfig

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    blocks = (1,) * sdgen.load(folder).latent_factor.bit_length()
    save_file(TinyDecoder(TinyDecoderConfig(channels=(8,) * len(blocks), blocks=blocks)).state_dict(),
              str(folder / FOLDER_FILE))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle above a blue square on a white background\n")
    report = evaluate(str(folder), str(prompts), steps=4, out=tmp_path / "out", progress=False)
    assert set(report.tiny_decoder) == {"scenes_psnr_db", "final_psnr_db", "preview_psnr_db", "time_ratio"}
    assert any("tiny preview decoder against the VAE" in line for line in report.lines())
    assert json.loads((tmp_path / "out" / "report.json").read_text())["tiny_decoder"] == report.tiny_decoder
