"""The benchmark harness runs end to end in its smoke mode (tiny models, two rounds), so it never rots.

The full run (`python bench/run.py`) is documented in README.md ("Performance"); here only the
machinery is checked: every section produces its rows, ratios are finite, memory children report.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdgen.runtime import kernels
from sdgen.runtime.int8 import int8_supported

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.mark.timeout(1800)
def test_bench_smoke_mode_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    result = subprocess.run([sys.executable, str(BENCH), "--smoke", "--sdxl", "--out", str(out), "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "smoke run" in text and "matmul peak" in text and "- machine:" in text
    for workload in ("U-Net step 64x64", "text encoding", "VAE decode 64x64", "txt2img 64x64"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {workload}")]
        systems = {line.split("|")[3].strip() for line in rows}
        assert {"diffusers fp32", "sdgen fp32", "diffusers bf16", "sdgen bf16"} <= systems, (workload, systems)
        for line in rows:
            ratio = float(line.split("|")[4])
            assert math.isfinite(ratio) and ratio > 0, line
    assert {"sdgen bf16 fast"} <= {line.split("|")[3].strip() for line in text.splitlines()
                                   if line.startswith("| U-Net step")}
    if kernels.unavailable_reason() is None:  # the same fast path without the compiled kernels, beside it
        for workload in ("U-Net step 64x64", "VAE decode 64x64"):
            assert f"| {workload}" in text and any(
                line.startswith(f"| {workload}") and "| sdgen bf16 fast, no compiled kernels |" in line
                for line in text.splitlines()), workload
    for dtype in ("fp32", "bf16"):  # the tiny preview decoder, timed beside the VAE decode
        assert any(line.startswith("| VAE decode 64x64") and f"| sdgen tiny decoder, previews only, {dtype} |" in line
                   for line in text.splitlines()), dtype
    memory = re.findall(r"^\| (sdgen|diffusers) bf16 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", text, re.M)
    assert {system for system, *_ in memory} == {"sdgen", "diffusers"}, text
    # --sdxl: SDXL's U-Net step in the timing table, SDXL and a tiled decode in their own processes
    assert "| SDXL U-Net step 64x64, batch 2 | bf16 | sdgen bf16 fast |" in text
    for label in ("SDXL 64x64: sdgen bf16 |", "SDXL 64x64: diffusers bf16 |", "(tiled): sdgen bf16 |"):
        assert label in text and "failed" not in text.split(label)[1].splitlines()[0], label
    assert "| txt2img 64: sdgen fp32 vs diffusers fp32 |" in text  # the same image from both
    # the fastest paths, each as a ratio to diffusers bf16 measured in the same rounds
    assert "In the fastest group, every ratio is to diffusers bf16 instead." in text
    ours = re.search(r"fastest group: sdgen in (fp32|bf16)", text).group(1)
    fastest = {line.split("|")[1].strip(): line for line in text.splitlines()
               if f"| fastest | sdgen {ours} fast |" in line}
    assert {"U-Net step 64x64, batch 2", "VAE decode 64x64"} <= set(fastest), fastest
    assert any(line.startswith("| txt2img 64x64") for line in fastest.values())
    assert f"| txt2img 64: sdgen {ours} fast + step cache 3 vs sdgen {ours} fast |" in text
    assert f"| txt2img 64: sdgen {ours} fast + token merging 0.5 vs sdgen {ours} fast |" in text
    assert f"| txt2img 64: sdgen {ours} fast + step cache 3 + token merging 0.5 vs sdgen {ours} fast |" in text
    if int8_supported():
        assert f"| txt2img 64: sdgen {ours} fast + int8 + step cache 3 vs sdgen {ours} fast |" in text
        assert "| U-Net step 64x64, batch 2 | bf16 | sdgen bf16 fast int8 |" in text
