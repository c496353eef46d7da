"""Progress polling and synchronous waits, in process: the progress shortcut answers exactly as the
FastAPI route does, leaves what it does not recognise to FastAPI, and a waiting txt2img request is
woken by the worker when its job ends rather than by the once-a-second check."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from server_harness import fastapi_app, model_folder
from sdgen.server.app import create_app
from sdgen.server.config import ServerConfig
from sdgen.server.previews import preview_image
from sdgen.server.worker import Progress

FAST = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1}


@pytest.fixture
def app(tmp_path):
    return create_app(ServerConfig(data_dir=tmp_path / "data", model=model_folder()))


def _running(app, monkeypatch, preview: bytes | None):
    server = fastapi_app(app).state.server
    snapshot = Progress(job="job-1", job_count=2, job_no=1, sampling_step=7, sampling_steps=20,
                        time_start=time.time() - 3, job_timestamp="20261123120000", textinfo="working")
    monkeypatch.setattr(server.worker, "snapshot", lambda: snapshot)
    monkeypatch.setattr(server.worker, "preview_png", lambda: preview)


@pytest.mark.parametrize("query", ["", "?skip_current_image=true", "?skip_current_image=0",
                                   "?skip_current_image=Off&skip_current_image=yes", "?other=1"])
@pytest.mark.parametrize("running", [False, True])
def test_shortcut_answers_like_the_fastapi_route(app, monkeypatch, query, running):
    if running:
        _running(app, monkeypatch, preview=b"\x89PNG fake preview")
    route = TestClient(fastapi_app(app), base_url="http://127.0.0.1")  # no lifespan: one worker is enough
    with TestClient(app, base_url="http://127.0.0.1") as shortcut:
        fast, slow = shortcut.get(f"/sdapi/v1/progress{query}"), route.get(f"/sdapi/v1/progress{query}")
    assert fast.status_code == slow.status_code == 200
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    fast_body, slow_body = fast.json(), slow.json()
    # the ETA depends on the clock at the moment of asking
    assert abs(fast_body.pop("eta_relative") - slow_body.pop("eta_relative")) < 1
    assert fast_body == slow_body
    if running:
        skipped = "true" in query or "yes" in query
        assert (fast_body["current_image"] is None) == skipped
        assert fast_body["state"]["sampling_step"] == 7 and fast_body["textinfo"] == "working"


def test_what_the_shortcut_does_not_recognise_goes_to_fastapi(app):
    with TestClient(app, base_url="http://127.0.0.1") as client:
        bad = client.get("/sdapi/v1/progress?skip_current_image=maybe")
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "skip_current_image"]
        assert client.post("/sdapi/v1/progress").status_code == 405
        assert client.get("/sdapi/v1/progress/", follow_redirects=False).status_code == 307  # FastAPI's own


def test_the_shortcut_is_behind_the_guard(tmp_path):
    app = create_app(ServerConfig(data_dir=tmp_path / "data", model=model_folder(), api_auth="artist:s3cret"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/sdapi/v1/progress").status_code == 401
        assert client.get("/sdapi/v1/progress", auth=("artist", "s3cret")).status_code == 200
        assert client.get("/sdapi/v1/progress", headers={"Host": "evil.example"}).status_code == 403


def test_a_waiting_request_wakes_when_its_job_ends(app):
    """A synchronous txt2img answers within a fraction of its once-a-second database check of the job's end."""
    lags = []
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for seed in range(4):
            response = client.post("/sdapi/v1/txt2img", json={**FAST, "seed": seed})
            answered = time.time()
            assert response.status_code == 200, response.text
            job = client.get("/api/v1/jobs", params={"limit": 1}).json()[0]
            assert job["state"] == "done"
            lags.append(answered - job["finished"])
        # woken by the worker: milliseconds; by the fallback check alone the lags would spread over 0..1 s
        assert max(lags) < 0.3, lags
        assert not fastapi_app(app).state.server.worker._on_done  # every waiter unsubscribed


def test_preview_image_is_the_fitted_linear_map():
    """rgb = latent @ W + b, clamped to [-1, 1] and scaled to bytes, computed without torch threads."""
    generator = torch.Generator().manual_seed(3)
    latents, weights = torch.randn(4, 6, 5, generator=generator), torch.randn(5, 3, generator=generator) * 0.5
    expected = ((latents.permute(1, 2, 0) @ weights[:-1] + weights[-1]).clamp(-1, 1) + 1) * 127.5
    image = preview_image(latents, weights)
    assert image.size == (5, 6) and image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(float) - expected.numpy()).max() <= 0.5 + 1e-4
    assert preview_image(latents, weights, size=(20, 24)).size == (20, 24)
