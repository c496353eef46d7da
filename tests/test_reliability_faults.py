"""Faults outside the server (RELIABILITY.md "Faults" and "Determinism"): NaN from the VAE, a full disk, a
read-only output folder, a job too large for the memory; batch and replay determinism."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import sdgen
from disk_faults import fill_the_disk
from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.cli import main
from sdgen.errors import UserError
from sdgen.pipelines.infotext import parse_infotext
from sdgen.pipelines.naming import OutputError
from sdgen.pipelines.request import GenerationRequest
from sdgen.runtime import memory
from sdgen.runtime.memory import InsufficientMemoryError, check_job_memory, estimate_job
from sdgen.runtime.numerics import NonFiniteOutputError

PROMPT = "a tranquil lake with the mountains"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("faults")
    return save_folder(make_reference_pipeline("sd1", workdir), workdir / "model")


def _generate_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", PROMPT, "--model", str(folder), "--seed", "11", "--steps", "2", "--sampler", "Euler",
            "--width", "64", "--height", "64", "--out", str(out), *extra]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- NaN in the VAE


def _nan_in_reduced_precision(vae):
    """A VAE whose decode overflows to NaN unless it runs in float32 (what fp16 SD VAEs do)."""
    original = vae.decode

    def decode(latents):
        pixels = original(latents)
        return pixels if next(vae.parameters()).dtype == torch.float32 else torch.full_like(pixels, float("nan"))

    return decode


def test_vae_nan_is_redone_in_float32(model_folder, monkeypatch, capsys):
    pipe = sdgen.load(model_folder, dtype="bf16")
    monkeypatch.setattr(pipe.vae, "decode", _nan_in_reduced_precision(pipe.vae))
    result = pipe.generate(prompt=PROMPT, seed=2, steps=2, width=64, height=64)
    assert next(pipe.vae.parameters()).dtype == torch.float32  # stays upcast, as A1111's auto-revert
    assert np.asarray(result.images[0]).std() > 5  # a real image, not black
    assert "decoding again in float32" in capsys.readouterr().err


def test_vae_nan_even_in_float32_fails_and_saves_nothing(model_folder, tmp_path, monkeypatch, capsys):
    def always_nan(self_vae_decode):
        return lambda latents: torch.full((latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8), float("nan"))

    pipe = sdgen.load(model_folder)
    monkeypatch.setattr(pipe.vae, "decode", always_nan(pipe.vae.decode))
    with pytest.raises(NonFiniteOutputError, match="even in float32"):
        pipe.generate(prompt=PROMPT, seed=2, steps=2, width=64, height=64)
    # the CLI: one line, exit 2, no file; the reason is a NaN, never a safety-checker flag
    monkeypatch.setattr(sdgen, "load", lambda *a, **k: pipe)
    out = tmp_path / "out"
    assert main(_generate_args(model_folder, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN" in err and "safety" not in err
    assert _files(out) == []


def test_nan_latents_get_their_own_message(model_folder):
    pipe = sdgen.load(model_folder)
    with pytest.raises(NonFiniteOutputError, match="U-Net overflowed"):
        pipe.decode(torch.full((1, 4, 8, 8), float("nan")))


# ---------------------------------------------------------------- disk full, read-only folder


def test_disk_full_fails_with_the_reason_and_no_partial_file(model_folder, tmp_path, monkeypatch, capsys):
    fill_the_disk(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    assert main(_generate_args(model_folder, out)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.startswith("sdgen: error: cannot write images to")
    assert _files(out) == []  # neither the PNG nor its temporary file


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_output_folder(model_folder, tmp_path, monkeypatch, capsys, code):
    # The tests may run as root, for whom permission bits do not apply: the refusal is injected where
    # the kernel would give it, at the creation of the temporary file.
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "out"
    out.mkdir()
    assert main(_generate_args(model_folder, out)) == 2
    assert os.strerror(code) in capsys.readouterr().err
    assert _files(out) == []


def test_output_error_is_a_user_error_in_the_api(model_folder, tmp_path):
    result = sdgen.load(model_folder).generate(prompt=PROMPT, seed=1, steps=2, width=64, height=64)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write images to") as error:
        result.save(blocker / "sub")
    assert isinstance(error.value, UserError)


# ---------------------------------------------------------------- memory


def test_estimate_grows_with_size_and_batch(model_folder):
    pipe = sdgen.load(model_folder)
    common = dict(n=1, guidance=True, dtype=torch.float32, latent_factor=pipe.latent_factor)
    small = estimate_job(pipe.unet.cfg, pipe.vae.cfg, width=64, height=64, batch_size=1, **common)
    large = estimate_job(pipe.unet.cfg, pipe.vae.cfg, width=512, height=512, batch_size=1, **common)
    batch = estimate_job(pipe.unet.cfg, pipe.vae.cfg, width=512, height=512, batch_size=4, **common)
    assert small.peak_bytes < large.peak_bytes < batch.peak_bytes
    assert batch.unet_bytes > 3 * large.unet_bytes


def test_job_too_large_for_memory_is_refused_before_allocating(model_folder, monkeypatch, tmp_path, capsys):
    pipe = sdgen.load(model_folder)
    calls = []
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 << 20)  # a 64 MB machine
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* GiB .* try --batch-size 1, a smaller width"):
        pipe.generate(prompt=PROMPT, seed=1, steps=2, width=1024, height=1024, batch_size=4, n=4)
    assert calls == []
    monkeypatch.setattr(sdgen, "load", lambda *a, **k: pipe)
    out = tmp_path / "out"
    assert main(_generate_args(model_folder, out)[:-6] + ["--width", "2048", "--height", "2048", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--dtype bf16" in err and err.count("\n") == 1 and calls == [] and _files(out) == []


def test_job_that_fits_passes(model_folder):
    pipe = sdgen.load(model_folder)
    request = GenerationRequest(prompt=PROMPT, width=64, height=64)
    assert check_job_memory(pipe, request, available=8 << 30).peak_bytes < 64 << 20


# ---------------------------------------------------------------- determinism


def test_same_request_twice_gives_identical_pixels(model_folder):
    pipe = sdgen.load(model_folder)
    first = pipe.generate(prompt=PROMPT, seed=21, steps=3, sampler="Euler a", width=64, height=64, n=2)
    second = pipe.generate(prompt=PROMPT, seed=21, steps=3, sampler="Euler a", width=64, height=64, n=2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first.images, second.images))


def test_random_seed_is_returned_and_stored(model_folder, tmp_path):
    pipe = sdgen.load(model_folder)
    result = pipe.generate(prompt=PROMPT, seed=-1, steps=2, width=64, height=64, n=2)
    assert result.seeds[1] == result.seeds[0] + 1 and 0 <= result.seeds[0] < 4294967294
    paths = result.save(tmp_path)
    for seed, path, text in zip(result.seeds, paths, result.infotexts):
        assert parse_infotext(text)["Seed"] == str(seed) and path.stem.endswith(f"-{seed}")


def test_replay_of_a_saved_png_gives_the_same_pixels(model_folder, tmp_path):
    """The parameters stored in a PNG, read back, make the same image (batch image 2 of a seed-40 run)."""
    from PIL import Image

    pipe = sdgen.load(model_folder)
    original = pipe.generate(prompt=PROMPT, negative_prompt="blurry", seed=40, steps=3, sampler="DPM++ 2M",
                             scheduler="karras", cfg_scale=6.5, width=64, height=72, n=3)
    path = original.save(tmp_path)[2]
    stored = parse_infotext(Image.open(path).info["parameters"])
    replay = pipe.generate(prompt=stored["Prompt"], negative_prompt=stored["Negative prompt"], seed=int(stored["Seed"]),
                           steps=int(stored["Steps"]), sampler=stored["Sampler"], scheduler=stored["Schedule type"],
                           cfg_scale=float(stored["CFG scale"]), width=int(stored["Size-1"]), height=int(stored["Size-2"]))
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(replay.images[0]))
