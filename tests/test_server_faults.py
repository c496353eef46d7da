"""Faults and exposure: kill -9 mid-job, crash-twice jobs, corrupt database, two servers, --listen without auth."""

from __future__ import annotations

import base64
import json
import sqlite3
import time

import httpx
import pytest

from server_harness import ServerProcess, wait_for_state
from sdgen.server.store import DB_NAME, Store, StoreError


def test_kill_9_mid_job_then_restart(tmp_path):
    data = tmp_path / "data"
    server = ServerProcess(data).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            long_id = client.post("/api/v1/jobs", json={"prompt": "crash", "steps": 40, "n_iter": 3, "seed": 1}).json()["id"]
            queued_id = client.post("/api/v1/jobs", json={"prompt": "after", "steps": 2, "seed": 9}).json()["id"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = client.get(f"/api/v1/jobs/{long_id}").json()
                if job["progress"].get("job_no", 0) >= 1:  # its first image is already written
                    break
                time.sleep(0.05)
        server.kill()
    finally:
        server.stop()
    # Straight after the crash: no database or image damage is visible to a reader.
    with sqlite3.connect(data / DB_NAME) as db:
        states = dict(db.execute("SELECT id, state FROM jobs").fetchall())
    assert states == {long_id: "running", queued_id: "queued"}

    with ServerProcess(data, port=server.port) as again, httpx.Client(base_url=again.url, timeout=60) as client:
        rerun = wait_for_state(client, long_id, ("done",), timeout=120)
        after = wait_for_state(client, queued_id, ("done",), timeout=60)
        assert rerun["attempts"] == 2 and [i["seed"] for i in rerun["images"]] == [1, 2, 3]
        assert [i["seed"] for i in after["images"]] == [9]
        for item in client.get("/api/v1/gallery", params={"limit": 500}).json()["images"]:
            assert client.get(item["url"]).status_code == 200
    assert not list((data / "outputs").rglob("*.tmp")), "a half-written file survived"


def test_a_job_that_crashes_twice_is_failed_not_retried(tmp_path):
    store = Store(tmp_path)
    job = store.add_job("txt2img", {"steps": 2})
    store.mark_running(job.id)
    store.close()
    store = Store(tmp_path)
    assert store.recover()["requeued"] == 1 and store.job(job.id).state == "queued"
    store.mark_running(job.id)
    store.close()
    store = Store(tmp_path)
    assert store.recover()["failed"] == 1
    failed = store.job(job.id)
    assert failed.state == "failed" and "twice" in failed.error
    store.close()


def test_gallery_rows_of_deleted_files_are_dropped_and_stray_temp_files_removed(tmp_path):
    store = Store(tmp_path)
    kept, gone = store.outputs / "day" / "00000-1.png", store.outputs / "day" / "00001-2.png"
    kept.parent.mkdir()
    for path in (kept, gone):
        path.write_bytes(b"png")
    for index, path in enumerate((kept, gone)):
        store.add_image("job", index, path, prompt="p", negative_prompt="", seed=index, width=8, height=8,
                        model=None, infotext="p")
    gone.unlink()
    stray = store.outputs / "day" / ".00002-3.png.abc.tmp"
    stray.write_bytes(b"half")
    store.close()
    store = Store(tmp_path)
    assert store.recover()["missing_images"] == 1
    assert [row["path"] for row in store.gallery()] == ["day/00000-1.png"] and not stray.exists()
    store.close()


def test_corrupt_database_is_moved_aside_and_images_untouched(tmp_path):
    (tmp_path / "outputs").mkdir()
    image = tmp_path / "outputs" / "00000-1.png"
    image.write_bytes(b"an image")
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    store = Store(tmp_path)
    assert store.notices and "moved it to" in store.notices[0]
    aside = list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert image.read_bytes() == b"an image"
    assert store.add_job("txt2img", {}).state == "queued"
    store.close()


def test_second_store_on_one_data_folder_is_refused(tmp_path):
    first = Store(tmp_path)
    with pytest.raises(StoreError, match="another sdgen server"):
        Store(tmp_path)
    first.close()
    Store(tmp_path).close()  # free again once the first is gone


def test_second_server_on_one_data_folder_refuses_to_start(tmp_path):
    with ServerProcess(tmp_path / "data") as first:
        second = ServerProcess(tmp_path / "data").start(wait=False)
        assert second.process.wait(timeout=60) == 2
        assert "another sdgen server" in second.output()
        assert httpx.get(f"{first.url}/api/v1/health").status_code == 200


def test_listen_without_credentials_refuses_to_start(tmp_path):
    server = ServerProcess(tmp_path / "data", "--listen").start(wait=False)
    assert server.process.wait(timeout=60) == 2
    assert "--listen needs --api-auth" in server.output()


def test_listen_insecure_warns_loudly(tmp_path):
    with ServerProcess(tmp_path / "data", "--listen", "--insecure", model=None) as server:
        assert "WITHOUT a password" in server.output()
        assert httpx.get(f"{server.url}/sdapi/v1/samplers").status_code == 200


def test_listen_with_api_auth_answers_401_on_every_route(tmp_path):
    auth = ("artist", "s3cret:with:colons")
    server = ServerProcess(tmp_path / "data", "--listen", "--api-auth", f"{auth[0]}:{auth[1]}", model=None)
    with server.start(auth=auth):
        schema = httpx.get(f"{server.url}/openapi.json", auth=auth).json()
        paths = [path.replace("{job_id}", "x").replace("{image_id}", "1") for path in schema["paths"]]
        routes = [(method.upper(), path) for path, spec in zip(paths, schema["paths"].values()) for method in spec]
        routes += [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/docs"), ("GET", "/openapi.json"),
                   ("GET", "/nonexistent")]
        wrong = base64.b64encode(b"artist:wrong").decode()
        for method, path in routes:
            for headers in ({}, {"Authorization": f"Basic {wrong}"}, {"Authorization": "Basic !!"}):
                response = httpx.request(method, f"{server.url}{path}", headers=headers, content=b"{}")
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(f"{server.url}/", auth=auth).status_code == 200
        assert json.loads(httpx.get(f"{server.url}/sdapi/v1/samplers", auth=auth).text)
