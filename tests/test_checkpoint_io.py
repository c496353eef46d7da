"""One tiny model in every single-file format (safetensors, zip .ckpt, legacy .pt, fp16), prediction sources,
hashes, `read_vae`, and the full-size SD 1.5 file read through mmap."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdgen.checkpoints import CheckpointError, load_state_dict, read_checkpoint, read_vae
from sdgen.checkpoints.formats import sniff_format
from sdgen.checkpoints.ldm_keys import vae_to_original
from test_ldm_keys import (
    REAL_TEXT, REAL_UNETS, REAL_VAE, TinyModel, _plain, assert_parts_match, assert_same_state, meta_state,
)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> TinyModel:
    torch.set_num_threads(1)
    return TinyModel("sd1", tmp_path_factory.mktemp("sd1"))


def _save_torch(state: dict, path: Path, legacy: bool = False) -> Path:
    # The layout SD training checkpoints have: weights nested under "state_dict" next to training state.
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy"])
def test_every_format_gives_the_same_parts(sd1, tmp_path, kind):
    if kind == "safetensors":
        path = sd1.write_single_file(tmp_path / "model.safetensors")
    else:
        path = _save_torch(sd1.original_state(), tmp_path / f"model.{'ckpt' if kind == 'zip' else 'pt'}", kind == "legacy")
    assert sniff_format(path) == kind if kind != "legacy" else sniff_format(path) == "pickle"
    parts = read_checkpoint(path, config_dir=sd1.config_dir)
    assert_parts_match(parts, sd1)
    assert (parts.family, parts.variant, parts.prediction) == ("sd1", "base", "eps")


def test_zip_checkpoint_tensors_are_mapped_from_the_file(sd1, tmp_path):
    path = _save_torch(sd1.original_state(), tmp_path / "model.ckpt")
    state, metadata = load_state_dict(path)
    size = os.path.getsize(path)
    # every tensor views one copy-on-write mapping of the whole file: no copy was made
    assert {t.untyped_storage().nbytes() for t in state.values()} == {size}
    assert metadata == {}


def test_format_is_chosen_by_content_not_extension(sd1, tmp_path):
    zip_named_safetensors = _save_torch(sd1.original_state(), tmp_path / "model.safetensors")
    safetensors_named_ckpt = sd1.write_single_file(tmp_path / "model.ckpt")
    for path in (zip_named_safetensors, safetensors_named_ckpt):
        assert_parts_match(read_checkpoint(path, config_dir=sd1.config_dir), sd1)


def test_fp16_file_keeps_its_dtype(sd1, tmp_path):
    half = {k: v.half() for k, v in sd1.original_state().items()}
    path = tmp_path / "model-fp16.safetensors"
    save_file({k: v.contiguous() for k, v in half.items()}, path)
    parts = read_checkpoint(path, config_dir=sd1.config_dir)
    assert {v.dtype for v in parts.unet_state.values()} == {torch.float16}
    assert_same_state(parts.unet_state, {k: v.half() for k, v in sd1.unet.state_dict().items()}, "unet")


@pytest.mark.parametrize(
    "metadata, extra, expected",
    [
        ({}, {}, "eps"),
        ({"modelspec.prediction_type": "v"}, {}, "v"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, {}, "v"),
        ({"ss_v_parameterization": "True"}, {}, "v"),
        ({}, {"v_pred": torch.zeros(0)}, "v"),
        ({"modelspec.prediction_type": "epsilon", "ss_v_parameterization": "True"}, {}, "eps"),
    ],
)
def test_prediction_from_file_metadata(sd1, tmp_path, metadata, extra, expected):
    path = sd1.write_single_file(tmp_path / "model.safetensors", extra=extra, metadata=metadata)
    parts = read_checkpoint(path, config_dir=sd1.config_dir)  # the file's word beats config_dir's epsilon
    assert parts.prediction == expected
    assert parts.scheduler_config["prediction_type"] == {"eps": "epsilon", "v": "v_prediction"}[expected]
    assert parts.metadata == metadata


def test_prediction_from_yaml_sidecar_and_explicit_choice(sd1, tmp_path):
    path = sd1.write_single_file(tmp_path / "model.safetensors")
    (tmp_path / "model.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    timesteps: 1000\n')
    assert read_checkpoint(path, config_dir=sd1.config_dir).prediction == "v"
    assert read_checkpoint(path, config_dir=sd1.config_dir, prediction="eps").prediction == "eps"  # the user's word wins
    assert read_checkpoint(path, config_dir=sd1.config_dir, prediction="v_prediction").prediction == "v"
    with pytest.raises(ValueError, match="prediction must be 'eps' or 'v'"):
        read_checkpoint(path, prediction="x0")


def test_model_hash_is_automatic1111s(sd1, tmp_path):
    path = sd1.write_single_file(tmp_path / "model.safetensors")
    parts = read_checkpoint(path, config_dir=sd1.config_dir)
    assert parts.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    folder = read_checkpoint(sd1.folder)
    assert len(folder.short_hash) == 10 and folder.short_hash == read_checkpoint(sd1.folder).short_hash


def test_errors_are_one_line_naming_the_file(sd1, tmp_path):
    path = tmp_path / "vae-only.safetensors"
    save_file({k: v.contiguous() for k, v in sd1.original_state().items() if k.startswith("first_stage_model.")}, path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)) and "no U-Net weights" in message


# ---------------------------------------------------------------- --vae


def test_read_vae_from_every_layout(sd1, tmp_path):
    expected = sd1.vae.state_dict()
    original = vae_to_original(expected, sd1.vae_config)
    full = sd1.write_single_file(tmp_path / "full.safetensors")  # a whole checkpoint works as --vae
    bare = tmp_path / "vae.pt"  # original names, no prefix, training leftovers around them
    torch.save({"state_dict": {**original, "loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.99)}}, bare)
    diffusers_file = tmp_path / "vae-diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in expected.items()}, diffusers_file)
    deprecated = tmp_path / "vae-deprecated.safetensors"  # diffusers < 0.14 attention names
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in expected.items():
        for new, was in renames.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
        old[key] = value.contiguous()
    save_file(old, deprecated)
    for source in (full, bare, diffusers_file, deprecated, sd1.folder, sd1.folder / "vae"):
        config, state = read_vae(source)
        assert_same_state(state, expected, str(source))
        for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"):
            assert _plain(config[key]) == _plain(sd1.vae_config[key]), (source, key)
    assert read_vae(full, scaling_factor=0.13025)[0]["scaling_factor"] == 0.13025
    with pytest.raises(CheckpointError, match="no VAE weights"):
        read_vae(_unet_only(sd1, tmp_path))


def _unet_only(model: TinyModel, tmp_path: Path) -> Path:
    path = tmp_path / "unet-only.safetensors"
    save_file({k: v.contiguous() for k, v in model.original_state().items() if k.startswith("model.")}, path)
    return path


# ---------------------------------------------------------------- full size, mmapped


def _write_streaming_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A safetensors file of fp16 random-looking weights written in chunks (never the whole model in memory)."""
    header, offset = {}, 0
    for name in sorted(shapes):
        nbytes = 2 * int(torch.Size(shapes[name]).numel())
        header[name] = {"dtype": "F16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = (torch.randn(8 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).half().numpy().tobytes()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = offset
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return 8 + len(raw) + offset


_CHILD = textwrap.dedent(
    """
    import json, resource, sys, torch
    torch.set_num_threads(1)
    from sdgen.checkpoints import read_checkpoint
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    parts = read_checkpoint(sys.argv[1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kb": after - before, "family": parts.family, "variant": parts.variant,
                      "prediction": parts.prediction, "unet": parts.unet_config, "vae": parts.vae_config,
                      "text": parts.text_encoders[0][0], "params": sum(t.numel() for t in parts.unet_state.values())}))
    """
)


@pytest.mark.slow
def test_full_size_sd15_file_is_read_through_mmap(tmp_path):
    """~1.07 B parameters in fp16 (2.1 GB): detection and conversion touch shapes only, so memory stays flat."""
    from sdgen.checkpoints.ldm_keys import to_original_checkpoint

    unet, vae, texts = meta_state("sd1")
    flat = to_original_checkpoint("sd1", unet, vae, texts)
    path = tmp_path / "v1-5-random.safetensors"
    size = _write_streaming_safetensors(path, {k: tuple(v.shape) for k, v in flat.items()})
    assert size > 2_000_000_000
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["growth_kb"] * 1024 < size / 20, f"peak RSS grew {report['growth_kb'] / 1024:.0f} MB"
    assert (report["family"], report["variant"], report["prediction"]) == ("sd1", "base", "eps")
    for key, value in {**REAL_UNETS["sd1"], "in_channels": 4, "out_channels": 4, "sample_size": 64}.items():
        assert report["unet"][key] == value, key
    for key, value in REAL_VAE.items():
        assert report["vae"][key] == value, key
    for key, value in REAL_TEXT["sd1"][0].items():
        assert report["text"][key] == value, key
    assert report["params"] == sum(v.numel() for v in unet[1].values())
