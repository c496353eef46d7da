"""The safety checker against diffusers' StableDiffusionSafetyChecker on a tiny random-weight checker.

The reference keeps its per-concept scores in a local list; they are recorded by handing the
module a `round` that logs what it rounds (special-care scores, then concept scores, per image).
Thresholds are placed between the images' cosine similarities so that some images are flagged,
one through the special-care adjustment, and no score sits within rounding distance of 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from diffusers.pipelines.stable_diffusion import safety_checker as reference_module
from PIL import Image

from reference_clip import TINY_TEXT, TINY_VISION, randomize
from sdgen.checkpoints import CheckpointError
from sdgen.safety.checker import ImagePreprocessing, has_safety_checker, load_safety_checker

CONCEPTS, SPECIAL, PROJECTION = 17, 3, 16  # the reference's fixed counts


def _images(count: int = 8, seed: int = 0) -> list[Image.Image]:
    """Varied sizes and contents (portrait, landscape, smaller than the crop)."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 48), (48, 64), (40, 40), (100, 36), (24, 30), (64, 64), (37, 53), (80, 80)]
    images = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        base = rng.integers(0, 256, size=3)
        noise = rng.integers(-60, 60, size=(height, width, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images


def _between(values: np.ndarray, low_index: int) -> float:
    """A threshold halfway between two neighbouring sorted values, so both sides keep a margin."""
    ordered = np.sort(values)
    return float((ordered[low_index] + ordered[low_index + 1]) / 2)


@pytest.fixture(scope="module")
def checker_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION),
                                     projection_dim=PROJECTION)
    config.vision_config._attn_implementation = "eager"
    reference = reference_module.StableDiffusionSafetyChecker(config)
    randomize(reference, seed=3)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor(_images(), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(reference.visual_projection(reference.vision_model(pixels)[1]))
        special = (embeds @ torch.nn.functional.normalize(reference.special_care_embeds).T).numpy()
        concept = (embeds @ torch.nn.functional.normalize(reference.concept_embeds).T).numpy()
        # special care 0 is hit by the one image with the highest similarity; the others by nothing
        unreachable = [float(special[:, k].max()) + 0.1 for k in range(1, SPECIAL)]
        reference.special_care_embeds_weights.copy_(torch.tensor([_between(special[:, 0], 6), *unreachable]))
        # a few concepts flag the one or two most similar images; the others flag nothing
        thresholds = [_between(concept[:, k], 5 + k % 2) if k < 3 else float(concept[:, k].max()) + 0.1
                      for k in range(CONCEPTS)]
        # concept 3 points at the special-care image itself, its threshold 0.005 out of reach: only
        # the +0.01 special-care adjustment flags it (score 1 - 1.005 + 0.01)
        cared = int(special[:, 0].argmax())
        reference.concept_embeds[3] = embeds[cared]
        thresholds[3] = 1.005
        reference.concept_embeds_weights.copy_(torch.tensor(thresholds))
    reference.cared = cared
    folder = tmp_path_factory.mktemp("checker") / "model"
    reference.save_pretrained(folder / "safety_checker")
    processor.save_pretrained(folder / "feature_extractor")
    return folder, reference, processor


def _reference_run(reference, processor, images, monkeypatch):
    rounded = []

    def recording_round(value, digits):
        result = np.round(value, digits)
        rounded.append(float(result))
        return result

    monkeypatch.setattr(reference_module, "round", recording_round, raising=False)
    pixels = processor(images, return_tensors="pt").pixel_values
    arrays = [np.asarray(image, dtype=np.float32) / 255 for image in images]
    out_images, flags = reference(clip_input=pixels, images=arrays)
    per_image = SPECIAL + CONCEPTS
    scores = [rounded[i * per_image:(i + 1) * per_image] for i in range(len(images))]
    return pixels, out_images, flags, scores


def test_preprocessing_matches_clip_image_processor(checker_folder):
    folder, reference, processor = checker_folder
    config = json.loads((folder / "feature_extractor" / "preprocessor_config.json").read_text())
    ours = ImagePreprocessing.from_config(config)(_images())
    theirs = processor(_images(), return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (8, 3, 32, 32)
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_flags_and_scores_match_reference(checker_folder, monkeypatch):
    folder, reference, processor = checker_folder
    images = _images()
    _, reference_images, reference_flags, reference_scores = _reference_run(reference, processor, images, monkeypatch)
    checker = load_safety_checker(folder)
    reports = checker.check(images)
    assert [r.nsfw for r in reports] == reference_flags
    assert 0 < sum(reference_flags) < len(images)  # mixed verdicts: the comparison means something
    assert [i for i, r in enumerate(reports) if r.special_care] == [reference.cared]
    assert reports[reference.cared].nsfw and reports[reference.cared].concept_scores[3] == pytest.approx(0.005)
    for report, expected in zip(reports, reference_scores):
        assert list(report.special_scores) + list(report.concept_scores) == expected
    screened, flags = checker.screen(images)
    for image, out, theirs, flagged in zip(images, screened, reference_images, flags):
        assert out.size == image.size
        assert (np.asarray(out).max() == 0) == flagged == (np.abs(theirs).max() == 0)
        if not flagged:
            assert out is image


def test_bf16_checker_gives_the_same_flags(checker_folder):
    folder, reference, processor = checker_folder
    fp32 = load_safety_checker(folder).check(_images())
    bf16 = load_safety_checker(folder, dtype=torch.bfloat16).check(_images())
    assert sum(a.nsfw != b.nsfw for a, b in zip(fp32, bf16)) <= 1
    assert max(abs(x - y) for a, b in zip(fp32, bf16) for x, y in zip(a.concept_scores, b.concept_scores)) < 0.05


def test_broken_checker_folders_are_refused(checker_folder, tmp_path):
    folder, reference, processor = checker_folder
    assert has_safety_checker(folder) and not has_safety_checker(tmp_path)
    bad = tmp_path / "model"
    (bad / "safety_checker").mkdir(parents=True)
    (bad / "safety_checker" / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {"patch_size": 0}}))
    with pytest.raises(CheckpointError, match="unsupported safety checker configuration"):
        load_safety_checker(bad)
    (bad / "safety_checker" / "config.json").write_text((folder / "safety_checker" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights file"):
        load_safety_checker(bad)
    (bad / "feature_extractor").mkdir()
    (bad / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({"crop_size": 224, "size": 224}))
    with pytest.raises(CheckpointError, match="does not match the checker's image size"):
        load_safety_checker(bad)



# ---------------------------------------------------------------- in the pipeline


@pytest.fixture(scope="module")
def model_with_checker(tmp_path_factory, checker_folder):
    """A tiny SD 1.x folder carrying the tiny checker; `flag_all(True)` makes every image flagged."""
    from reference_pipelines import make_reference_pipeline, save_folder

    workdir = tmp_path_factory.mktemp("with-checker")
    folder = save_folder(make_reference_pipeline("sd1", workdir), workdir / "model")
    _, reference, processor = checker_folder
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    processor.save_pretrained(folder / "feature_extractor")

    def flag_all(flag: bool) -> None:
        with torch.no_grad():
            reference.concept_embeds_weights.fill_(-2.0 if flag else 2.0)  # cosines lie in [-1, 1]
        reference.save_pretrained(folder / "safety_checker")

    return folder, flag_all


PROMPT = "a tranquil lake with the mountains"


def test_flagged_images_are_blacked_out_and_reported(model_with_checker, tmp_path, capsys):
    import sdgen
    from sdgen.cli import main

    folder, flag_all = model_with_checker
    flag_all(True)
    pipe = sdgen.load(folder)
    assert pipe.safety_checker is not None  # on by default when the folder has one
    result = pipe.generate(prompt=PROMPT, seed=4, steps=2, width=64, height=64, n=2)
    assert result.nsfw == [True, True] and result.watermarked == [False, False]
    assert all(np.asarray(image).max() == 0 for image in result.images)
    assert all(text.endswith("Safety checker: flagged") for text in result.infotexts)
    out = tmp_path / "out"
    args = ["generate", PROMPT, "--model", str(folder), "--seed", "4", "--steps", "2", "--width", "64", "--height", "64"]
    assert main(args + ["--out", str(out)]) == 0  # a flag is a verdict, not a failure
    assert "was flagged by the safety checker and blacked out" in capsys.readouterr().err

    assert main(args + ["--out", str(tmp_path / "unscreened"), "--no-safety-checker"]) == 0
    assert "the safety checker is off" in capsys.readouterr().err
    (path,) = (tmp_path / "unscreened").glob("*.png")
    assert np.asarray(Image.open(path)).max() > 0


def test_unflagged_images_pass_unchanged(model_with_checker):
    import sdgen

    folder, flag_all = model_with_checker
    flag_all(False)
    screened = sdgen.load(folder).generate(prompt=PROMPT, seed=4, steps=2, width=64, height=64)
    unscreened = sdgen.load(folder, safety_checker=False).generate(prompt=PROMPT, seed=4, steps=2, width=64, height=64)
    assert screened.nsfw == [False] and unscreened.nsfw == [False]
    assert np.array_equal(np.asarray(screened.images[0]), np.asarray(unscreened.images[0]))
    assert "Safety checker" not in screened.infotexts[0]
