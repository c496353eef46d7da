"""Hostile and broken files through every loader and entry point (RELIABILITY.md "Hostile and broken files").

`test_hostile_files.py` covers the checkpoint readers in depth; this file takes the same hostile
payloads through the other loaders (VAE, LoRA, textual-inversion embedding, CLIP text-encoder and
tokenizer folders, safety checker) and the front ends (`sdgen generate`, `sdgen info`,
`sdgen.load`), and covers images with hand-made PNG chunks: huge declared sizes, compressed text
bombs before and after the pixel data, truncated and empty files, PDF and EPS files posing as
images. Every refusal is a UserError whose message is one line, before anything is decoded,
with memory flat.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import psutil
import pytest
from PIL import Image

import sdgen
from sdgen.checkpoints import CheckpointError, read_checkpoint, read_vae
from sdgen.cli import main
from sdgen.errors import UserError
from sdgen.lora import LoraError, find_lora, read_lora
from sdgen.models.tiny_decoder import load_tiny_decoder
from sdgen.pipelines.image_files import read_infotext
from sdgen.pipelines.images import open_image, read_image, read_image_parameters
from sdgen.prompting.embeddings import EmbeddingError, EmbeddingLibrary, read_embedding
from sdgen.safety.checker import load_safety_checker
from test_hostile_files import _declare_size, _evil_payloads, _torch_zip

MB = 1 << 20
FORBIDDEN = ["posix.system", "builtins.eval", "builtins.exec", "builtins.getattr", "importlib.import_module",
             "subprocess.Popen"]


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- code-running pickles, every loader


def _evil_files(tmp_path: Path, forbidden: str) -> tuple[Path, list[Path]]:
    sentinel = tmp_path / "pwned"
    payload = _evil_payloads(sentinel)[forbidden]
    raw, renamed = tmp_path / "evil.pt", tmp_path / "evil.safetensors"
    raw.write_bytes(payload)
    renamed.write_bytes(payload)
    return sentinel, [raw, renamed, _torch_zip(tmp_path / "evil-zip.ckpt", payload)]


@pytest.mark.parametrize("forbidden", FORBIDDEN)
def test_lora_vae_and_embedding_loaders_refuse_code_running_pickles(tmp_path, forbidden):
    sentinel, paths = _evil_files(tmp_path, forbidden)
    for path in paths:
        for loader, error in ((read_lora, LoraError), (read_embedding, EmbeddingError), (read_vae, CheckpointError),
                              (load_tiny_decoder, CheckpointError)):
            with pytest.raises(error, match=f"the global '{forbidden}'") as caught:
                loader(path)
            _one_line(caught.value)
    library = EmbeddingLibrary.load_folder(tmp_path)  # a folder of them: each reported, none loaded
    assert len(library) == 0 and len(library.errors) == 2  # .pt and .safetensors; .ckpt is no embedding name
    assert all(forbidden in message for message in library.errors.values())
    assert not sentinel.exists()


def test_clip_and_safety_checker_folders_refuse_code_running_pickles(tmp_path):
    from reference_pipelines import make_reference_pipeline, save_folder

    sentinel = tmp_path / "pwned"
    payload = _evil_payloads(sentinel)["posix.system"]
    folder = save_folder(make_reference_pipeline("sd1", tmp_path), tmp_path / "model")
    text_encoder = folder / "text_encoder"
    for weights in text_encoder.glob("*.safetensors"):
        weights.unlink()
    (text_encoder / "pytorch_model.bin").write_bytes(payload)  # the transformers .bin name, a hostile pickle
    with pytest.raises(CheckpointError, match="posix.system"):
        read_checkpoint(folder)
    with pytest.raises(CheckpointError, match="posix.system"):
        sdgen.load(folder)
    checker = tmp_path / "checker"
    (checker / "safety_checker").mkdir(parents=True)
    (checker / "safety_checker" / "config.json").write_text(json.dumps({"model_type": "clip", "projection_dim": 8}))
    (checker / "safety_checker" / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(CheckpointError, match="posix.system"):
        load_safety_checker(checker)
    assert not sentinel.exists()


def test_broken_tokenizer_folder_is_a_one_line_error(tmp_path):
    from reference_pipelines import make_reference_pipeline, save_folder

    folder = save_folder(make_reference_pipeline("sd1", tmp_path), tmp_path / "model")
    tokenizer = folder / "tokenizer"
    damage = [("vocab.json", "[1, 2"), ("vocab.json", "[1, 2]"), ("merges.txt", "#version: 0.2\na b c\n"),
              ("tokenizer.json", "[1, 2"), ("tokenizer.json", '{"model": {"type": "WordPiece"}}'),
              ("tokenizer_config.json", "[]")]
    for name, content in damage:
        if not (tokenizer / name).exists():
            continue  # transformers writes tokenizer.json, older versions vocab.json + merges.txt
        original = (tokenizer / name).read_text()
        (tokenizer / name).write_text(content)
        with pytest.raises(UserError) as caught:
            sdgen.load(folder)
        assert str(tokenizer) in _one_line(caught.value)
        (tokenizer / name).write_text(original)


def test_cli_refuses_hostile_model_and_vae_files(tmp_path, capsys):
    from reference_pipelines import make_reference_pipeline, save_folder

    sentinel, paths = _evil_files(tmp_path, "builtins.exec")
    folder = save_folder(make_reference_pipeline("sd1", tmp_path), tmp_path / "model")
    out = tmp_path / "out"
    capsys.readouterr()  # the reference's save progress bar
    for options in (["--model"], ["--model", str(folder), "--vae"]):
        for path in paths:
            assert main(["generate", "x", *options, str(path), "--width", "64", "--height", "64", "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "refused to load" in err and "builtins.exec" in err
    png_as_ckpt = tmp_path / "model.ckpt"
    png_as_ckpt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert main(["generate", "x", "--model", str(png_as_ckpt), "--out", str(out)]) == 2
    assert "this is a PNG image, not a model checkpoint" in capsys.readouterr().err
    assert not sentinel.exists() and not out.exists()


def test_cli_in_a_subprocess_never_runs_the_payload(tmp_path):
    sentinel, paths = _evil_files(tmp_path, "posix.system")
    command = [sys.executable, "-m", "sdgen.cli", "generate", "x", "--model", str(paths[2]), "--out", str(tmp_path / "o")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "posix.system" in done.stderr
    assert not sentinel.exists()


def test_zip_bomb_lora_and_embedding_are_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", bytes(16 << 20))
    data = bytearray(path.read_bytes())
    _declare_size(data, b"archive/data/0", 0xF0000000)
    path.write_bytes(bytes(data))
    before = psutil.Process().memory_info().rss
    for loader, error in ((read_lora, LoraError), (read_embedding, EmbeddingError)):
        with pytest.raises(error, match="zip bomb"):
            loader(path)
    assert psutil.Process().memory_info().rss - before < 64 * MB


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "..", "a/b", "a\\b", "%2e%2e%2fx", "x\x00y"])
def test_lora_names_never_leave_their_folder(tmp_path, name):
    loras = tmp_path / "loras"
    loras.mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"outside")
    with pytest.raises(LoraError) as caught:
        find_lora(loras, name)
    _one_line(caught.value)


def test_lora_symlink_out_of_its_folder_is_refused(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    (loras / "innocent.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(LoraError, match="leads outside"):
        find_lora(loras, "innocent")


# ---------------------------------------------------------------- images made chunk by chunk


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, before: list[bytes] = (), after: list[bytes] = (), pixels: bytes | None = None) -> bytes:
    """A valid 8-bit RGB PNG (unless told otherwise) with extra chunks before and after IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    if pixels is None:
        pixels = zlib.compress(b"".join(b"\x00" + bytes(3 * width) for _ in range(height)))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + b"".join(before) + _chunk(b"IDAT", pixels)
            + b"".join(after) + _chunk(b"IEND", b""))


def _bomb(size: int) -> bytes:
    """`size` bytes of 'a' deflated (about 1/1000 of that), made without holding them in memory."""
    compressor, block = zlib.compressobj(9), b"a" * MB
    return b"".join(compressor.compress(block) for _ in range(size // MB)) + compressor.flush()


def _ztxt(keyword: bytes, size: int) -> bytes:
    return _chunk(b"zTXt", keyword + b"\x00\x00" + _bomb(size))


def _itxt(keyword: bytes, size: int) -> bytes:
    return _chunk(b"iTXt", keyword + b"\x00\x01\x00en\x00" + keyword + b"\x00" + _bomb(size))


def _image_entry_points(path: Path) -> list:
    return [lambda: open_image(path), lambda: read_image(path), lambda: read_image_parameters(path),
            lambda: read_infotext(path)]


HOSTILE_IMAGES = {
    "100000x100000 declared": (lambda: _png(100000, 100000, pixels=zlib.compress(bytes(1000))), "too large|over the limit"),
    "zTXt bomb before the pixels": (lambda: _png(8, 8, before=[_ztxt(b"parameters", 200 * MB)]), "not a readable|too large|damaged"),
    "iTXt bomb before the pixels": (lambda: _png(8, 8, before=[_itxt(b"parameters", 200 * MB)]), "not a readable|too large|damaged"),
    "zero bytes": (lambda: b"", "not a readable"),
    "PDF posing as PNG": (lambda: b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n", "not a readable"),
    "EPS posing as PNG": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto showpage\n",
                          "not a readable"),
    "EPS with a binary header": (lambda: b"\xc5\xd0\xd3\xc6" + struct.pack("<6I", 30, 40, 0, 0, 0, 0xFFFF)
                                 + b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a readable"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_IMAGES))
def test_hostile_images_are_refused_before_decoding(tmp_path, monkeypatch, case):
    make, message = HOSTILE_IMAGES[case]
    path = tmp_path / "upload.png"
    path.write_bytes(make())

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("an external program was started")

    monkeypatch.setattr(subprocess, "Popen", no_ghostscript)
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    process = psutil.Process()
    before = process.memory_info().rss
    for call in _image_entry_points(path):
        with pytest.raises(UserError, match=message) as caught:
            call()
        assert str(path) in _one_line(caught.value)
    assert process.memory_info().rss - before < 64 * MB


def test_bombs_and_damage_after_the_pixels_are_caught_when_decoding(tmp_path):
    """Text after IDAT and truncated pixel data are only seen when decoding: read_image reports them."""
    whole = _png(64, 64, pixels=zlib.compress(bytes(range(256)) * 49))
    cases = {
        "ztxt-after.png": _png(8, 8, after=[_ztxt(b"parameters", 200 * MB)]),
        "truncated.png": whole[: len(whole) // 2],
        "no-iend.png": whole[:-12],
    }
    before = psutil.Process().memory_info().rss
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UserError, match="damaged or truncated|not a readable") as caught:
            read_image(path)
        assert str(path) in _one_line(caught.value)
    assert psutil.Process().memory_info().rss - before < 64 * MB


def test_small_text_chunks_still_read(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(_png(8, 8, before=[_chunk(b"tEXt", b"parameters\x00a cat\nSteps: 2, Seed: 1, Size: 8x8")]))
    assert read_image_parameters(path).startswith("a cat")
    assert read_image(path).size == (8, 8)


@pytest.mark.parametrize("case", ["zero bytes", "PDF posing as PNG", "100000x100000 declared"])
def test_sdgen_info_answers_hostile_images_in_one_line(tmp_path, capsys, case):
    path = tmp_path / "upload.png"
    path.write_bytes(HOSTILE_IMAGES[case][0]())
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdgen: error:") and err.count("\n") == 1


def test_sdgen_info_on_a_truncated_png(tmp_path, capsys):
    whole = _png(64, 64, pixels=zlib.compress(bytes(range(256)) * 49))
    path = tmp_path / "cut.png"
    path.write_bytes(whole[: len(whole) // 2])
    assert main(["info", str(path)]) == 2
    assert "damaged or truncated" in capsys.readouterr().err


def test_img2img_api_refuses_a_non_image(tmp_path):
    from sdgen.pipelines.request import Img2ImgRequest, RequestError

    with pytest.raises(RequestError, match="init_image must be an image"):
        Img2ImgRequest(prompt="x", init_image=b"%PDF-1.4").validate()
    image = Image.new("RGB", (64, 64))
    with pytest.raises(RequestError, match="mask is 8x8 but the image is 64x64"):
        Img2ImgRequest(prompt="x", init_image=image, mask=Image.new("L", (8, 8))).validate()
    with pytest.raises(RequestError, match="init_image is 100000x8"):
        Img2ImgRequest(prompt="x", init_image=_FakeHuge()).validate()


class _FakeHuge(Image.Image):
    """An image object declaring 100000x8 without pixels, as a decoded upload could."""

    def __init__(self) -> None:
        super().__init__()
        self._size = (100000, 8)


def test_no_loader_falls_back_to_an_unrestricted_unpickler(tmp_path, monkeypatch):
    import pickle

    import torch

    def forbidden(*args, **kwargs):
        raise AssertionError("an unrestricted loader was called")

    sentinel, paths = _evil_files(tmp_path, "builtins.eval")
    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, forbidden)
    for path in paths:
        for loader in (read_lora, read_embedding, read_vae, load_tiny_decoder, sdgen.load):
            with pytest.raises(UserError, match="builtins.eval"):
                loader(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("name, opcodes", [
    ("memo index of 1.2 billion", b"\x80\x02}r\xff\xff\xff\x7f."),  # LONG_BINPUT 2**31-1: a C unpickler sizes its memo by it
    ("8 GB string declared", b"\x80\x04\x8e" + struct.pack("<Q", 8 << 30) + b"abc"),  # BINBYTES8
    ("2 GB long declared", b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1) + b"\x01"),  # LONG4
])
def test_pickle_opcodes_declaring_huge_sizes_allocate_nothing(tmp_path, name, opcodes):
    import resource

    path = tmp_path / "tiny.pt"
    path.write_bytes(opcodes)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + (1 << 30), hard))
    try:  # with 1 GB of address space to spare, any attempt to allocate the declared size fails
        for loader in (read_lora, read_embedding, read_vae, load_tiny_decoder, read_checkpoint):
            with pytest.raises(UserError) as caught:
                loader(path)
            assert "MemoryError" not in str(caught.value)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
