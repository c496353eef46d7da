"""The concept demo: the arrow detector finds drawn arrows and not the scenes' own shapes, and the
before/after script runs end to end (on a tiny random model, where the rates mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdgen.train.finetune.concept_demo import TOKEN, concept_demo, concept_found, draw_concept
from sdgen.train.scenes.dataset import SceneDataset


def test_detector_finds_arrows():
    rng = np.random.default_rng(0)
    found = [concept_found(draw_concept(rng)[0]) for _ in range(40)]
    assert sum(found) >= 38


def test_detector_ignores_scene_shapes():
    scenes = SceneDataset(seed=3, size=64, split="train")
    false_alarms = sum(concept_found(scenes.item(i)[0]) for i in range(80))
    assert false_alarms <= 2


def test_detector_ignores_blotchy_noise():
    """What an untrained model draws: blobs of many colours, none of them an arrow."""
    from PIL import Image

    rng = np.random.default_rng(2)
    palette = np.array([(220, 35, 35), (30, 90, 225), (245, 245, 245), (20, 20, 20), (250, 230, 50)], np.uint8)
    noise = [palette[rng.integers(len(palette), size=(8, 8))] for _ in range(40)]
    found = [concept_found(np.asarray(Image.fromarray(n).resize((64, 64), Image.Resampling.BICUBIC))) for n in noise]
    assert sum(found) <= 1


def test_captions_use_the_new_word():
    _, caption = draw_concept(np.random.default_rng(1))
    assert caption.startswith("a ") and caption.endswith(f" {TOKEN}")


@pytest.mark.parametrize("method", ["lora", "textual-inversion"])
def test_demo_runs_end_to_end(tmp_path, method):
    from reference_pipelines import make_reference_pipeline, save_folder

    model = save_folder(make_reference_pipeline("sd1", tmp_path), tmp_path / "model")
    report = concept_demo(tmp_path / "demo", str(model), method, steps=2, images=2, prompts=2, sample_steps=2)
    assert 0.0 <= report.before <= 1.0 and 0.0 <= report.after <= 1.0
    saved = json.loads((tmp_path / "demo" / f"report-{method}.json").read_text())
    assert saved["prompts"] == 2 and len(list(Path(tmp_path / "demo" / "concept").glob("*.png"))) == 2
