"""Request validation: one clear message naming the field, nothing allocated."""

import math

import pytest

from sdgen.pipelines.request import GenerationRequest, Limits, RequestError


@pytest.mark.parametrize("changes, field", [
    ({"width": 100, "height": 64}, "width"),
    ({"width": 64, "height": 0}, "height"),
    ({"width": -8, "height": 64}, "width"),
    ({"width": 100000, "height": 64}, "width"),
    ({"width": 4096, "height": 4096}, "pixels"),
    ({"steps": 0}, "steps"),
    ({"steps": 10_000}, "steps"),
    ({"cfg_scale": math.nan}, "cfg_scale"),
    ({"cfg_scale": math.inf}, "cfg_scale"),
    ({"n": 0}, "n"),
    ({"batch_size": 1000}, "batch_size"),
    ({"seed": -5}, "seed"),
    ({"prompt": 3}, "prompt"),
])
def test_bad_fields_are_named(changes, field):
    with pytest.raises(RequestError, match=field):
        GenerationRequest(**changes).validate()


def test_good_request_passes_and_random_seed_is_resolved():
    request = GenerationRequest(prompt="x", width=64, height=96, seed=-1)
    request.validate()
    resolved = request.with_seed()
    assert 0 <= resolved.seed < 4294967294
    assert GenerationRequest(seed=7).with_seed().seed == 7


def test_huge_prompt_is_refused_by_limit():
    with pytest.raises(RequestError, match="prompt"):
        GenerationRequest(prompt="a" * 101).validate(Limits(max_prompt_chars=100))
