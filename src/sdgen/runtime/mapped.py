"""Loading without doubling resident memory: cast tensor by tensor and hand the mapped file pages back.

Checkpoint tensors are views of a private mmap of the file. Casting an fp16 file to bf16 reads
every page, and the pages stay in the process's resident set next to the bf16 copies until the
whole mapping goes, which for SD 1.5 meant ~4.4 GB right after loading. `cast_state` casts one
tensor at a time and, after each, tells the kernel with madvise(MADV_DONTNEED) that this
process no longer needs the file pages it covered. For a private file mapping whose pages were
never written, that only drops them from the page tables: the bytes stay in the page cache and
a later read maps them again, unchanged. Memory that is not a file mapping is never advised.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private file-backed mappings, from /proc/self/maps (Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                # fields: range, perms, offset, dev, inode, path; a regular file has an inode and a path
                if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/") and fields[1][3] == "p":
                    start, end = (int(value, 16) for value in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def release_file_pages(tensors: list[torch.Tensor], mappings: list[tuple[int, int]] | None = None) -> int:
    """Drop the whole pages of `tensors` that lie in private file mappings from the resident set; bytes advised."""
    madvise = _madvise()
    if madvise is None:
        return 0
    mappings = file_mappings() if mappings is None else mappings
    advised = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        if not any(start <= begin and end <= stop for start, stop in mappings):
            continue
        # whole pages inside the tensor only: a neighbour's partial page is left alone
        first, last = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE
        if last > first and madvise(first, last - first, _MADV_DONTNEED) == 0:
            advised += last - first
    return advised


def cast_state(state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors moved to `device` and `dtype` one at a time, each source's mapped pages released.

    Tensors already on `device` in `dtype` are kept as they are (computing directly from the
    mapped file), and so are integer tensors.
    """
    mappings = file_mappings()
    result = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or (tensor.dtype == dtype and tensor.device == device):
            result[name] = tensor
            continue
        result[name] = tensor.to(device=device, dtype=dtype)
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            release_file_pages([tensor], mappings)
    return result
