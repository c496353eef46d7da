"""PyTorch pickle checkpoints (.ckpt/.pt/.bin) read by a restricted unpickler that runs nothing from the file.

A pickle is a small program: GLOBAL names a callable, REDUCE calls it. Our `find_class` answers
only from an allow-list of inert stand-ins (tensor rebuild, storage types, OrderedDict, numpy
scalars, Lightning's ModelCheckpoint as a placeholder), so a name outside the list is refused
before anything is called; there is no fallback to `torch.load` or `pickle.load`. Both layouts
torch writes are read: the zip archive (`<name>/data.pkl` + `<name>/data/<key>` members, torch
>= 1.6, mmapped when stored uncompressed) and the legacy stream (magic number, protocol, system
info, the object pickle, storage keys, then raw storage bytes).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from sdgen.checkpoints.errors import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001
MAX_PICKLE_BYTES = 1 << 30  # data.pkl of a full SD checkpoint is ~100 KB
_REFUSED_FIX = "this file could run code when loaded; get a .safetensors version of the model instead"
_DAMAGED_FIX = "the file is damaged or not a PyTorch checkpoint: download it again"

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class _StorageType:
    """What GLOBAL `torch.FloatStorage` resolves to: only its dtype matters."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage:
    """A storage the pickle refers to: a flat tensor of its dtype (a view of the mmapped file)."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


class _Placeholder:
    """Stands in for a training-framework class (Lightning's ModelCheckpoint): holds nothing, runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


class _NumpyDType:
    """numpy.dtype as pickled (`dtype('f8', False, True)` then BUILD); becomes a real dtype only in `scalar`."""

    def __init__(self, spec: object, align: object = False, copy: object = True) -> None:
        if not isinstance(spec, str) or not re.fullmatch(r"[biuf]\d{1,2}", spec):
            raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a plain number type")
        self.spec, self.byteorder = spec, "<"

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def _numpy_scalar(dtype: object, data: object = None) -> object:
    """numpy.core.multiarray.scalar(dtype, bytes): one number, rebuilt by us from its bytes."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar with an unexpected dtype or payload")
    real = np.dtype(dtype.byteorder.replace("|", "=") + dtype.spec)
    if len(data) != real.itemsize:
        raise pickle.UnpicklingError("numpy scalar payload does not match its dtype")
    return np.frombuffer(data, dtype=real, count=1)[0]


def _codecs_encode(text: object, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell bytes as `_codecs.encode(str, 'latin1')`; nothing else is accepted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


def _rebuild_tensor(storage: object, storage_offset: object, size: object, stride: object, *_: object) -> torch.Tensor:
    """torch._utils._rebuild_tensor(_v2): a strided view of a storage, bounds-checked here."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    dims = (size, stride)
    if (not all(isinstance(d, tuple) and all(type(n) is int and n >= 0 for n in d) for d in dims)
            or len(size) != len(stride) or type(storage_offset) is not int or storage_offset < 0):
        raise pickle.UnpicklingError("tensor with an invalid size, stride or offset")
    flat = storage.flat
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.numel():
            raise pickle.UnpicklingError("tensor reaches past the end of its storage")
    return flat.as_strided(size, stride, flat.storage_offset() + storage_offset)


def _rebuild_parameter(data: object, requires_grad: object = False, hooks: object = None, *_: object) -> torch.Tensor:
    """torch._utils._rebuild_parameter: a Parameter is kept as its plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): torch.Size,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Placeholder,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "scalar")] = _numpy_scalar
    allowed[("numpy", "dtype")] = _NumpyDType
    for name, dtype in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda", "torch.storage"):
            allowed[(module, name)] = _StorageType(dtype)
    for name in _TORCH_DTYPES:
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle._Unpickler):
    """find_class answers from the allow-list only; persistent ids are handed to `storage_for`.

    The pure-Python unpickler, not the C one: the C unpickler sizes its memo array by the largest
    index a PUT opcode names, so a few hundred bytes declaring `LONG_BINPUT 1258647924` made it
    allocate 10 GB (found by the atheris ckpt target). Here the memo is a dict. A checkpoint's
    pickle holds names and shapes only, so the slower unpickler costs milliseconds.
    """

    def __init__(self, file: BinaryIO, path: Path, storage_for: Callable[[tuple], _Storage] | None) -> None:
        super().__init__(file)
        self.path = path
        self.storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol < 3 pickles) as pickle's own find_class translates them, e.g.
        # `__builtin__.set` -> `builtins.set`, `commands.Popen` -> `subprocess.Popen`.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        problem = f"refused to load: the pickle asks for the global '{module}.{name}'"
        raise CheckpointError(self.path, problem, _REFUSED_FIX)

    def persistent_load(self, pid: Any) -> Any:
        if self.storage_for is None or not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        return self.storage_for(pid[1:])


class _BoundedReader:
    """A file whose reads never ask for more than is left in it.

    The C unpickler calls `read(n)` with the length an opcode declares (BINBYTES8, BINUNICODE8,
    LONG4...), and a buffered file allocates n bytes before reading: a 600-byte pickle declaring
    a 4 GB string would take 4 GB. Clamped, the read comes back short and unpickling fails.
    """

    def __init__(self, file: BinaryIO, size: int) -> None:
        self.file, self.size = file, size

    def _left(self, wanted: int) -> int:
        return max(0, min(wanted, self.size - self.file.tell()))

    def read(self, n: int = -1) -> bytes:
        return self.file.read(self._left(self.size if n is None or n < 0 else n))

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        return self.file.readinto(view[:self._left(len(view))])

    def readline(self, limit: int = -1) -> bytes:
        return self.file.readline(self._left(self.size if limit is None or limit < 0 else limit))


def _unpickle(file: BinaryIO, path: Path, storage_for: Callable[[tuple], _Storage] | None = None) -> Any:
    if isinstance(file, io.BufferedReader):  # zip members bound their own reads
        file = _BoundedReader(file, os.fstat(file.fileno()).st_size)
    return _RestrictedUnpickler(file, path, storage_for).load()


def _as_dtype(flat_bytes: torch.Tensor, dtype: torch.dtype, byte_offset: int) -> torch.Tensor:
    """View bytes as `dtype`; bytes that are not aligned for it are copied (torch aligns to 64)."""
    if byte_offset % dtype.itemsize:
        flat_bytes = flat_bytes.clone()
    return flat_bytes.view(dtype)


def _storage_key(args: tuple) -> tuple[str, torch.dtype, int]:
    if len(args) < 4 or not isinstance(args[0], _StorageType):
        raise pickle.UnpicklingError("storage reference without a known storage type")
    key, numel = args[1], args[3]
    key = key.decode("ascii") if isinstance(key, bytes) else key
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.]{1,64}", key) or type(numel) is not int or numel < 0:
        raise pickle.UnpicklingError("storage reference with an invalid key or size")
    return key, args[0].dtype, numel


def _check_zip_sizes(path: Path, archive: zipfile.ZipFile, file_size: int) -> None:
    """Zip bombs: declared sizes are checked against the file before anything is inflated."""
    declared = 0
    for info in archive.infolist():
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise CheckpointError(path, f"zip member {info.filename!r} declares inconsistent sizes", _DAMAGED_FIX)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(path, f"zip member {info.filename!r} uses an unsupported compression", _DAMAGED_FIX)
        declared += info.file_size
    # torch stores members uncompressed; weights barely compress, so twice the file is generous.
    if declared > 2 * file_size + (1 << 20):
        raise CheckpointError(
            path,
            f"zip members declare {declared} bytes uncompressed in a {file_size}-byte file (a zip bomb?)",
            "refusing to inflate it",
        )


def _stored_member_offset(path: Path, raw: BinaryIO, info: zipfile.ZipInfo, file_size: int) -> int:
    """Byte offset of an uncompressed member's data, from its local file header."""
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(path, f"zip member {info.filename!r} has a broken local header", _DAMAGED_FIX)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > file_size:
        problem = f"zip member {info.filename!r} runs past the end of the file (truncated?)"
        raise CheckpointError(path, problem, _DAMAGED_FIX)
    return start


def _load_zip(path: Path) -> Any:
    file_size = os.path.getsize(path)
    with open(path, "rb") as raw:
        try:
            archive = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(path, f"broken zip archive ({exc}), truncated?", _DAMAGED_FIX) from None
        with archive:
            _check_zip_sizes(path, archive, file_size)
            pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
            if len(pickles) != 1:
                problem = "zip archive without exactly one <name>/data.pkl: not a PyTorch checkpoint"
                raise CheckpointError(path, problem, _DAMAGED_FIX)
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = prefix + "byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() not in (b"little",):
                raise CheckpointError(path, "big-endian checkpoint", "re-save it on a little-endian machine")
            info = archive.getinfo(pickles[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(path, f"data.pkl declares {info.file_size} bytes", "refusing to read it")
            program = archive.read(info)

            file_bytes: list[torch.Tensor] = []  # the whole file mmapped once, copy-on-write
            storages: dict[str, _Storage] = {}

            def storage_for(args: tuple) -> _Storage:
                key, dtype, numel = _storage_key(args)
                if key in storages:
                    return storages[key]
                try:
                    member = archive.getinfo(f"{prefix}data/{key}")
                except KeyError:
                    raise pickle.UnpicklingError(f"missing storage member data/{key}") from None
                nbytes = numel * dtype.itemsize
                if member.file_size != nbytes:
                    problem = f"storage data/{key} holds {member.file_size} bytes, expected {nbytes}"
                    raise pickle.UnpicklingError(problem)
                if member.compress_type == zipfile.ZIP_STORED:
                    start = _stored_member_offset(path, raw, member, file_size)
                    if not file_bytes:
                        mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=file_size)
                        file_bytes.append(torch.empty(0, dtype=torch.uint8).set_(mapped))
                    flat = _as_dtype(file_bytes[0][start:start + nbytes], dtype, start)
                else:
                    data = bytearray(archive.read(member))
                    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
                    flat = flat.view(dtype)
                storages[key] = _Storage(flat)
                return storages[key]

            return _unpickle(io.BytesIO(program), path, storage_for)


def _load_legacy(path: Path) -> Any:
    """torch's pre-1.6 stream: storages are allocated while unpickling, then filled from the tail."""
    file_size = os.path.getsize(path)
    storages: dict[str, tuple[_Storage, int]] = {}
    allocated = [0]

    def storage_for(args: tuple) -> _Storage:
        key, dtype, numel = _storage_key(args)
        if key not in storages:
            nbytes = numel * dtype.itemsize
            allocated[0] += nbytes
            if allocated[0] > file_size:  # checked before allocating: storages live inside the file
                raise pickle.UnpicklingError("storages declare more bytes than the file holds")
            storages[key] = (_Storage(torch.empty(numel, dtype=dtype)), numel)
        storage = storages[key][0]
        view = args[4] if len(args) > 4 else None
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int and v >= 0 for v in view[1:])):
                raise pickle.UnpicklingError("invalid storage view")
            _, offset, size = view
            if offset + size > storage.flat.numel():
                raise pickle.UnpicklingError("storage view past the end of its storage")
            return _Storage(storage.flat[offset:offset + size])
        return storage

    with open(path, "rb") as f:
        if _unpickle(f, path) != LEGACY_MAGIC:
            problem = "a pickle that is not a PyTorch checkpoint (no torch magic number)"
            raise CheckpointError(path, problem, _DAMAGED_FIX)
        if _unpickle(f, path) != LEGACY_PROTOCOL:
            raise CheckpointError(path, "unsupported legacy PyTorch protocol version", _DAMAGED_FIX)
        sys_info = _unpickle(f, path)
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise CheckpointError(path, "big-endian checkpoint", "re-save it on a little-endian machine")
        result = _unpickle(f, path, storage_for)
        keys = _unpickle(f, path)
        if not isinstance(keys, list):
            raise pickle.UnpicklingError("storage key list missing")
        for key in keys:
            if key not in storages:
                raise pickle.UnpicklingError(f"unknown storage key {str(key)[:40]}")
            storage, numel = storages[key]
            header = f.read(8)
            if len(header) != 8 or struct.unpack("<q", header)[0] != numel:
                raise pickle.UnpicklingError(f"storage {key} has a wrong size record (truncated?)")
            target = storage.flat.view(torch.uint8).numpy()
            if f.readinto(memoryview(target)) != target.nbytes:
                raise pickle.UnpicklingError(f"storage {key} is truncated")
    return result


def load_pickle(path: str | Path) -> Any:
    """Unpickle a PyTorch checkpoint (zip or legacy stream) with the restricted allow-list."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        if magic == b"PK\x03\x04":
            return _load_zip(path)
        return _load_legacy(path)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, RuntimeError, struct.error, zipfile.BadZipFile, OSError, MemoryError,
            OverflowError, RecursionError, zlib.error) as exc:  # zlib: a damaged deflated member
        problem = f"unreadable pickle ({type(exc).__name__}: {str(exc)[:120]})"
        raise CheckpointError(path, problem, _DAMAGED_FIX) from None
