"""CLIP ranking: image preprocessing against transformers' CLIPImageProcessor (its PIL backend here,
torchvision being absent), scores against transformers' CLIPModel on a tiny random CLIP saved as a
transformers folder, saving and reporting ranked images, `sdgen rank`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import reference_clip as ref
from img2img_reference import sample_image
from reference_pipelines import reference_tokenizer
from sdgen.cli import main
from sdgen.errors import UserError
from sdgen.models.clip_preprocess import CLIPImagePreprocess
from sdgen.pipelines.images import read_image_parameters
from sdgen.pipelines.ranking import CLIPRanker, rank_folder, rank_result
from sdgen.pipelines.request import GenerationRequest
from sdgen.pipelines.stable_diffusion import GenerationResult

PROMPT = "a red circle on a blue sky"


def _images() -> list[Image.Image]:
    """Landscape, portrait, square, transparent, greyscale and palette images (no two the same size)."""
    base = sample_image(96, seed=1)
    transparent = sample_image(50, seed=2).convert("RGBA")
    transparent.putalpha(Image.linear_gradient("L").resize((50, 50)))
    return [base.resize((96, 57)), sample_image(40, seed=3).resize((33, 71)), sample_image(24, seed=4), transparent,
            sample_image(45, seed=5).convert("L"), sample_image(64, seed=6).convert("P")]


@pytest.mark.parametrize("settings", [
    {},  # transformers' defaults: shortest edge 224, crop 224x224
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    {"size": {"shortest_edge": 40}, "crop_size": {"height": 24, "width": 36}, "resample": 2},
])
def test_preprocessing_equals_clip_image_processor(settings):
    processor = transformers.CLIPImageProcessor(**settings)
    ours = CLIPImagePreprocess.from_config(processor.to_dict())
    for image in _images():
        expected = processor(images=[image], return_tensors="pt")["pixel_values"]
        got = ours([image])
        assert got.shape == expected.shape, image.size
        assert torch.equal(got, expected), f"{image.mode} {image.size}: max {float((got - expected).abs().max())}"


def test_old_style_preprocessor_config():
    """Published ViT-L/14 folders write `size: 224, crop_size: 224` (the CLIPFeatureExtractor form)."""
    ours = CLIPImagePreprocess.from_config({"size": 224, "crop_size": 224, "resample": 3, "do_center_crop": True})
    assert (ours.shortest_edge, ours.crop_height, ours.crop_width) == (224, 224, 224)
    with pytest.raises(ValueError, match="shortest_edge"):
        CLIPImagePreprocess.from_config({"size": {"height": 224, "width": 224}})
    with pytest.raises(ValueError, match="resample"):
        CLIPImagePreprocess.from_config({"resample": 9})


def save_tiny_clip(workdir):
    """A tiny random transformers CLIPModel with the real CLIP vocabulary, saved as a transformers folder."""
    text = ref.text_config(vocab_size=49408, eos_token_id=49407, bos_token_id=49406)
    model = ref.clip_model(text, ref.vision_config(), seed=3)
    folder = workdir / "tiny-clip"
    model.save_pretrained(folder)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    tokenizer = reference_tokenizer(workdir / "vocab", "<|endoftext|>")
    return folder, model, processor, tokenizer


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_scores_equal_the_reference_logits(clip_folder):
    folder, model, processor, tokenizer = clip_folder
    ranker = CLIPRanker.from_folder(folder)
    images = _images()
    cosine, logits = ranker.scores(images, PROMPT)
    ids = tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    difference = float((logits - expected.logits_per_image[:, 0]).abs().max())
    assert difference < 1e-5, difference
    assert torch.allclose(cosine, expected.logits_per_image[:, 0] / model.logit_scale.exp(), atol=1e-6)
    print(f"CLIP logits vs transformers: max {difference:.1e} (scale {float(expected.logits_per_image.abs().max()):.2f})")
    ranked = ranker.rank(images, PROMPT)
    assert [r.score for r in ranked] == sorted(cosine.tolist(), reverse=True)


def _result(count: int = 4) -> GenerationResult:
    request = GenerationRequest(prompt=PROMPT, seed=10, n=count, width=48, height=48)
    images = [sample_image(48, seed=s) for s in range(count)]
    return GenerationResult(images, [10 + i for i in range(count)], [f"{PROMPT}\nSteps: 20, Seed: {10 + i}"
                                                                    for i in range(count)], request)


def test_rank_result_saves_all_with_scores_best_in_out(clip_folder, tmp_path):
    ranker = CLIPRanker.from_folder(clip_folder[0])
    lines = rank_result(_result(), ranker, tmp_path / "out", keep=3)
    scores = [float(line.split()[0]) for line in lines]
    assert scores == sorted(scores, reverse=True) and len(lines) == 4
    kept, rejected = sorted((tmp_path / "out").glob("*.png")), sorted((tmp_path / "out" / "rejected").glob("*.png"))
    assert len(kept) == 3 and len(rejected) == 1 and lines[-1].endswith("(rejected)")
    for path in kept + rejected:
        assert "CLIP score: " in read_image_parameters(path)
    assert f"CLIP score: {scores[-1]:.4f}" in read_image_parameters(rejected[0])
    again = rank_folder(tmp_path / "out", PROMPT, ranker, keep=2)
    assert [line.split()[0] for line in again] == [line.split()[0] for line in lines[:2]]


def test_rank_command(clip_folder, tmp_path, capsys):
    for i in range(3):
        sample_image(40, seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["rank", str(tmp_path), PROMPT, "--clip-model", str(clip_folder[0])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.split()[1].endswith(".png") for line in lines)
    assert [float(line.split()[0]) for line in lines] == sorted((float(line.split()[0]) for line in lines), reverse=True)
    assert main(["rank", str(tmp_path / "missing"), PROMPT, "--clip-model", str(clip_folder[0])]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["rank", str(tmp_path), PROMPT, "--clip-model", str(tmp_path)]) == 2
    assert "no CLIP config.json" in capsys.readouterr().err


def test_bad_inputs(clip_folder, tmp_path):
    ranker = CLIPRanker.from_folder(clip_folder[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no PNG, JPEG or WEBP"):
        rank_folder(tmp_path / "empty", PROMPT, ranker)
    with pytest.raises(UserError, match="--keep must be a positive"):
        rank_result(_result(2), ranker, tmp_path / "out", keep=0)
    with pytest.raises(UserError, match="no CLIP config.json"):
        CLIPRanker.from_folder(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "clip_text_model"}')
    with pytest.raises(UserError, match="not a CLIPModel config"):
        CLIPRanker.from_folder(broken)
    assert np.isfinite(ranker.scores([], PROMPT)[0].numpy()).all()
