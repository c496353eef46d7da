"""Hostile and broken files: code-running pickles, zip bombs, damaged safetensors headers, escaping folders.

Every fixture is made here: pickles by `__reduce__` or by hand-written opcodes, zips with
`zipfile`, safetensors as byte strings. A pickle that would run a command targets a sentinel
file, which must never appear.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from sdgen.checkpoints import CheckpointError, load_state_dict, read_checkpoint
from sdgen.checkpoints.pickle_io import load_pickle
from sdgen.checkpoints.safetensors_io import load_safetensors


class _Reduce:
    """Pickles as `call(*args)`: how a malicious checkpoint runs code at load time."""

    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _evil_payloads(sentinel: Path) -> dict[str, bytes]:
    touch = f"touch {sentinel}"
    by_hand = (  # getattr(__import__('os'), 'system')('touch ...'), protocol 0 opcodes
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V" + touch.encode() + b"\ntR."
    )
    return {
        "posix.system": pickle.dumps(_Reduce(os.system, touch), protocol=2),
        "builtins.eval": pickle.dumps(_Reduce(eval, f"__import__('os').system('{touch}')"), protocol=2),
        "builtins.exec": pickle.dumps(_Reduce(exec, f"import os; os.system('{touch}')"), protocol=4),
        "builtins.getattr": by_hand,
        "importlib.import_module": pickle.dumps(_Reduce(importlib.import_module, "os"), protocol=4),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(sentinel)]), protocol=2),
    }


def _torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A zip laid out as torch.save writes it (archive/data.pkl, archive/data/<key>, version, byteorder)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", b"little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", b"3\n")
    return path


def _in_layouts(tmp_path: Path, name: str, payload: bytes) -> list[Path]:
    raw = tmp_path / f"{name}.ckpt"
    raw.write_bytes(payload)  # a bare pickle stream, where legacy torch files start
    renamed = tmp_path / f"{name}.safetensors"  # the extension lies; the magic bytes do not
    renamed.write_bytes(payload)
    return [raw, renamed, _torch_zip(tmp_path / f"{name}-zip.pt", payload)]


@pytest.mark.parametrize("forbidden", ["posix.system", "builtins.eval", "builtins.exec", "builtins.getattr",
                                       "importlib.import_module", "subprocess.Popen"])
def test_code_running_pickles_are_refused_by_name(tmp_path, forbidden):
    sentinel = tmp_path / "pwned"
    for path in _in_layouts(tmp_path, "evil", _evil_payloads(sentinel)[forbidden]):
        with pytest.raises(CheckpointError, match=f"refused to load: the pickle asks for the global '{forbidden}'"):
            read_checkpoint(path)
        with pytest.raises(CheckpointError, match=forbidden):
            load_pickle(path)  # what LoRA / embedding loaders call
    assert not sentinel.exists()


def test_evil_global_after_real_tensors_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(3)}, "hook": _Reduce(os.system, f"touch {sentinel}")}, path)
    with pytest.raises(CheckpointError, match="posix.system"):
        load_state_dict(path)
    assert not sentinel.exists()


def test_no_fallback_to_unrestricted_loaders(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an unrestricted loader was called")

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, forbidden)
    sentinel = tmp_path / "pwned"
    for path in _in_layouts(tmp_path, "evil", _evil_payloads(sentinel)["posix.system"]):
        with pytest.raises(CheckpointError, match="posix.system"):
            load_state_dict(path)
    legit = tmp_path / "legit.ckpt"
    torch.save({"state_dict": {"w": torch.arange(6.0)}}, legit)  # torch.save is not patched
    assert torch.equal(load_state_dict(legit)[0]["w"], torch.arange(6.0))
    assert not sentinel.exists()


def _fake_lightning_class():
    """A stand-in for pytorch_lightning's ModelCheckpoint with the real module path, for pickling only."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    modules = [types.ModuleType(name) for name in names]
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[-1].ModelCheckpoint = cls
    return dict(zip(names, modules)), cls


def _rewrite_zip_pickle(path: Path, replace: tuple[bytes, bytes]) -> None:
    """Rewrite a torch zip with data.pkl edited (zipfile's writer also drops torch's 64-byte alignment)."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data.replace(*replace) if name.endswith("data.pkl") else data)


def test_lightning_and_numpy_checkpoint_loads_without_importing_them(tmp_path, monkeypatch):
    fake_modules, checkpoint_cls = _fake_lightning_class()
    for name, module in fake_modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    weights = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3, dtype=torch.float16),
               "model.diffusion_model.time_embed.0.bias": torch.randn(8)}
    ckpt = {  # what SD's training run saved: PL callback state keyed by the class, numpy scalars
        "state_dict": weights, "epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
        "callbacks": {checkpoint_cls: {"best_model_score": np.float64(0.125), "monitor": None,
                                       "dirpath": "/fsx/checkpoints", "current_score": np.float32(0.5)}},
        "counter": np.int64(7), "flag": np.bool_(True),
    }
    path = tmp_path / "sd-v1-style.ckpt"
    torch.save(ckpt, path)
    for name in fake_modules:
        monkeypatch.delitem(sys.modules, name)
    # numpy 1.x, which wrote the real files, named the module numpy.core.multiarray
    _rewrite_zip_pickle(path, (b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with zipfile.ZipFile(path) as archive:
        assert b"numpy.core.multiarray" in archive.read("sd-v1-style/data.pkl")
    loaded = load_pickle(path)
    assert not any(name.startswith("pytorch_lightning") for name in sys.modules)
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in weights.items())
    (state, numbers), = loaded["callbacks"].items()
    assert numbers["best_model_score"] == 0.125 and numbers["current_score"] == 0.5
    assert loaded["counter"] == 7 and bool(loaded["flag"]) is True
    assert set(load_state_dict(path)[0]) == set(weights)  # the weights come out of the nesting


def test_pickle_tricks_inside_allowed_names_are_refused(tmp_path):
    storage = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nK\x02tQK\x00K\x08\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR."
    path = _torch_zip(tmp_path / "overrun.ckpt", storage, {"0": b"\x00" * 8})  # 8 floats from 2
    with pytest.raises(CheckpointError, match="past the end of its storage"):
        load_pickle(path)
    object_scalar = b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nVO8\n\x89\x88\x87RC\x08AAAAAAAA\x86R."
    (tmp_path / "object.ckpt").write_bytes(object_scalar)
    with pytest.raises(CheckpointError, match="not a plain number type"):
        load_pickle(tmp_path / "object.ckpt")
    no_magic = tmp_path / "plain.pkl"
    no_magic.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="no torch magic number"):
        load_pickle(no_magic)


# ---------------------------------------------------------------- not checkpoints, truncated files


def test_files_that_are_not_checkpoints(tmp_path):
    png = tmp_path / "model.ckpt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="this is a PNG image, not a model checkpoint"):
        read_checkpoint(png)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        read_checkpoint(empty)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"#!/bin/sh\necho this is not a model\n" * 4)
    with pytest.raises(CheckpointError, match="unrecognised file format"):
        read_checkpoint(noise)
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_truncated_files(tmp_path):
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, whole)
    zip_cut = tmp_path / "zip-cut.ckpt"
    zip_cut.write_bytes(whole.read_bytes()[: os.path.getsize(whole) // 2])
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, legacy, _use_new_zipfile_serialization=False)
    legacy_cut = tmp_path / "legacy-cut.pt"
    legacy_cut.write_bytes(legacy.read_bytes()[:-100])
    good = _safetensors({"w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]}}, bytes(16384))
    header_cut, data_cut = tmp_path / "header-cut.safetensors", tmp_path / "data-cut.safetensors"
    header_cut.write_bytes(good[:30])
    data_cut.write_bytes(good[:-10])
    for path, message in ((zip_cut, "broken zip archive"), (legacy_cut, "storage w|truncated|unreadable pickle"),
                          (header_cut, "exceeds the file size"), (data_cut, "out of range")):
        with pytest.raises(CheckpointError, match=message):
            load_state_dict(path)


def _declare_size(data: bytearray, member: bytes, size: int) -> None:
    """Overwrite a member's uncompressed size in its local header and its central directory entry."""
    for signature, size_at, name_len_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        at = data.find(signature)
        while at != -1:
            name_len = struct.unpack_from("<H", data, at + name_len_at)[0]
            if data[at + name_at:at + name_at + name_len] == member:
                struct.pack_into("<I", data, at + size_at, size)
            at = data.find(signature, at + 4)


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", bytes(16 << 20))  # 16 MB of zeros deflate to ~16 KB
    data = bytearray(path.read_bytes())
    _declare_size(data, b"archive/data/0", 0xF0000000)  # then claim 3.75 GB uncompressed in both headers
    path.write_bytes(bytes(data))
    process = psutil.Process()
    before = process.memory_info().rss
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_pickle(path)
    assert process.memory_info().rss - before < 64 << 20


# ---------------------------------------------------------------- safetensors headers


def _safetensors(header: dict, data: bytes, raw_header: bytes | None = None, length: int | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADER_DEFECTS = {
    "zero length": (_safetensors({}, b"", raw_header=b"{}", length=0), "header length is zero"),
    "absurd length": (_safetensors({}, b"", raw_header=b"{}", length=200 << 20), "is absurd"),
    "longer than file": (_safetensors({}, b"", raw_header=b"{}", length=5000), "exceeds the file size"),
    "not json": (_safetensors({}, b"", raw_header=b"{not json"), "not valid JSON"),
    "not an object": (_safetensors({}, b"", raw_header=b"[1, 2]"), "not an object"),
    "duplicate name": (_safetensors({}, bytes(8), raw_header=b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                                            b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'),
                       "duplicate name"),
    "bad metadata": (_safetensors({"__metadata__": {"x": 1}, "a": F32x2}, bytes(8)), "__metadata__ must map strings"),
    "unknown dtype": (_safetensors({"a": {**F32x2, "dtype": "F17"}}, bytes(8)), "unknown dtype 'F17'"),
    "negative dim": (_safetensors({"a": {**F32x2, "shape": [-2]}}, bytes(8)), "negative dimension"),
    "shape overflow": (_safetensors({"a": {**F32x2, "shape": [2**40, 2**40]}}, bytes(8)), "overflows"),
    "size mismatch": (_safetensors({"a": {**F32x2, "data_offsets": [0, 4]}}, bytes(4)), "hold 4 bytes but shape"),
    "reversed offsets": (_safetensors({"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8)), "end before they begin"),
    "out of range": (_safetensors({"a": {**F32x2, "data_offsets": [8, 16]}}, bytes(8)), "out of range"),
    "overlap": (_safetensors({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)), "overlaps"),
    "gap": (_safetensors({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, bytes(20)), "gap of 4 bytes"),
    "trailing bytes": (_safetensors({"a": F32x2}, bytes(12)), "4 trailing bytes"),
}


@pytest.mark.parametrize("defect", sorted(HEADER_DEFECTS))
def test_safetensors_header_defects_each_have_a_message(tmp_path, defect):
    content, message = HEADER_DEFECTS[defect]
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_safetensors(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_valid_handmade_safetensors_loads(tmp_path):
    data = struct.pack("<2f", 1.5, -2.0) + struct.pack("<2h", 7, -7)
    header = {"__metadata__": {"format": "pt"}, "a": F32x2, "b": {"dtype": "I16", "shape": [2], "data_offsets": [8, 12]}}
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_safetensors(header, data))
    tensors, metadata = load_safetensors(path)
    assert tensors["a"].tolist() == [1.5, -2.0] and tensors["b"].tolist() == [7, -7] and metadata == {"format": "pt"}


# ---------------------------------------------------------------- diffusers folders


def _fake_folder(root: Path, index: dict | None = None) -> Path:
    """Configs only: enough for the reader to reach the weights."""
    index = index or {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                      "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
                      "safety_checker": [None, None], "requires_safety_checker": False}
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    for name, file in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("scheduler", "scheduler_config.json")):
        (root / name).mkdir()
        (root / name / file).write_text("{}")
    return root


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "secret.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(_safetensors({"a": F32x2}, bytes(8)))
    folder = _fake_folder(tmp_path / "model")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symlink points outside the model folder"):
        read_checkpoint(folder)


def test_shard_names_cannot_leave_the_folder(tmp_path):
    folder = _fake_folder(tmp_path / "model")
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../elsewhere/secret.safetensors"}}))
    with pytest.raises(CheckpointError, match="is not a plain file name"):
        read_checkpoint(folder)


@pytest.mark.parametrize("component, value", [
    ("unet", ["os", "system"]),
    ("unet", ["diffusers", "UNet2DModel"]),
    ("feature_extractor", ["transformers", "AutoProcessor"]),
    ("scheduler", ["diffusers", "EvilScheduler"]),
])
def test_unknown_class_names_are_refused(tmp_path, component, value):
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}
    index[component] = value
    folder = _fake_folder(tmp_path / "model", index)
    with pytest.raises(CheckpointError, match=f"component '{component}' names an unknown class"):
        read_checkpoint(folder)


def test_unknown_pipeline_and_broken_json_are_refused(tmp_path):
    folder = _fake_folder(tmp_path / "model", {"_class_name": "__import__('os')"})
    with pytest.raises(CheckpointError, match="unsupported pipeline class"):
        read_checkpoint(folder)
    (folder / "model_index.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="JSON is not an object"):
        read_checkpoint(folder)
    (folder / "model_index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_checkpoint(folder)


def test_nothing_named_is_imported(tmp_path):
    before = set(sys.modules)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["sdgen_never_existing_module", "UNet2DConditionModel"]}
    with pytest.raises(CheckpointError):
        read_checkpoint(_fake_folder(tmp_path / "model", index))
    assert "sdgen_never_existing_module" not in set(sys.modules) - before
