"""The `webuiapi` PyPI client (AUTOMATIC1111's most used Python client) against a live sdgen server."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from server_harness import ServerProcess

webuiapi = pytest.importorskip("webuiapi", reason="webuiapi is installed by scripts/setup-test.sh")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("webuiapi") / "data") as process:
        yield process


@pytest.fixture()
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)


def test_txt2img(api):
    result = api.txt2img(prompt="a windmill", negative_prompt="fog", seed=77, cfg_scale=6, batch_size=2,
                         width=64, height=64)
    assert len(result.images) == 2 and all(isinstance(image, Image.Image) for image in result.images)
    assert result.info["all_seeds"] == [77, 78] and result.info["sampler_name"] == "Euler a"
    assert result.image.info["parameters"].startswith("a windmill\nNegative prompt: fog\nSteps: 3")
    assert api.util_get_model_names() and "Euler a" in api.util_get_sampler_names()
    assert api.util_get_current_model() == api.util_get_model_names()[0]
    api.util_set_model(api.util_get_model_names()[0])


def test_progress_while_generating_and_interrupt(api):
    seen, errors = [], []

    def generate():
        try:
            seen.append(api.txt2img(prompt="long", steps=150, seed=4, width=64, height=64))
        except Exception as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=generate)
    thread.start()
    deadline, progress = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 3:
            break
        time.sleep(0.1)
    assert progress["state"]["sampling_steps"] == 150 and 0 < progress["progress"] < 1
    api.interrupt()
    thread.join(timeout=60)
    assert not errors and len(seen[0].images) == 1  # interrupted: the image as it stood is kept


def test_img2img_and_inpainting(api):
    init = api.txt2img(prompt="a field", seed=3, width=64, height=64).image
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(images=[init], prompt="a pond", denoising_strength=0.5, seed=5, width=64, height=64)
    assert result.image.size == (64, 64) and result.info["denoising_strength"] == 0.5
    painted = api.img2img(images=[init], mask_image=mask, prompt="a pond", denoising_strength=0.9, seed=5,
                          width=64, height=64)
    assert painted.image.size == (64, 64)
