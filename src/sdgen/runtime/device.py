"""Choosing the compute device and dtype."""

from __future__ import annotations

import torch

from sdgen.runtime.allocator import keep_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU. Choosing the CPU also keeps freed activations for
    the next model call (process-wide: sdgen.runtime.allocator)."""
    device = _device(name)
    if device.type == "cpu":
        keep_freed_memory()
    return device


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device mps was asked for but Metal is not available; use --device cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp16 on a CPU is refused: PyTorch's CPU fp16 kernels are extremely slow, bf16 is the fast path."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise ValueError("--dtype fp16 is extremely slow on a CPU; use --dtype bf16 (or fp32)")
    return DTYPES[name]
