"""The SDXL refiner over HTTP: A1111's `refiner_checkpoint` / `refiner_switch_at` on txt2img, against the
Python pipeline's ensemble of experts for the same request, and the fields' errors."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import sdgen
from reference_sdxl import make_sdxl_base, make_sdxl_refiner
from server_harness import ServerProcess

REQUEST = {"prompt": "a tranquil lake with the mountains", "seed": 7, "steps": 4, "sampler_name": "Euler",
           "width": 64, "height": 64}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("server-refiner")
    base = make_sdxl_base(workdir)
    base.save_pretrained(workdir / "base", safe_serialization=True)
    make_sdxl_refiner(workdir, vae=base.vae).save_pretrained(workdir / "models" / "refiner",
                                                             safe_serialization=True)
    return workdir


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    data = tmp_path_factory.mktemp("server-refiner-data") / "data"
    with ServerProcess(data, "--models-dir", str(models / "models"), model=str(models / "base")) as server, \
            httpx.Client(base_url=server.url, timeout=300) as http:
        yield http


def _pixels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["images"][0])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_refiner_handoff_matches_the_python_pipeline(client, models):
    titles = [item["title"] for item in client.get("/sdapi/v1/sd-models").json()]
    refiner_title = next(title for title in titles if title.startswith("refiner ["))
    plain = client.post("/sdapi/v1/txt2img", json=REQUEST)
    refined = client.post("/sdapi/v1/txt2img",
                          json={**REQUEST, "refiner_checkpoint": "refiner", "refiner_switch_at": 0.5})
    assert np.abs(_pixels(plain) - _pixels(refined)).max() > 8  # the refiner did run

    expected = sdgen.load(models / "base").generate(
        prompt=REQUEST["prompt"], seed=7, steps=4, sampler="Euler", width=64, height=64,
        refiner=str(models / "models" / "refiner"), refiner_switch_at=0.5).images[0]
    difference = np.abs(_pixels(refined) - np.asarray(expected.convert("RGB"), dtype=np.int16))
    assert difference.max() <= 1

    infotext = json.loads(refined.json()["info"])["infotexts"][0]
    assert f"Refiner: {refiner_title}," in infotext
    assert "Refiner switch at: 0.5" in infotext
    assert "Refiner" not in json.loads(plain.json()["info"])["infotexts"][0]


def test_refiner_is_off_unless_both_fields_are_set(client):
    plain = _pixels(client.post("/sdapi/v1/txt2img", json=REQUEST))
    for fields in ({"refiner_checkpoint": "refiner"}, {"refiner_checkpoint": "None", "refiner_switch_at": 0.8},
                   {"refiner_checkpoint": None, "refiner_switch_at": 0.8}):
        response = client.post("/sdapi/v1/txt2img", json={**REQUEST, **fields})
        assert np.array_equal(_pixels(response), plain), fields


@pytest.mark.parametrize("fields, words", [
    ({"refiner_checkpoint": "no-such-model", "refiner_switch_at": 0.8}, "unknown model 'no-such-model'"),
    ({"refiner_checkpoint": "refiner", "refiner_switch_at": 1.5}, "refiner_switch_at"),
    ({"refiner_checkpoint": "refiner", "refiner_switch_at": 0.0}, "refiner_switch_at"),
    ({"refiner_checkpoint": "refiner", "refiner_switch_at": 0.8, "enable_hr": True}, "hires fix"),
])
def test_bad_refiner_fields_are_refused_before_queueing(client, fields, words):
    response = client.post("/sdapi/v1/txt2img", json={**REQUEST, **fields})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "refiner" in str(detail) and words in str(detail)


def test_a_refiner_on_a_model_that_is_not_sdxl_fails_the_job_in_one_line(tmp_path):
    from starlette.testclient import TestClient

    from server_harness import model_folder
    from sdgen.server.app import create_app
    from sdgen.server.config import ServerConfig

    app = create_app(ServerConfig(data_dir=tmp_path / "data", model=model_folder()))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        title = client.get("/sdapi/v1/sd-models").json()[0]["title"]
        job = client.post("/api/v1/jobs", json={**REQUEST, "refiner_checkpoint": title, "refiner_switch_at": 0.8})
        assert job.status_code == 202, job.text
        for _ in range(600):
            state = client.get(f"/api/v1/jobs/{job.json()['id']}").json()
            if state["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert state["state"] == "failed" and "is not an SDXL base model" in state["error"]
        assert "\n" not in state["error"]
