"""The compiled attention kernel alone at SD 1.5's 512x512 shapes: time, GFLOP/s, share of the bf16
GEMM peak, and error against fp32 attention.

    .venv/bin/python bench/attention_kernel.py            # SD 1.5's shapes
    .venv/bin/python bench/attention_kernel.py --smoke    # small shapes, seconds (tests/test_kernels.py)

For work on src/sdgen/runtime/kernels/attention.cpp: the kernel is rebuilt when its source changes
(the build cache is keyed by the sources), so an edit and a rerun compare old and new.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import gemm_peak  # noqa: E402

from sdgen.runtime import kernels  # noqa: E402

# (heads, queries, keys, head size): batch 2 x 8 heads; self-attention at the three levels, text cross-attention
SHAPES = [(16, 4096, 4096, 40), (16, 1024, 1024, 80), (16, 256, 256, 160), (16, 4096, 77, 40)]
SMOKE_SHAPES = [(2, 256, 256, 40), (2, 64, 77, 80)]


def main(argv: list[str] | None = None) -> int:
    smoke = "--smoke" in (sys.argv[1:] if argv is None else argv)
    shapes, repeats = (SMOKE_SHAPES, 2) if smoke else (SHAPES, 12)
    op = kernels.attention_kernel()
    if op is None:
        print(f"no compiled attention kernel here: {kernels.unavailable_reason()}")
        return 1
    peak = gemm_peak(torch.bfloat16, 512 if smoke else 4096)
    print(f"bf16 GEMM peak {peak:.0f} GFLOP/s; best of {repeats}")
    print("| shape | ms | GFLOP/s | % of peak | relative rms error vs fp32 |")
    print("|---|---|---|---|---|")
    for heads, queries, keys, dim in shapes:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(heads, n, dim, generator=generator).bfloat16() for n in (queries, keys, keys))
        out = kernels.compiled_attention(op, q, k, v, dim ** -0.5)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            kernels.compiled_attention(op, q, k, v, dim ** -0.5)
            best = min(best, time.perf_counter() - start)
        exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        error = ((out.float() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()
        rate = 4 * heads * queries * keys * dim / best / 1e9
        print(f"| ({heads}, {queries}, {keys}, {dim}) | {best * 1e3:.1f} | {rate:.0f} | {rate / peak:.0%} | {error:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
