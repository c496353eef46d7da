"""The scene checker: rendered ground truth passes, other captions' claims fail, inputs of any form."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageFilter

from sdgen.train.scenes import (
    CATEGORIES, Claim, Target, accuracy_by_category, check, check_caption, parse_caption, render,
    sample_scene, write_caption,
)
from sdgen.train.scenes.layout import Background, ShapeGroup, ShapeObject, ShapesScene
from sdgen.train.scenes.segment import connected_components, find_objects


def _scenes(count: int, seed: int, size: int = 64, split: str = "train"):
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, split)
        out.append((render(scene, size), write_caption(scene, rng), scene))
    return out


@pytest.fixture(scope="module")
def rendered():
    return _scenes(400, seed=21)


def _rates(results) -> dict[str, float]:
    return {k: passed / total for k, (passed, total) in accuracy_by_category(results).items()}


def test_ground_truth_scores_near_perfect(rendered):
    results = [r for image, caption, _ in rendered for r in check(image, parse_caption(caption))]
    rates = _rates(results)
    assert set(rates) == set(CATEGORIES) | {"all"}
    assert rates["all"] >= 0.98, rates
    assert all(rate >= 0.95 for rate in rates.values()), rates


def test_ground_truth_at_128_pixels_and_heldout_split():
    results = []
    for size, split in ((128, "train"), (64, "heldout")):
        for image, caption, _ in _scenes(60, seed=22, size=size, split=split):
            results += check(image, parse_caption(caption), size=size)
    rates = _rates(results)
    assert rates["all"] >= 0.98 and all(rate >= 0.95 for rate in rates.values()), rates


@settings(max_examples=80, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), index=st.integers(0, 10**6), split=st.sampled_from(["train", "heldout"]))
def test_round_trip_record_caption_claims_checks(seed, index, split):
    """record -> caption -> claims -> checks on the record's own render: every claim holds."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, split)
    caption = write_caption(scene, rng)
    failed = [str(r.claim) for r in check(render(scene), parse_caption(caption)) if not r.holds]
    assert not failed, (caption, failed)


def test_claims_of_another_caption_mostly_fail(rendered):
    results = []
    for i, (image, _, _) in enumerate(rendered):
        other = rendered[(i + 1) % len(rendered)][1]
        results += check(image, parse_caption(other))
    rates = _rates(results)
    assert rates["all"] <= 0.3, rates
    for category in ("count", "position", "relation", "background"):
        assert rates[category] <= 0.1, rates


def test_blurred_colour_noise_fails_the_claims():
    """An untrained model draws blurred colour noise: dozens of palette blobs of every colour and
    shape. None of a shapes caption's claims may hold on it; landscape claims only by chance."""
    from sdgen.train.scenes import heldout_prompts

    results = []
    for i, prompt in enumerate(heldout_prompts(150)):
        rng = np.random.default_rng(i)
        side = int(rng.integers(4, 12))
        noise = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        results += check_caption(noise.resize((64, 64), Image.Resampling.BICUBIC), prompt)
    rates = _rates(results)
    assert all(rates[c] == 0.0 for c in CATEGORIES if c not in ("landscape", "all")), rates
    assert rates["landscape"] <= 0.3 and rates["all"] <= 0.1, rates


def test_mild_blur_and_noise_keep_shapes_claims():
    """Generated images are soft: a blurred, noisy render still passes its shapes claims."""
    results = []
    for i, (image, caption, scene) in enumerate(_scenes(80, seed=23)):
        if scene.family != "shapes":
            continue
        soft = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.6)), np.float32)
        noisy = np.clip(soft + np.random.default_rng(i).normal(0, 6, soft.shape), 0, 255).astype(np.uint8)
        results += check(noisy, parse_caption(caption))
    assert _rates(results)["all"] >= 0.95


def _two_circles_and_square() -> ShapesScene:
    objects = (ShapeObject("red", "circle", "small", 0.25, 0.25, 0.2),
               ShapeObject("red", "circle", "small", 0.75, 0.25, 0.2),
               ShapeObject("blue", "square", "large", 0.5, 0.72, 0.36))
    groups = (ShapeGroup(2, "red", "circle", "small"), ShapeGroup(1, "blue", "square", "large"))
    return ShapesScene(groups, "above", Background(("white",)), objects)


@pytest.mark.parametrize("caption, expected", [
    ("two small red circles above a large blue square on a white background", [True] * 9 + [True]),
    ("three red circles", [True, True, False]),
    ("a red circle", [True, True, False]),
    ("two red squares", [True, True, False]),
    ("two green circles", [False, True, False]),
    ("a large blue square at the top", [True, True, True, True, False]),
    ("a small blue square in the bottom", [True, True, True, False, True]),
    ("two red circles below a blue square", [True] * 6 + [False]),
    ("a blue square to the left of two red circles", [True] * 6 + [False]),
    ("a blue square on a black background", [True, True, True, False]),
    ("a blue square on a white to blue gradient", [True, True, True, False]),
])
def test_checker_on_a_known_scene(caption, expected):
    image = render(_two_circles_and_square())
    assert [r.holds for r in check_caption(image, caption)] == expected


def test_image_forms_and_sizes_agree():
    scene = _two_circles_and_square()
    caption = "two small red circles above a large blue square on a white background"
    image = render(scene)
    expected = [r.holds for r in check_caption(image, caption)]
    big = Image.fromarray(render(scene, 256))
    for form in (Image.fromarray(image), image / 255.0, big, np.asarray(big.convert("RGBA"))[..., :3],
                 Image.fromarray(image).resize((48, 48), Image.Resampling.LANCZOS).resize((96, 96))):
        assert [r.holds for r in check_caption(form, caption)] == expected
    with pytest.raises(ValueError, match="shape"):
        check(np.zeros((64, 64)), [])
    with pytest.raises(ValueError, match="NaN"):
        check(np.full((64, 64, 3), np.nan), [])


def test_results_carry_categories():
    image = render(_two_circles_and_square())
    claim = Claim("count", 2, Target("red", "circle", 2))
    (result,) = check(image, [claim])
    assert result.holds and result.category == "count" and result.claim == claim
    assert accuracy_by_category([result]) == {"count": (1, 1), "all": (1, 1)}


def test_connected_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 3, size=(23, 31))
    ours = connected_components(labels)
    # reference: breadth-first flood fill, 4-connected, equal labels >= 0
    seen = np.full(labels.shape, -1)
    for start in zip(*np.nonzero(labels >= 0)):
        if seen[start] >= 0:
            continue
        stack, members = [start], []
        seen[start] = 0
        while stack:
            y, x = stack.pop()
            members.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < 23 and 0 <= nx < 31 and seen[ny, nx] < 0 and labels[ny, nx] == labels[y, x]:
                    seen[ny, nx] = 0
                    stack.append((ny, nx))
        ids = {ours[m] for m in members}
        assert len(ids) == 1 and min(y * 31 + x for y, x in members) in ids
        assert np.count_nonzero(ours == ids.pop()) == len(members)
    assert np.all((ours == -1) == (labels < 0))


def test_every_shape_is_recognised_at_both_sizes():
    for size_name, extent in (("small", 0.2), ("large", 0.36)):
        for shape in ("circle", "square", "triangle", "star", "heart", "ring", "diamond", "cross"):
            scene = ShapesScene((ShapeGroup(1, "green", shape, size_name),), None, Background(("white",)),
                                (ShapeObject("green", shape, size_name, 0.43, 0.57, extent),))
            (found,), _ = find_objects(render(scene))
            assert found.shape == shape, (shape, size_name, found.shape_scores)
