"""The tiny preview decoder (TAESD's architecture) against diffusers' AutoencoderTiny: same weights
read from an AutoencoderTiny folder, a TAESD single file (its own key names) and a file in
diffusers' names give the reference's images; broken inputs give one-line errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdgen.checkpoints import CheckpointError
from sdgen.models.tiny_decoder import TinyDecoderConfig, load_tiny_decoder

diffusers = pytest.importorskip("diffusers")


def reference_tiny_autoencoder(channels: int = 16, latent_channels: int = 4, seed: int = 0, upscale: int = 8):
    """TAESD's shape (8x) at a small width; upscale 4 (three stages) fits the embedded model's VAE."""
    torch.manual_seed(seed)
    blocks = (3, 3, 3, 1) if upscale == 8 else (3, 3, 1)
    model = diffusers.AutoencoderTiny(encoder_block_out_channels=(channels,) * 4,
                                      decoder_block_out_channels=(channels,) * len(blocks), num_decoder_blocks=blocks,
                                      latent_channels=latent_channels)
    with torch.no_grad():  # diffusers' default init leaves ReLU nets near zero; spread the weights
        for parameter in model.parameters():
            parameter.normal_(0, 0.2 if parameter.ndim > 1 else 0.05)
    return model.eval()


def taesd_names(decoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' decoder.layers.N... as TAESD's own decoder file names them: N + 1 (its clamp is entry 0)."""
    renamed = {}
    for key, value in decoder_state.items():
        index, rest = key[len("decoder.layers."):].split(".", 1)
        renamed[f"{int(index) + 1}.{rest}"] = value.contiguous()
    return renamed


def taesd_decoder_file(path: Path, upscale: int) -> Path:
    """A random TAESD-shaped decoder saved at `path` in TAESD's own key names."""
    reference = reference_tiny_autoencoder(upscale=upscale)
    save_file(taesd_names({k: v for k, v in reference.state_dict().items() if k.startswith("decoder.")}), str(path))
    return path


def previewing_server(tmp_path, preview_decoder, **options):
    """A server app on the embedded model without its own decoder, and its worker."""
    from server_harness import fastapi_app
    from sdgen.server.app import create_app
    from sdgen.server.config import ServerConfig

    app = create_app(ServerConfig(data_dir=tmp_path / "data", model=model_without_own_decoder(tmp_path),
                                  preview_decoder=preview_decoder, **options))
    return app, fastapi_app(app).state.server.worker


@pytest.fixture(scope="module")
def reference():
    return reference_tiny_autoencoder()


@pytest.mark.parametrize("form", ["folder", "taesd file", "diffusers-named file"])
def test_tiny_decoder_matches_autoencoder_tiny(reference, tmp_path, form) -> None:
    decoder_state = {k: v for k, v in reference.state_dict().items() if k.startswith("decoder.")}
    if form == "folder":
        reference.save_pretrained(tmp_path / "taesd")
        path = tmp_path / "taesd"
    else:
        path = tmp_path / "taesd_decoder.safetensors"
        save_file(taesd_names(decoder_state) if form == "taesd file" else
                  {k: v.contiguous() for k, v in decoder_state.items()}, str(path))
    ours = load_tiny_decoder(path)
    assert ours.cfg == TinyDecoderConfig(channels=(16,) * 4) and ours.upscale == 8
    latents = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        expected = reference.decode(latents).sample
        actual = ours(latents)
    assert actual.shape == expected.shape == (2, 3, 40, 56)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0.05  # a real picture of the weights, not a flat one


def test_tiny_decoder_shape_comes_from_the_weights(tmp_path) -> None:
    """Other widths and latent channel counts (TAESD for 16-channel latents) are read, not assumed."""
    reference = reference_tiny_autoencoder(channels=8, latent_channels=16, seed=3)
    reference.save_pretrained(tmp_path / "taesd16")
    ours = load_tiny_decoder(tmp_path / "taesd16", dtype=torch.bfloat16)
    assert ours.cfg.latent_channels == 16 and ours.cfg.channels == (8,) * 4
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, actual = reference.decode(latents).sample, ours(latents.bfloat16()).float()
    assert ((actual - expected).abs().mean() / expected.abs().mean()).item() < 0.02


@pytest.mark.parametrize("case", ["missing", "not a decoder", "truncated block", "wrong class"])
def test_tiny_decoder_refuses_what_it_cannot_read(reference, tmp_path, case) -> None:
    path = tmp_path / "decoder.safetensors"
    if case == "not a decoder":
        save_file({"weight": torch.zeros(3, 3)}, str(path))
    elif case == "truncated block":
        state = taesd_names({k: v for k, v in reference.state_dict().items() if k.startswith("decoder.")})
        save_file({k: v for k, v in state.items() if not k.startswith("3.conv.2.")}, str(path))
    elif case == "wrong class":
        path = tmp_path / "vae"
        path.mkdir()
        (path / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(CheckpointError) as caught:
        load_tiny_decoder(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert ("TAESD" in message) or ("AutoencoderTiny" in message)


@pytest.mark.parametrize("upscale", [4, 8])
def test_server_previews_go_through_the_tiny_decoder(tmp_path, monkeypatch, upscale) -> None:
    """`sdgen serve --preview-decoder`: each preview is the tiny decoder's picture of that step's
    denoised latent, at the image's full size, and the A1111 options say TAESD. A decoder for
    another latent space (8x, against the test model's 4x VAE) leaves the linear previews."""
    from PIL import Image
    from starlette.testclient import TestClient

    from sdgen.server.previews import tiny_preview_pixels

    path = taesd_decoder_file(tmp_path / "taesd_decoder.safetensors", upscale)
    app, worker = previewing_server(tmp_path, path, preview_every=2)
    seen = []
    on_step = worker._on_step

    def recording(image_index, step, total, denoised):
        on_step(image_index, step, total, denoised)
        seen.append((step, denoised[:1].clone(), worker.preview_png()))

    monkeypatch.setattr(worker, "_on_step", recording)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/sdapi/v1/options").json()["show_progress_type"] == "TAESD"
        assert worker.preview_png() is None  # a watcher (nothing to show yet): previews get decoded
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 4, "width": 64,
                                                          "height": 64, "seed": 1})
        assert response.status_code == 200, response.text
    assert worker.tiny_decoder is (worker.preview_decoder if upscale == 4 else None)
    previews = [(step, latents, png) for step, latents, png in seen if step in (0, 2, 3)]
    assert len(previews) == 3
    for step, latents, png in previews:
        image = Image.open(io.BytesIO(png))
        if upscale == 8:
            assert image.size == (16, 16)  # the linear map, at latent size
            continue
        assert image.size == (64, 64)
        assert (np.asarray(image) == tiny_preview_pixels(worker.preview_decoder, latents)).all()


@pytest.mark.parametrize("watched", [True, False], ids=["watched", "unwatched"])
def test_the_tiny_decoder_runs_only_while_previews_are_fetched(tmp_path, monkeypatch, watched) -> None:
    """For a small model a tiny decode costs as much as several steps: the worker runs it only when
    a client fetched a preview in the last PREVIEW_WATCH_SECONDS, and keeps just the latent otherwise."""
    import sdgen.server.worker as worker_module
    from starlette.testclient import TestClient

    path = taesd_decoder_file(tmp_path / "taesd_decoder.safetensors", 4)
    app, worker = previewing_server(tmp_path, path, preview_every=1)
    decoded = []
    original = worker_module.tiny_preview_pixels
    monkeypatch.setattr(worker_module, "tiny_preview_pixels", lambda *a: decoded.append(1) or original(*a))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        if watched:
            worker.preview_png()  # as the progress routes do while a client watches
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 4, "width": 64,
                                                          "height": 64, "seed": 1})
        assert response.status_code == 200, response.text
    assert worker.tiny_decoder is worker.preview_decoder
    assert len(decoded) == (4 if watched else 0)
    assert worker.progress.preview_latents is None  # reset after the job; the previews existed during it


def model_without_own_decoder(tmp_path) -> str:
    """The embedded model's folder (4x latents) copied without its own preview decoder."""
    import shutil

    from sdgen.models.tiny_decoder import FOLDER_FILE
    from sdgen.pipelines.loading import embedded_model_path

    folder = tmp_path / "model"
    shutil.copytree(embedded_model_path(), folder, ignore=shutil.ignore_patterns(FOLDER_FILE))
    return str(folder)


@pytest.mark.parametrize("case", ["own", "unreadable", "not asked for", "the user's"])
def test_a_model_folder_brings_its_own_preview_decoder(tmp_path, capfd, case) -> None:
    """With `--preview-decoder model`, a folder's tiny_decoder.safetensors (the embedded model
    ships one) gives the previews; one that cannot be read leaves linear previews and a warning.
    Without the option previews stay linear; with a path, that decoder is used."""
    from starlette.testclient import TestClient

    from server_harness import fastapi_app
    from sdgen.models.tiny_decoder import FOLDER_FILE, TinyDecoder
    from sdgen.server.app import create_app
    from sdgen.server.config import ServerConfig

    folder = Path(model_without_own_decoder(tmp_path))
    torch.manual_seed(4)
    own = TinyDecoder(TinyDecoderConfig(channels=(8,) * 3, blocks=(1, 1, 1)))
    if case == "unreadable":
        (folder / FOLDER_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    else:
        save_file(own.state_dict(), str(folder / FOLDER_FILE))
    choice = {"own": "model", "unreadable": "model", "not asked for": None, "the user's": tmp_path / "user.safetensors"}
    if case == "the user's":
        taesd_decoder_file(choice[case], 4)
    app = create_app(ServerConfig(data_dir=tmp_path / "data", model=str(folder), preview_decoder=choice[case]))
    worker = fastapi_app(app).state.server.worker
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "width": 64,
                                                          "height": 64, "seed": 1})
        assert response.status_code == 200, response.text
        progress_type = client.get("/sdapi/v1/options").json()["show_progress_type"]
    if case == "unreadable":
        assert worker.tiny_decoder is None and progress_type == "Approx cheap"
        warning = [line for line in capfd.readouterr().err.splitlines() if FOLDER_FILE in line]
        assert len(warning) == 1 and "previews use the linear map" in warning[0]
    elif case == "not asked for":
        assert worker.tiny_decoder is None and progress_type == "Approx cheap"
    elif case == "the user's":
        assert worker.tiny_decoder is worker.preview_decoder and progress_type == "TAESD"
    else:
        assert worker.tiny_decoder is not None and worker.preview_decoder is None
        assert worker.tiny_decoder.cfg == own.cfg and progress_type == "TAESD"
        assert all(torch.equal(worker.tiny_decoder.state_dict()[k].float(), v) for k, v in own.state_dict().items())


def test_serve_refuses_a_preview_decoder_it_cannot_read(tmp_path) -> None:
    from server_harness import ServerProcess

    server = ServerProcess(tmp_path / "data", "--preview-decoder", str(tmp_path / "missing.safetensors"),
                           model=None).start(wait=False)
    assert server.process.wait(timeout=60) == 2
    output = server.output().strip().splitlines()
    assert len(output) == 1 and "missing.safetensors: no such file or folder" in output[0], output


def test_preview_decoder_option_takes_a_path_or_model() -> None:
    import argparse

    from sdgen.server.arguments import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args(["--preview-decoder", "model"])).preview_decoder == "model"
    given = config_from_args(parser.parse_args(["--preview-decoder", "~/taesd_decoder.safetensors"])).preview_decoder
    assert given == Path.home() / "taesd_decoder.safetensors"
    assert config_from_args(parser.parse_args([])).preview_decoder is None
