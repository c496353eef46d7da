"""`--fast`, `--step-cache` and `--token-merging` on the command line, and `sdgen serve --fast`: the fast paths change
rounding only, step caching and token merging change the image and say so in its parameters (so that replay does the
same again), and a bad interval or ratio is refused before loading."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from reference_pipelines import make_reference_pipeline, save_folder
from server_harness import fastapi_app
from sdgen.cli import main
from sdgen.server.app import create_app
from sdgen.server.arguments import add_serve_arguments, config_from_args


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd1-fast")
    return str(save_folder(make_reference_pipeline("sd1", workdir), workdir / "model"))


def _generate(model: str, out, *options: str) -> tuple[np.ndarray, str]:
    code = main(["generate", "a lake at dawn", "--model", model, "--steps", "6", "--seed", "4", "--sampler", "Euler",
                 "--no-watermark", "--out", str(out), *options])
    assert code == 0
    [path] = list(out.iterdir())
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16), image.info["parameters"]


def test_fast_changes_rounding_only_and_step_cache_is_recorded(model, tmp_path):
    plain, plain_text = _generate(model, tmp_path / "plain")
    fast, fast_text = _generate(model, tmp_path / "fast", "--fast")
    cached, cached_text = _generate(model, tmp_path / "cached", "--step-cache", "2")
    assert np.abs(fast - plain).max() <= 2  # prepacked convolutions sum in another order
    assert fast_text == plain_text and "Step cache" not in plain_text
    assert "Step cache: 2" in cached_text
    assert np.abs(cached - plain).max() > 2  # the in-between steps reuse deep features


BAD_VALUES = [("--step-cache", value, "expected an interval of at least 2 steps") for value in ("1", "0", "-3", "three")]
BAD_VALUES += [("--token-merging", value, "expected a share of tokens above 0 and at most 0.75")
               for value in ("0", "0.9", "-0.5", "half")]


@pytest.mark.parametrize("option, value, message", BAD_VALUES)
def test_bad_interval_or_ratio_is_one_line_and_exit_2(model, capsys, option, value, message):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "x", "--model", model, option, value])
    assert exited.value.code == 2
    assert f"{option}: {message}" in capsys.readouterr().err


def test_server_fast_loads_models_onto_the_fast_path(model, tmp_path):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(["--fast", "--model", model, "--data-dir", str(tmp_path / "data")]))
    assert config.fast
    app = create_app(config)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a lake", "steps": 2, "width": 64, "height": 64})
        assert response.status_code == 200, response.text
        unet = fastapi_app(app).state.server.worker.pipeline.unet
        assert any("forward" in layer.__dict__ for layer in unet.modules())  # prepacked layers


def test_replay_uses_the_step_cache_the_image_was_made_with(model, tmp_path):
    cached, text = _generate(model, tmp_path / "cached", "--step-cache", "2")
    [original] = list((tmp_path / "cached").iterdir())
    assert main(["replay", str(original), "--model", model, "--out", str(tmp_path / "again")]) == 0
    [path] = list((tmp_path / "again").iterdir())
    with Image.open(path) as image:
        assert "Step cache: 2" in image.info["parameters"] and "Step cache: 2" in text
        assert np.array_equal(np.asarray(image.convert("RGB"), dtype=np.int16), cached)


def test_token_merging_is_recorded_and_replayed(model, tmp_path):
    plain, _ = _generate(model, tmp_path / "plain", "--width", "128", "--height", "128")
    merged, text = _generate(model, tmp_path / "merged", "--width", "128", "--height", "128", "--token-merging", "0.5")
    assert "Token merging ratio: 0.5" in text
    assert np.abs(merged - plain).max() > 2  # self-attention ran on fewer tokens
    [original] = list((tmp_path / "merged").iterdir())
    assert main(["replay", str(original), "--model", model, "--out", str(tmp_path / "again")]) == 0
    [path] = list((tmp_path / "again").iterdir())
    with Image.open(path) as image:
        assert "Token merging ratio: 0.5" in image.info["parameters"]
        assert np.array_equal(np.asarray(image.convert("RGB"), dtype=np.int16), merged)
