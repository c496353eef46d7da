"""A full-size SD 1.5 configuration (random weights, ~1.07 B parameters) loads from a single
.safetensors file with mmap and runs one U-Net step. Slow (writes 2.1 GB); skip with -m 'not slow'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sdgen.checkpoints.ldm_keys import to_original_checkpoint
from test_checkpoint_io import _write_streaming_safetensors
from test_ldm_keys import meta_state

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, torch
    import sdgen
    start = time.time()
    pipe = sdgen.load(sys.argv[1], dtype="bf16")
    loaded = time.time() - start
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    context = pipe.encode_prompt("a tranquil lake with the mountains")
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    start = time.time()
    with torch.inference_mode():
        out = pipe.unet(x.to(torch.bfloat16), torch.tensor([999.0, 999.0]), context.expand(2, -1, -1))
    step = time.time() - start
    print(json.dumps({"load_s": loaded, "step_s": step, "finite": bool(torch.isfinite(out.float()).all()),
                      "shape": list(out.shape), "family": pipe.family, "native": pipe.native_size,
                      "rss_loaded_mb": rss_loaded / 1024,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "params": sum(p.numel() for p in pipe.unet.parameters())}))
    """
)


@pytest.mark.slow
def test_full_size_sd15_single_file_loads_and_runs_a_unet_step(tmp_path):
    unet, vae, texts = meta_state("sd1")
    flat = to_original_checkpoint("sd1", unet, vae, texts)
    path = tmp_path / "v1-5-random.safetensors"
    size = _write_streaming_safetensors(path, {k: tuple(v.shape) for k, v in flat.items()})
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                            env=dict(os.environ), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print("full-size SD 1.5:", report)
    assert report["family"] == "sd1" and report["native"] == 512
    assert report["shape"] == [2, 4, 32, 32] and report["finite"]
    assert 850e6 < report["params"] < 870e6  # SD 1.5's U-Net: 859.5 M parameters
    # bf16 compute from fp16 weights: the mapped file pages plus one cast copy, nothing more.
    assert report["rss_loaded_mb"] * 2**20 < 2.2 * size
