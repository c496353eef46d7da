"""Interleaved timing, FLOP counts, the machine's GEMM peak and its description line.

On a shared machine absolute seconds drift with the other load, so every comparison runs its
systems in alternation (A B C, B C A, ...) and reports the median of the per-round ratios: a
burst of outside load hits both sides of a ratio alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Timings:
    """Seconds per round for each system of one workload, measured in alternation."""

    workload: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    flops: float | None = None  # of one call, counted on the reference
    outputs: dict[str, object] = field(default_factory=dict)  # each system's last result

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of name / baseline: robust to load that shifts between rounds."""
        return statistics.median(a / b for a, b in zip(self.seconds[name], self.seconds[baseline]))


def interleaved(workload: str, systems: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> Timings:
    """Time each system `rounds` times, rotating the order every round, after `warmup` untimed calls."""
    names = list(systems)
    for _ in range(warmup):
        for name in names:
            systems[name]()
    result = Timings(workload, {name: [] for name in names})
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            result.outputs[name] = systems[name]()
            result.seconds[name].append(time.perf_counter() - start)
    return result


def count_flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call (matmuls, convolutions, attention), by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def gemm_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matrix product: the machine's practical matmul peak for dtype."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_line() -> str:
    """CPU, cores, vector extensions that matter here, memory, torch and load average."""
    flags = cpu_flags()
    extensions = [name for name in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if name in flags]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (f"{cpu_name()}, {os.cpu_count()} cores ({' '.join(extensions) or 'no AVX-512'}), {memory:.0f} GiB, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}")


def busy(threshold: float = 0.5) -> bool:
    """True when other processes keep the cores busy (1-minute load above threshold per core)."""
    return os.getloadavg()[0] > threshold * (os.cpu_count() or 1) + 1
