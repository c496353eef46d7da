"""Checkpoint catalog: titles and hashes as A1111 shows them, the hash cache, model switching over HTTP."""

from __future__ import annotations

import hashlib
import json
import shutil

import httpx

from server_harness import EMBEDDED, ServerProcess, model_folder
from sdgen.server.catalog import Catalog


def test_titles_hashes_and_cache(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "b-model.safetensors").write_bytes(b"weights b")
    (models / "a-model.ckpt").write_bytes(b"weights a")
    (models / "notes.txt").write_text("not a model")
    folder = models / "c-folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet")
    catalog = Catalog(tmp_path, str(models / "b-model.safetensors"), str(models))
    names = [entry.filename for entry in catalog.entries]
    assert names == ["b-model.safetensors", "a-model.ckpt", "c-folder"]  # the default model first
    sha = hashlib.sha256(b"weights b").hexdigest()
    assert catalog.default.title == f"b-model.safetensors [{sha[:10]}]"
    folder_sha = hashlib.sha256(f"unet/diffusion_pytorch_model.safetensors:{hashlib.sha256(b'unet').hexdigest()}\n"
                                .encode()).hexdigest()
    assert catalog.find("c-folder").sha256 == folder_sha
    for name in ("a-model", "a-model.ckpt", catalog.entries[1].title, catalog.entries[1].hash):
        assert catalog.find(name) is catalog.entries[1]
    assert catalog.find("../b-model.safetensors") is None and catalog.find(None) is catalog.default
    assert len(json.loads((tmp_path / "hashes.json").read_text())) == 3

    # A rescan reads no unchanged file again; a changed file is rehashed.
    import sdgen.server.catalog as module

    def refuse(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(module, "file_sha256", refuse)
    assert Catalog(tmp_path, str(models / "b-model.safetensors"), str(models)).default.sha256 == sha
    monkeypatch.undo()
    (models / "a-model.ckpt").write_bytes(b"weights a, retrained")
    assert Catalog(tmp_path, None, str(models)).find("a-model").sha256 == hashlib.sha256(
        b"weights a, retrained").hexdigest()


def test_switch_models_with_options_and_override_settings(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(model_folder() or EMBEDDED.parent, models / "second-model")
    with ServerProcess(tmp_path / "data", "--models-dir", str(models)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        titles = [item["title"] for item in client.get("/sdapi/v1/sd-models").json()]
        assert len(titles) == 2 and titles[1].startswith("second-model [")
        first = json.loads(client.post("/sdapi/v1/txt2img", json={"steps": 2}).json()["info"])
        assert first["sd_model_name"] != "second-model"
        override = {"steps": 2, "override_settings": {"sd_model_checkpoint": "second-model"}}
        assert json.loads(client.post("/sdapi/v1/txt2img", json=override).json()["info"])["sd_model_name"] == "second-model"
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles[1]}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[1]
        third = json.loads(client.post("/sdapi/v1/txt2img", json={"steps": 2}).json()["info"])
        assert third["sd_model_name"] == "second-model" and "Model: second-model" in third["infotexts"][0]
