"""Write the fuzz corpus: mutated safetensors, PyTorch zip / legacy pickles and PNG files, from a fixed seed.

    .venv/bin/python tests/fuzz/make_corpus.py        # rewrites tests/fuzz/corpus/ (committed)

Each kind starts from a few small valid files made here (a model-like safetensors with metadata,
a LoRA and an embedding; `torch.save` zip and legacy files; PNGs with text chunks) and applies
structure-aware and blind mutations: bit flips, byte runs, truncation, duplicated or removed
ranges, header lengths and JSON values replaced by extremes, zip sizes and offsets rewritten,
PNG chunk lengths, CRCs and dimensions changed. The same seed gives the same bytes, so the
corpus changes only when this script does.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

SEED = 20240601
PER_KIND = 110
CORPUS = Path(__file__).resolve().parent / "corpus"
EXTREMES = [0, -1, 1, 2**31, 2**32 - 1, 2**53, 2**63 - 1, 2**64, 10**30, -(2**63), 255, 65536]


# ---------------------------------------------------------------- valid seeds


def _safetensors(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    data, offset = b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _floats(count: int, rng: random.Random) -> bytes:
    return struct.pack(f"<{count}f", *(rng.uniform(-1, 1) for _ in range(count)))


def safetensors_seeds(rng: random.Random) -> list[bytes]:
    model = _safetensors({
        "model.diffusion_model.input_blocks.0.0.weight": ("F32", [4, 4, 1, 1], _floats(16, rng)),
        "model.diffusion_model.time_embed.0.bias": ("F16", [4], bytes(8)),
        "first_stage_model.decoder.conv_in.weight": ("F32", [2, 2], _floats(4, rng)),
    }, {"modelspec.prediction_type": "epsilon", "format": "pt"})
    lora = _safetensors({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": ("F32", [2, 4], _floats(8, rng)),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": ("F32", [4, 2], _floats(8, rng)),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ("F32", [], _floats(1, rng)),
    }, {"ss_network_dim": "2"})
    embedding = _safetensors({"emb_params": ("F32", [2, 8], _floats(16, rng))})
    return [model, lora, embedding]


def _torch_bytes(obj: object, zip_format: bool) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def pickle_seeds(rng: random.Random) -> list[bytes]:
    import torch

    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    weights = {"model.diffusion_model.out.2.bias": torch.randn(4, generator=generator),
               "first_stage_model.encoder.conv_in.weight": torch.randn(2, 3, generator=generator).half()}
    checkpoint = {"state_dict": weights, "global_step": 470000, "epoch": 6}
    embedding = {"string_to_param": {"*": torch.randn(2, 8, generator=generator)}, "name": "style", "step": 100}
    lora = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8, generator=generator),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2, generator=generator)}
    return [_torch_bytes(checkpoint, True), _torch_bytes(embedding, True), _torch_bytes(lora, True),
            _torch_bytes(checkpoint, False), _torch_bytes(embedding, False)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_seeds(rng: random.Random) -> list[bytes]:
    from PIL import Image, PngImagePlugin

    seeds = []
    for width, height, mode in ((16, 16, "RGB"), (8, 24, "RGBA"), (12, 12, "L"), (16, 8, "P")):
        image = Image.frombytes(mode if mode != "P" else "L", (width, height),
                                bytes(rng.randrange(256) for _ in range(width * height * len(mode if mode != "P" else "L"))))
        if mode == "P":
            image = image.convert("P")
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", "a lake\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 16x16")
        info.add_text("comment", "x" * 200, zip=True)
        info.add_itxt("Description", "ünïcode", lang="en", tkey="D", zip=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        seeds.append(buffer.getvalue())
    return seeds


# ---------------------------------------------------------------- mutations


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(out))
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out)


def random_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    at = rng.randrange(len(out))
    out[at:at + rng.randint(1, 16)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))]


def duplicate_range(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 256))
    return data[:end] + data[start:end] + data[end:]


def delete_range(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 64):]


def interesting_integer(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    at = rng.randrange(max(1, len(out) - 8))
    fmt = rng.choice(["<I", ">I", "<Q", "<H", "<i"])
    value = rng.choice(EXTREMES)
    try:
        struct.pack_into(fmt, out, at, value)
    except struct.error:
        struct.pack_into(fmt, out, at, 0)
    return bytes(out)


BLIND = [flip_bits, random_bytes, truncate, duplicate_range, delete_range, interesting_integer]


def mutate_safetensors_header(data: bytes, rng: random.Random) -> bytes:
    """Rewrite one field of the JSON header (length, dtype, shape, offsets, metadata) to something hostile."""
    (length,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + length]), data[8 + length:]
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    choice = rng.randrange(9)
    if choice == 0:
        header[name]["dtype"] = rng.choice(["F17", "", None, 5, "BF16", "F8_E4M3", "U64"])
    elif choice == 1:
        header[name]["shape"] = rng.choice([[rng.choice(EXTREMES)], [-1], "big", [2**40, 2**40], [], [0], [1.5]])
    elif choice == 2:
        header[name]["data_offsets"] = [rng.choice(EXTREMES), rng.choice(EXTREMES)]
    elif choice == 3:
        header["__metadata__"] = rng.choice([{"a": 1}, [], "x", {"k": "v" * 1000}])
    elif choice == 4:
        header[name] = rng.choice([None, [], "x", {}])
    elif choice == 5:
        header[name + "_twin"] = dict(header[name])
    elif choice == 6:
        return struct.pack("<Q", rng.choice(EXTREMES) % 2**64) + data[8:]
    elif choice == 7:
        header = rng.choice([[], "text", None, 1])
    else:
        header[name]["data_offsets"] = list(reversed(header[name]["data_offsets"]))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_zip(data: bytes, rng: random.Random) -> bytes:
    """Rewrite sizes, offsets, methods or names in zip headers, or a member's content."""
    if not data.startswith(b"PK"):
        return flip_bits(data, rng)
    out = bytearray(data)
    choice = rng.randrange(5)
    if choice < 3:
        signature, fields = rng.choice([(b"PK\x03\x04", [8, 14, 18, 22, 26]), (b"PK\x01\x02", [10, 20, 24, 28, 42]),
                                        (b"PK\x05\x06", [8, 10, 12, 16])])
        positions = [i for i in range(len(out)) if out.startswith(signature, i)]
        if positions:
            at = rng.choice(positions) + rng.choice(fields)
            fmt = "<H" if rng.random() < 0.3 else "<I"
            struct.pack_into(fmt, out, min(at, len(out) - 4), rng.choice(EXTREMES) % (2**16 if fmt == "<H" else 2**32))
        return bytes(out)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    target = rng.choice(sorted(members))
    if choice == 3 and target.endswith("data.pkl"):
        members[target] = flip_bits(members[target], rng)
    else:
        members[target] = rng.choice([b"", members[target][: len(members[target]) // 2], members[target] * 2])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def mutate_png(data: bytes, rng: random.Random) -> bytes:
    """Walk the chunks and damage one: its length, type, CRC, IHDR fields, or duplicate / drop it."""
    chunks, at = [], 8
    while at + 8 <= len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        chunks.append(data[at:at + 12 + length])
        at += 12 + length
    index = rng.randrange(len(chunks))
    chunk = bytearray(chunks[index])
    choice = rng.randrange(6)
    if choice == 0:
        struct.pack_into(">I", chunk, 0, rng.choice(EXTREMES) % 2**32)
    elif choice == 1:
        struct.pack_into(">I", chunk, len(chunk) - 4, rng.randrange(2**32))
    elif choice == 2:  # IHDR: width, height, depth, colour type
        ihdr = bytearray(chunks[0])
        field = rng.choice([(8, ">I"), (12, ">I"), (16, ">B"), (17, ">B"), (20, ">B")])
        struct.pack_into(field[1], ihdr, field[0], rng.choice(EXTREMES) % (2**32 if field[1] == ">I" else 256))
        body = bytes(ihdr[4:-4])
        chunks[0] = bytes(ihdr[:-4]) + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        return data[:8] + b"".join(chunks)
    elif choice == 3:
        chunks.insert(index, bytes(chunk))
        return data[:8] + b"".join(chunks)
    elif choice == 4:
        del chunks[index]
        return data[:8] + b"".join(chunks)
    else:
        chunk[4:8] = rng.choice([b"zTXt", b"iTXt", b"IDAT", b"tEXt", b"IHDR", b"\x00\x00\x00\x00"])
    chunks[index] = bytes(chunk)
    return data[:8] + b"".join(chunks)


KINDS = {
    "safetensors": (safetensors_seeds, [mutate_safetensors_header] * 4 + BLIND, ".safetensors"),
    "ckpt": (pickle_seeds, [mutate_zip] * 4 + BLIND, ".ckpt"),
    "png": (png_seeds, [mutate_png] * 4 + BLIND, ".png"),
}


def _apply(mutation, data: bytes, rng: random.Random) -> bytes:
    """A structure-aware mutation of input an earlier mutation already broke falls back to bit flips."""
    try:
        return mutation(data, rng)
    except (ValueError, KeyError, IndexError, TypeError, struct.error, zipfile.BadZipFile, EOFError):
        return flip_bits(data, rng)


def main() -> None:
    rng = random.Random(SEED)
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    total = 0
    for kind, (make_seeds, mutations, suffix) in KINDS.items():
        folder = CORPUS / kind
        folder.mkdir(parents=True)
        seeds = make_seeds(rng)
        for number, seed in enumerate(seeds):
            (folder / f"seed-{number}{suffix}").write_bytes(seed)
        for number in range(PER_KIND - len(seeds)):
            data = rng.choice(seeds)
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                data = _apply(rng.choice(mutations), data, rng) if data else data
            (folder / f"mutant-{number:03d}{suffix}").write_bytes(data)
        total += sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote {3 * PER_KIND} files, {total / 1024:.0f} KiB, to {CORPUS}", file=sys.stderr)


if __name__ == "__main__":
    main()
