"""The server's lines of the reliability list, in process (so that faults can be injected): image URLs are
never fetched, the route table is a reviewed allow-list and options cannot touch security, a job that
raises fails alone, and a full disk fails the job cleanly while the server goes on serving."""

from __future__ import annotations

import socket
import time

import pytest
from starlette.routing import Mount
from starlette.testclient import TestClient

from disk_faults import fill_the_disk
from server_harness import fastapi_app, model_folder
from sdgen.server.app import create_app
from sdgen.server.config import ServerConfig
from sdgen.server.worker import Worker

AUTH = ("artist", "s3cret")
FAST = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1}

# Every route the server has. A new route must be added here after a review that it installs nothing,
# runs no code from the request and cannot weaken the exposure settings.
ALLOWED_ROUTES = {
    ("/", "GET"), ("/docs", "GET"), ("/docs/oauth2-redirect", "GET"), ("/redoc", "GET"),
    ("/openapi.json", "GET"), ("/openapi.json", "HEAD"),
    ("/sdapi/v1/txt2img", "POST"), ("/sdapi/v1/img2img", "POST"), ("/sdapi/v1/progress", "GET"),
    ("/sdapi/v1/interrupt", "POST"), ("/sdapi/v1/skip", "POST"), ("/sdapi/v1/options", "GET"),
    ("/sdapi/v1/options", "POST"), ("/sdapi/v1/cmd-flags", "GET"), ("/sdapi/v1/sd-models", "GET"),
    ("/sdapi/v1/refresh-checkpoints", "POST"), ("/sdapi/v1/samplers", "GET"), ("/sdapi/v1/schedulers", "GET"),
    ("/sdapi/v1/sd-vae", "GET"), ("/sdapi/v1/refresh-vae", "POST"), ("/sdapi/v1/upscalers", "GET"),
    ("/sdapi/v1/latent-upscale-modes", "GET"), ("/sdapi/v1/embeddings", "GET"), ("/sdapi/v1/loras", "GET"),
    ("/sdapi/v1/refresh-loras", "POST"), ("/sdapi/v1/hypernetworks", "GET"), ("/sdapi/v1/face-restorers", "GET"),
    ("/sdapi/v1/prompt-styles", "GET"), ("/sdapi/v1/scripts", "GET"), ("/sdapi/v1/script-info", "GET"),
    ("/sdapi/v1/png-info", "POST"),
    ("/api/v1/jobs", "POST"), ("/api/v1/jobs", "GET"), ("/api/v1/jobs/{job_id}", "GET"),
    ("/api/v1/jobs/{job_id}", "DELETE"), ("/api/v1/jobs/{job_id}/events", "GET"), ("/api/v1/gallery", "GET"),
    ("/api/v1/images/{image_id}", "GET"), ("/api/v1/preview", "GET"), ("/api/v1/health", "GET"),
}
ALLOWED_MOUNTS = {"/static", "/static-offline-docs"}  # read-only files shipped in the package


@pytest.fixture
def server(tmp_path):
    config = ServerConfig(data_dir=tmp_path / "data", model=model_folder(), api_auth=":".join(AUTH))
    app = create_app(config)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        client.auth = AUTH
        client.app_state = app
        yield client


def _wait(client: TestClient, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def _submit(client: TestClient, **fields) -> str:
    response = client.post("/api/v1/jobs", json={**FAST, **fields})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_image_urls_are_never_fetched(server, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("the server tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    url = "http://169.254.169.254/latest/meta-data/image.png"
    for route, body, field in (
            ("/sdapi/v1/img2img", {"init_images": [url]}, "init_images[0]"),
            ("/sdapi/v1/img2img", {"init_images": [url.replace("http", "https")]}, "init_images[0]"),
            ("/api/v1/jobs", {"init_images": ["file:///etc/passwd"]}, "init_images[0]")):
        response = server.post(route, json={**FAST, **body})
        assert response.status_code == 422, response.text
        assert field in response.json()["detail"]
    assert attempts == []


def _route_table(routes, prefix: str = "") -> tuple[set, set]:
    """(path, method) pairs and mount paths, through included routers (FastAPI keeps those as one entry)."""
    pairs, mounts = set(), set()
    for route in routes:
        if hasattr(route, "original_router"):  # an included APIRouter
            inner = _route_table(route.original_router.routes, prefix + route.include_context.prefix)
            pairs |= inner[0]
            mounts |= inner[1]
        elif isinstance(route, Mount):
            mounts.add(prefix + route.path)
        else:
            pairs.update((prefix + route.path, method) for method in route.methods)
    return pairs, mounts


def test_route_table_is_the_reviewed_allow_list(server):
    routes, mounts = _route_table(fastapi_app(server.app_state).routes)
    assert mounts == ALLOWED_MOUNTS
    assert routes - ALLOWED_ROUTES == set(), "new routes: review them, then add them to ALLOWED_ROUTES"
    assert ALLOWED_ROUTES - routes == set()


def test_options_cannot_change_exposure_settings(server):
    config = fastapi_app(server.app_state).state.server.config
    attempt = {"api_auth": "intruder:open", "host": "0.0.0.0", "listen": True, "insecure": True,
               "allowed_hosts": ["evil.example"], "data_dir": "/tmp/elsewhere", "max_body_bytes": 10 ** 12}
    assert server.post("/sdapi/v1/options", json=attempt).status_code == 200  # A1111 stores unknown options
    assert fastapi_app(server.app_state).state.server.config == config
    assert server.get("/sdapi/v1/options", auth=("intruder", "open")).status_code == 401
    assert server.get("/sdapi/v1/options", headers={"Host": "evil.example"}).status_code == 403
    assert server.get("/sdapi/v1/options").status_code == 200


def test_a_job_that_raises_fails_alone_and_the_worker_goes_on(server, monkeypatch):
    real = Worker._run_one

    def explode_once(self, job, pipeline, request):
        if job.params["prompt"] == "explode":
            raise RuntimeError("injected fault in the sampler")
        return real(self, job, pipeline, request)

    monkeypatch.setattr(Worker, "_run_one", explode_once)
    failing, following = _submit(server, prompt="explode"), _submit(server)
    failed = _wait(server, failing)
    assert failed["state"] == "failed" and "injected fault in the sampler" in failed["error"]
    done = _wait(server, following)
    assert done["state"] == "done" and len(server.get(f"/api/v1/jobs/{following}").json()["images"]) == 1
    assert server.get("/api/v1/health").status_code == 200


def test_disk_full_fails_the_job_cleanly_and_the_server_goes_on(server, monkeypatch):
    outputs = fastapi_app(server.app_state).state.server.store.outputs
    before = _files(outputs)
    fill_the_disk(monkeypatch, room=100)
    failed = _wait(server, _submit(server))
    monkeypatch.undo()
    assert failed["state"] == "failed" and "No space left on device" in failed["error"]
    assert "\n" not in failed["error"]
    assert _files(outputs) == before  # neither the image nor its temporary file
    done = _wait(server, _submit(server))
    assert done["state"] == "done" and len(_files(outputs)) == len(before) + 1
