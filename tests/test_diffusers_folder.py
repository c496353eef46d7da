"""diffusers folders: every weight layout (safetensors, fp16 variant, shards, .bin), SD 1/2/XL families,
incomplete folders, Hugging Face cache symlinks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sdgen.checkpoints import CheckpointError, read_checkpoint
from test_ldm_keys import TinyModel, assert_parts_match, assert_same_state


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, TinyModel]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("folders")
    return {family: TinyModel(family, root) for family in ("sd1", "sd2", "sdxl", "sdxl_refiner")}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_folder_gives_the_reference_weights_and_configs(models, family):
    model = models[family]
    parts = read_checkpoint(model.folder)
    assert_parts_match(parts, model)
    assert (parts.family, parts.variant) == (family, "base")
    assert parts.prediction == ("v" if family == "sd2" else "eps")
    assert parts.unet_config == json.loads((model.folder / "unet" / "config.json").read_text())
    assert parts.vae_config == json.loads((model.folder / "vae" / "config.json").read_text())
    names = {"sdxl": ["tokenizer", "tokenizer_2"], "sdxl_refiner": ["tokenizer_2"]}.get(family, ["tokenizer"])
    assert parts.tokenizer_dirs == [model.folder / name for name in names]
    if family.startswith("sdxl"):  # the OpenCLIP bigG encoder keeps its projection (pooled embedding)
        assert "text_projection.weight" in parts.text_encoders[-1][1]
        assert parts.text_encoders[-1][0]["architectures"] == ["CLIPTextModelWithProjection"]
    assert all(state["text_model.final_layer_norm.weight"] is not None for _, state in parts.text_encoders)


def test_explicit_prediction_overrides_the_scheduler(models):
    parts = read_checkpoint(models["sd2"].folder, prediction="eps")
    assert parts.prediction == "eps" and parts.scheduler_config["prediction_type"] == "epsilon"


@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_sdxl_single_file_round_trip_with_config_dir(models, tmp_path, family):
    model = models[family]
    path = model.write_single_file(tmp_path / f"{family}.safetensors")
    parts = read_checkpoint(path, config_dir=model.config_dir)
    assert_parts_match(parts, model)
    assert parts.family == family


def test_sdxl_reference_reader_reads_our_original_file(models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model = models["sdxl"]
    path = model.write_single_file(tmp_path / "sdxl.safetensors")
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(model.config_dir), local_files_only=True)
    assert_same_state(loaded.unet.state_dict(), model.unet.state_dict(), "unet")
    assert_same_state(loaded.vae.state_dict(), model.vae.state_dict(), "vae")
    for ours, theirs in zip(model.texts, (loaded.text_encoder, loaded.text_encoder_2)):
        assert_same_state(theirs.state_dict(), ours.state_dict(), "text")


def _copy(model: TinyModel, destination: Path) -> Path:
    shutil.copytree(model.folder, destination)
    return destination


def test_fp16_variant_requested_and_as_fallback(models, tmp_path):
    model = models["sd1"]
    folder = _copy(model, tmp_path / "fp16")
    for component, base in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        from safetensors.torch import load_file, save_file

        plain = folder / component / f"{base}.safetensors"
        save_file({k: v.half().contiguous() for k, v in load_file(plain).items()}, folder / component / f"{base}.fp16.safetensors")
    half = read_checkpoint(folder, weights_variant="fp16")
    assert {v.dtype for v in half.unet_state.values()} == {torch.float16}
    assert read_checkpoint(folder).unet_state["conv_in.weight"].dtype == torch.float32  # plain files first
    for component, base in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        (folder / component / f"{base}.safetensors").unlink()
    only_half = read_checkpoint(folder)  # a folder with fp16 files only still loads
    assert_same_state(only_half.unet_state, {k: v.half() for k, v in model.unet.state_dict().items()}, "unet")


def test_sharded_and_bin_weights(models, tmp_path):
    model = models["sd1"]
    folder = _copy(model, tmp_path / "sharded")
    shutil.rmtree(folder / "unet")
    model.unet.save_pretrained(folder / "unet", max_shard_size="300KB")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(model.texts[0].state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    parts = read_checkpoint(folder)
    assert_parts_match(parts, model)
    assert len([p for p in parts.weight_files if "unet" in p.parts]) > 1


def test_deprecated_vae_attention_names(models, tmp_path):
    from safetensors.torch import load_file, save_file

    model = models["sd1"]
    folder = _copy(model, tmp_path / "old-vae")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in load_file(weights).items():
        for new, was in renames.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
        old[key] = value
    save_file(old, weights)
    assert_same_state(read_checkpoint(folder).vae_state, model.vae.state_dict(), "vae")


@pytest.mark.parametrize("missing", ["unet", "text_encoder", "scheduler"])
def test_missing_component_is_named(models, tmp_path, missing):
    folder = _copy(models["sd1"], tmp_path / "incomplete")
    index = json.loads((folder / "model_index.json").read_text())
    del index[missing]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"component '{missing}' is missing"):
        read_checkpoint(folder)


def test_missing_weights_and_configs_are_named(models, tmp_path):
    folder = _copy(models["sd1"], tmp_path / "no-weights")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="unet: no weights file"):
        read_checkpoint(folder)
    folder = _copy(models["sd1"], tmp_path / "no-config")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing file"):
        read_checkpoint(folder)


def test_hugging_face_cache_symlinks_are_followed(models, tmp_path):
    """The hub cache keeps files in blobs/ and links them from snapshots/<revision>/: that is allowed."""
    source = models["sd1"].folder
    repo = tmp_path / "models--someone--tiny-sd"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    for file in source.rglob("*"):
        if file.is_file():
            target = snapshot / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = repo / "blobs" / f"{abs(hash(str(file))):x}"
            shutil.copy(file, blob)
            os.symlink(os.path.relpath(blob, target.parent), target)
    assert_parts_match(read_checkpoint(snapshot), models["sd1"])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_folder_converts_to_an_original_single_file(models, tmp_path, family):
    from safetensors.torch import save_file

    from sdgen.checkpoints.ldm_keys import parts_to_original

    model = models[family]
    path = tmp_path / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in parts_to_original(read_checkpoint(model.folder)).items()}, path)
    assert_parts_match(read_checkpoint(path, config_dir=model.config_dir), model)
