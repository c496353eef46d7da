"""`--fast` and `--step-cache` on the command line, and `sdgen serve --fast`: the fast paths change rounding only, step caching
changes the image and says so in its parameters, and a bad interval is refused before loading."""

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


@pytest.mark.parametrize("value", ["1", "0", "-3", "three"])
def test_bad_step_cache_interval_is_one_line_and_exit_2(model, capsys, value):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "x", "--model", model, "--step-cache", value])
    assert exited.value.code == 2
    assert "--step-cache: expected an interval of at least 2 steps" in capsys.readouterr().err


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
