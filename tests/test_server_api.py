"""The HTTP API against a real `sdgen serve` subprocess: A1111 routes, native jobs, gallery, guards."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from server_harness import ServerProcess, wait_for_state

INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning",
    "version",
}
STATE_KEYS = {"skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp", "job_no",
              "sampling_step", "sampling_steps"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server") / "data", "--max-body-mb", "1", "--queue-size", "6")
    with process:
        yield process


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_a1111_response(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red barn", "steps": 3, "seed": 42,
                                                       "batch_size": 2, "n_iter": 2, "sampler_name": "Euler"})
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert INFO_KEYS <= set(info)
    assert info["all_seeds"] == [42, 43, 44, 45] and info["seed"] == 42
    assert len(body["images"]) == 4 and len(info["infotexts"]) == 4
    image = decode(body["images"][1])
    native = client.get("/api/v1/health").json()["native_size"]
    assert image.format == "PNG" and image.size == (native, native)  # no width/height: the model's native size
    assert image.info["parameters"] == info["infotexts"][1]
    assert "Seed: 43" in image.info["parameters"] and "Steps: 3" in image.info["parameters"]
    assert body["parameters"]["prompt"] == "a red barn" and body["parameters"]["seed"] == 42


def test_same_seed_same_pixels_and_random_seed_reported(client):
    request = {"prompt": "a house", "steps": 2, "seed": 7, "width": 64, "height": 64}
    first, second = (client.post("/sdapi/v1/txt2img", json=request).json() for _ in range(2))
    assert decode(first["images"][0]).tobytes() == decode(second["images"][0]).tobytes()
    random = client.post("/sdapi/v1/txt2img", json={"steps": 2, "seed": -1}).json()
    seed = json.loads(random["info"])["seed"]
    assert 0 <= seed < 4294967294 and random["parameters"]["seed"] == seed


def test_nulls_unknown_fields_and_legacy_sampler_names(client):
    body = {"prompt": "x", "steps": 2, "negative_prompt": None, "seed": None, "cfg_scale": None, "styles": None,
            "sampler_index": "DPM++ 2M Karras", "sampler_name": None, "scheduler": None, "distilled_cfg_scale": 3.5,
            "alwayson_scripts": {}, "script_args": [], "override_settings": {"CLIP_stop_at_last_layers": 2},
            "denoising_strength": 0.7}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M" and info["clip_skip"] == 2
    assert "Schedule type: Karras" in info["infotexts"][0] and "Clip skip: 2" in info["infotexts"][0]
    lower = client.post("/sdapi/v1/txt2img", json={"steps": 2, "sampler_name": "euler", "scheduler": "karras"})
    assert "Schedule type: Karras" in json.loads(lower.json()["info"])["infotexts"][0]


def test_infotext_fills_fields_not_given(client):
    text = "a boat\nNegative prompt: fog\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 99, Size: 64x64"
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"infotext": text, "cfg_scale": 6}).json()["info"])
    assert (info["prompt"], info["negative_prompt"], info["steps"], info["seed"]) == ("a boat", "fog", 3, 99)
    assert info["cfg_scale"] == 6


@pytest.mark.parametrize("body, field", [
    ({"steps": "many"}, "steps"), ({"cfg_scale": "high"}, "cfg_scale"), ({"width": [64]}, "width"),
    ({"prompt": {"a": 1}}, "prompt"), ({"override_settings": 5}, "override_settings"),
])
def test_wrong_types_are_422_naming_the_field(client, body, field):
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == field


@pytest.mark.parametrize("body, words", [
    ({"steps": 1000}, "steps"), ({"width": 65, "height": 64}, "width"), ({"width": 8192, "height": 8192}, "width"),
    ({"width": 64}, "width and height"), ({"sampler_name": "Nope"}, "unknown sampler"),
    ({"scheduler": "wobbly"}, "schedule type"), ({"cfg_scale": float("inf")}, "cfg_scale"),
    ({"batch_size": 9}, "batch_size"), ({"n_iter": 10, "batch_size": 2}, "n_iter x batch_size"),
    ({"override_settings": {"sd_model_checkpoint": "missing.safetensors"}}, "sd_model_checkpoint"),
    ({"tiling": True}, "tiling"), ({"enable_hr": True, "hr_scale": 9}, "hires_scale"), ({"prompt": "x" * 20_001}, "prompt"),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts"),
])
def test_bad_values_are_422_and_nothing_is_queued(client, body, words):
    before = client.get("/api/v1/jobs").json()
    response = client.post("/sdapi/v1/txt2img", content=json.dumps(body, allow_nan=True),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert words in json.dumps(response.json())
    assert len(client.get("/api/v1/jobs").json()) == len(before)


def test_hires_fix_second_pass(client):
    body = {"prompt": "hires", "steps": 2, "seed": 8, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5,
            "hr_upscaler": "Latent"}
    response = client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(response["info"])
    assert decode(response["images"][0]).size == (96, 96)
    assert info["denoising_strength"] == 0.5 and "Hires upscale: 1.5" in info["infotexts"][0]


def test_progress_preview_and_interrupt(client):
    accepted = client.post("/api/v1/jobs", json={"prompt": "slow", "steps": 150, "n_iter": 3, "seed": 5})
    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    deadline, progress = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["job"] == job_id and progress["state"]["sampling_step"] > 5 and progress["current_image"]:
            break
        time.sleep(0.1)
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert STATE_KEYS <= set(progress["state"]) and progress["state"]["job_count"] == 3
    assert 0 < progress["progress"] <= 1 and progress["eta_relative"] >= 0
    assert decode(progress["current_image"]).format == "PNG"
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").json() == {}
    job = wait_for_state(client, job_id, ("interrupted",), timeout=30)
    # A1111 keeps the image being made when interrupted; the remaining iterations never run.
    assert [image["seed"] for image in job["images"]] == [5]
    assert client.get("/sdapi/v1/progress").json()["state"]["job"] == ""


def test_skip_drops_the_current_iteration_only(client):
    job_id = client.post("/api/v1/jobs", json={"prompt": "skip", "steps": 60, "n_iter": 3, "seed": 20}).json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["state"]
        if state["job"] == job_id and state["sampling_step"] > 2:
            break
        time.sleep(0.05)
    client.post("/sdapi/v1/skip")
    job = wait_for_state(client, job_id, ("done",), timeout=60)
    assert [image["seed"] for image in job["images"]] == [21, 22]


def test_native_job_events_and_gallery(client):
    accepted = client.post("/api/v1/jobs", json={"prompt": "a green tractor", "steps": 4, "seed": 3}).json()
    events = []
    with client.stream("GET", accepted["events"]) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            if line.startswith("data: ") and events[-1] == "done":
                final = json.loads(line[6:])
                break
    assert events[-1] == "done" and final["state"] == "done"
    image = final["images"][0]
    assert image["seed"] == 3 and "a green tractor" in image["infotext"]
    png = client.get(image["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    found = client.get("/api/v1/gallery", params={"q": "GREEN TRACTOR"}).json()["images"]
    assert [item["id"] for item in found] == [image["id"]]
    assert client.get("/api/v1/gallery", params={"q": "100%_"}).json()["images"] == []
    assert client.get(f"/api/v1/jobs/{accepted['id']}").json()["info"]["all_seeds"] == [3]


def test_unknown_ids_and_paths_are_404(client):
    assert client.get("/api/v1/jobs/nope").status_code == 404
    assert client.get("/api/v1/images/999999").status_code == 404
    for path in ("/api/v1/images/..%2f..%2fsdgen.sqlite3", "/api/v1/images/%2e%2e", "/static/..%2f..%2fcli.py",
                 "/static/../server/app.py"):
        assert client.get(path).status_code in (404, 422), path


def test_listing_routes(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert models[0]["title"].endswith(f"[{models[0]['sha256'][:10]}]")
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert set(schedulers[0]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    for route in ("sd-vae", "loras", "upscalers", "hypernetworks", "prompt-styles"):
        assert isinstance(client.get(f"/sdapi/v1/{route}").json(), list)
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert client.get("/sdapi/v1/txt2img").status_code == 405  # clients probe POST-only routes this way
    assert client.get("/sdapi/v1/no-such-route").status_code == 404
    assert client.get("/openapi.json").json()["paths"]["/sdapi/v1/txt2img"]


def test_options_switch_models_and_reject_unknown(client):
    options = client.get("/sdapi/v1/options").json()
    title = options["sd_model_checkpoint"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 422
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title.split(" [")[0],
                                                   "some_setting": 3}).status_code == 200
    after = client.get("/sdapi/v1/options").json()
    assert after["sd_model_checkpoint"] == title and after["some_setting"] == 3


def test_png_info_reads_back_parameters(client):
    image = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat, on a mat", "steps": 2, "seed": 11}).json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert info["parameters"]["Prompt"] == "a cat, on a mat" and info["parameters"]["Seed"] == "11"
    assert client.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"}).status_code == 422
    blank = io.BytesIO()
    Image.new("RGB", (8, 8)).save(blank, format="PNG")
    empty = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(blank.getvalue()).decode()}).json()
    assert empty == {"info": "", "items": {}, "parameters": {}}


def test_img2img_validates_its_images_before_queueing(client):
    assert client.post("/sdapi/v1/img2img", json={"prompt": "x"}).status_code == 422
    response = client.post("/sdapi/v1/img2img", json={"init_images": ["not base64 at all!"]})
    assert response.status_code == 422 and "init_images[0]" in response.text
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    response = client.post("/sdapi/v1/img2img", json={"init_images": [base64.b64encode(bomb.getvalue()).decode()]})
    assert response.status_code == 422 and "size limit" in response.text
    assert client.post("/sdapi/v1/img2img", json={"init_images": [], "denoising_strength": 2}).status_code == 422


def test_guards_origin_host_and_body_size(server, client):
    for origin in ("http://evil.example", "null"):
        response = client.post("/sdapi/v1/interrupt", headers={"Origin": origin})
        assert response.status_code == 403
    assert client.post("/sdapi/v1/interrupt", headers={"Origin": server.url}).status_code == 200
    assert client.post("/sdapi/v1/interrupt", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.get("/sdapi/v1/options", headers={"Host": "rebind.example"}).status_code == 403
    assert "access-control-allow-origin" not in client.get("/sdapi/v1/options", headers={"Origin": "http://x"}).headers
    big = client.post("/sdapi/v1/png-info", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413

    def chunks():
        for _ in range(40):
            yield b" " * 65536

    streamed = client.post("/sdapi/v1/png-info", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]


def test_fifty_concurrent_clients_get_200_or_503(server):
    codes, lock = [], threading.Lock()

    def one(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=180) as http:
            response = http.post("/sdapi/v1/txt2img", json={"prompt": f"crowd {index}", "steps": 2, "seed": index})
        with lock:
            codes.append((response.status_code, response.headers.get("retry-after")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert len(codes) == 50
    assert {code for code, _ in codes} <= {200, 503}
    assert any(code == 200 for code, _ in codes) and any(code == 503 for code, _ in codes)
    assert all(retry and int(retry) > 0 for code, retry in codes if code == 503)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/api/v1/health").json()["status"] == "ok"
        assert http.post("/sdapi/v1/txt2img", json={"steps": 2}).status_code == 200
