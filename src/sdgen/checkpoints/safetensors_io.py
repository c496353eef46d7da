"""safetensors files: the header checked by our own code, then every tensor a view of one mmap of the file.

Format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
data buffer, every tensor's bytes at `8 + N + begin`. The Rust reader checks most of this too;
we check it first so each defect gets its own one-line message and nothing is mapped before.

Tensors are views of `torch.UntypedStorage.from_file` (a private, copy-on-write mmap) rather than
`safe_open(...).get_tensor`: the latter reads the first bytes of every tensor, and on kernels whose
page cache uses large folios each such read maps up to 2 MB, so merely opening SD 1.5 (1,100
tensors) added ~530 MB of resident memory; views touch nothing until the weights are used.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from sdgen.checkpoints.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "U32": torch.uint32, "I32": torch.int32, "F32": torch.float32,
    "U64": torch.uint64, "I64": torch.int64, "F64": torch.float64,
}
_FIX = "the file is damaged or not a safetensors file: download or export it again"


@dataclass(frozen=True)
class TensorEntry:
    """One header entry: dtype name, shape, and byte range inside the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: entries by name, `__metadata__`, and where the data buffer starts."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate name {key!r}")
        seen[key] = value
    return seen


def _parse_entry(path: Path, name: str, raw: object) -> TensorEntry:
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"safetensors header entry {name!r} is not an object", _FIX)
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(path, f"tensor {name!r} has unknown dtype {dtype!r}", _FIX)
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise CheckpointError(path, f"tensor {name!r} has a shape that is not a list of integers: {shape!r}", _FIX)
    if any(d < 0 for d in shape):
        raise CheckpointError(path, f"tensor {name!r} has a negative dimension in shape {shape}", _FIX)
    numel = math.prod(shape)
    if numel * DTYPE_SIZES[dtype] >= 2**63:
        raise CheckpointError(path, f"tensor {name!r} shape {shape} overflows (more than 2**63 bytes)", _FIX)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise CheckpointError(path, f"tensor {name!r} has invalid data_offsets {offsets!r}", _FIX)
    begin, end = offsets
    if end < begin:
        raise CheckpointError(path, f"tensor {name!r} has data_offsets that end before they begin: {offsets}", _FIX)
    if end - begin != numel * DTYPE_SIZES[dtype]:
        raise CheckpointError(
            path,
            f"tensor {name!r} data_offsets hold {end - begin} bytes but shape {shape} of {dtype} needs "
            f"{numel * DTYPE_SIZES[dtype]}",
            _FIX,
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate a safetensors header; every defect raises CheckpointError naming it."""
    path = Path(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            problem = f"truncated safetensors file: {file_size} bytes, shorter than the header length"
            raise CheckpointError(path, problem, _FIX)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len == 0:
            raise CheckpointError(path, "safetensors header length is zero", _FIX)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(path, f"safetensors header length {header_len} is absurd (over 100 MB)", _FIX)
        if 8 + header_len > file_size:
            raise CheckpointError(
                path, f"safetensors header length {header_len} exceeds the file size {file_size} (truncated?)", _FIX
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"safetensors header is not valid JSON ({exc})", _FIX) from None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"safetensors header is JSON but not an object ({type(header).__name__})", _FIX)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "safetensors __metadata__ must map strings to strings", _FIX)

    entries = {name: _parse_entry(path, name, value) for name, value in header.items()}
    data_size = file_size - 8 - header_len
    # The tensors must tile the data buffer exactly: no overlap, no gap, nothing after the last.
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.end > data_size:
            raise CheckpointError(
                path,
                f"tensor {name!r} data_offsets [{entry.begin}, {entry.end}] are out of range: the data buffer "
                f"has {data_size} bytes (truncated file?)",
                _FIX,
            )
        if entry.begin < position:
            raise CheckpointError(path, f"tensor {name!r} overlaps the tensor before it (offset {entry.begin})", _FIX)
        if entry.begin > position:
            raise CheckpointError(path, f"gap of {entry.begin - position} bytes before tensor {name!r}", _FIX)
        position = entry.end
    if position != data_size:
        raise CheckpointError(path, f"{data_size - position} trailing bytes after the last tensor", _FIX)
    return SafetensorsHeader(entries, dict(metadata), 8 + header_len)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validated header, then every tensor as a view of one copy-on-write mmap of the file, and the metadata."""
    header = read_header(path)
    size = header.data_start + max((entry.end for entry in header.entries.values()), default=0)
    mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if size else torch.UntypedStorage(0)
    file_bytes = torch.empty(0, dtype=torch.uint8).set_(mapped)
    tensors = {}
    for name, entry in header.entries.items():
        start = header.data_start + entry.begin
        raw = file_bytes[start:header.data_start + entry.end]
        dtype = TORCH_DTYPES[entry.dtype]
        if start % dtype.itemsize:
            raw = raw.clone()  # another writer's unaligned layout: this one tensor is copied
        tensors[name] = raw.view(dtype).view(entry.shape)
    return tensors, header.metadata
