"""Compiled CPU kernels for bf16 on AVX-512 BF16, built once per machine: attention
(attention.cpp), the transformer feed-forward's GEGLU (geglu.cpp), GroupNorm + SiLU
(group_norm.cpp) and the int8 path's activation quantization (quantize.cpp).

They are compiled with PyTorch's extension builder on first use (or by `python -m
sdgen.runtime.kernels`, which `make setup` runs) into a cache folder keyed by the sources, flags,
torch version and the CPU's features, then loaded as the `torch.ops.sdgen_kernels` library. On a
CPU without AVX-512 BF16, without a C++ compiler, or with SDGEN_NO_KERNELS=1, the `*_kernel()`
functions return None and callers keep PyTorch's own operations.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

FOLDER = Path(__file__).parent
SOURCES = [FOLDER / "attention.cpp", FOLDER / "geglu.cpp", FOLDER / "group_norm.cpp", FOLDER / "quantize.cpp"]
HEADERS = [FOLDER / "vector_math.h"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
# -fopenmp: at::parallel_for is an OpenMP pragma in the headers (torch links the runtime itself)
COMPILER_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]

LIBRARY = "sdgen_kernels.so"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded" once loaded, "reason" once known to be unavailable
_suspended = threading.local()  # .depth > 0 inside `suspended()`, per thread


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel cares about, from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cache_folder() -> Path:
    """Where built kernels are kept: per source text, compiler flags, torch version and CPU features."""
    key = hashlib.sha256()
    for path in SOURCES + HEADERS:
        key.update(path.read_bytes())
    key.update(" ".join(COMPILER_FLAGS).encode())
    key.update(torch.__version__.encode())
    key.update(" ".join(sorted(cpu_flags() & set(REQUIRED_CPU_FLAGS))).encode())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sdgen" / "kernels" / key.hexdigest()[:16]


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built or loaded here, or None if it can be tried."""
    if os.environ.get("SDGEN_NO_KERNELS") == "1":
        return "turned off by SDGEN_NO_KERNELS=1"
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    compiler = os.environ.get("CXX", "c++")  # what PyTorch's builder runs
    if not (cache_folder() / LIBRARY).exists() and shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build it; install g++"
    return None


def attention_kernel():
    """`torch.ops.sdgen_kernels.attention`, building the library if needed, or None if unavailable."""
    return torch.ops.sdgen_kernels.attention if _library_loaded() else None


def geglu_kernel():
    """`torch.ops.sdgen_kernels.geglu`, building the library if needed, or None if unavailable."""
    return torch.ops.sdgen_kernels.geglu if _library_loaded() else None


def group_norm_kernel():
    """`torch.ops.sdgen_kernels.group_norm` (optionally + SiLU), building the library if needed, or None."""
    return torch.ops.sdgen_kernels.group_norm if _library_loaded() else None


def quantize_kernel():
    """`torch.ops.sdgen_kernels.quantize_u8`, building the library if needed, or None if unavailable."""
    return torch.ops.sdgen_kernels.quantize_u8 if _library_loaded() else None


@contextlib.contextmanager
def suspended():
    """Inside this block (in this thread) the `*_kernel()` functions return None: the fast paths run
    PyTorch's operations, as on a machine without the kernels (the benchmark compares the two)."""
    _suspended.depth = getattr(_suspended, "depth", 0) + 1
    try:
        yield
    finally:
        _suspended.depth -= 1


def _library_loaded() -> bool:
    """Load (building first if needed) the kernel library once per process; a failed build is
    reported once on stderr and not retried."""
    if getattr(_suspended, "depth", 0):
        return False
    with _lock:
        if "loaded" in _state or "reason" in _state:
            return "loaded" in _state
        reason = unavailable_reason()
        if reason is None:
            try:
                _load()
                _state["loaded"] = True
                return True
            except Exception as error:  # a missing compiler or a failed build: keep PyTorch's path
                reason = f"build failed ({type(error).__name__}: {str(error).strip().splitlines()[-1][:200]})"
            print(f"sdgen: compiled kernels unavailable, using PyTorch's operations: {reason}", file=sys.stderr)
        _state["reason"] = reason
        return False


def _load() -> None:
    from torch.utils import cpp_extension  # imported late: it pulls in setuptools

    if shutil.which("ninja") is None:  # PyTorch's builder runs `ninja` from PATH: use the PyPI build
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    folder = cache_folder()
    library = folder / LIBRARY
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        print("sdgen: compiling the CPU kernels for this machine (once, under a minute)...", file=sys.stderr)
        cpp_extension.load(name="sdgen_kernels", sources=[str(path) for path in SOURCES], extra_cflags=COMPILER_FLAGS,
                           build_directory=str(folder), is_python_module=False, verbose=False)
    else:
        torch.ops.load_library(str(library))


def pack_keys(k: torch.Tensor, keys_padded: int) -> torch.Tensor:
    """(heads, keys, dim) bf16 -> (heads, dim / 2, keys_padded) int32 pairs (k[s][2p], k[s][2p+1])."""
    pairs = k.contiguous().view(torch.int32)  # two bf16 per int32, the first in the low half
    pairs = F.pad(pairs, (0, 0, 0, keys_padded - k.shape[1]))
    return pairs.transpose(1, 2).contiguous()


def pack_values(v: torch.Tensor, keys_padded: int, dim_padded: int) -> torch.Tensor:
    """(heads, keys, dim) bf16 -> (heads, keys_padded / 2, dim_padded, 2) key pairs (v[2t][d], v[2t+1][d])."""
    heads, keys, dim = v.shape
    padded = F.pad(v, (0, dim_padded - dim, 0, keys_padded - keys))
    return padded.view(heads, keys_padded // 2, 2, dim_padded).transpose(2, 3).contiguous()


def compiled_attention(op, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over (heads, tokens, dim) bf16 tensors with the compiled kernel; dim even."""
    keys, dim = k.shape[1], k.shape[2]
    keys_padded = -(-keys // 16) * 16
    dim_padded = -(-dim // 8) * 8
    return op(q.contiguous(), pack_keys(k, keys_padded), pack_values(v, keys_padded, dim_padded), keys, scale)

