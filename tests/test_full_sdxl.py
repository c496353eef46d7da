"""A full-size SDXL base configuration (random weights, ~3.5 B parameters) loads from an original-format
single .safetensors file with mmap in bf16 and runs one guided U-Net step (batch 2) at 1024x1024 within
16 GiB. Writes a 7 GB file; run with `pytest -m full tests/test_full_sdxl.py` (`make test-full`).

Two files: bf16 weights (the module takes the mapped tensors as they are) and fp16 weights (the usual
published form; bf16 compute then holds one converted copy besides the mapped pages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sdgen.checkpoints.ldm_keys import to_original_checkpoint
from test_ldm_keys import meta_state

GIB = 2**30
_DTYPES = {"bf16": ("BF16", torch.bfloat16), "fp16": ("F16", torch.float16)}

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, torch
    torch.set_num_threads(int(sys.argv[2]))
    import sdgen
    from sdgen.pipelines.request import GenerationRequest

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    start = time.time()
    pipe = sdgen.load(sys.argv[1], dtype="bf16")
    loaded, rss_loaded = time.time() - start, rss_mb()
    request = GenerationRequest(prompt="a tranquil lake with the mountains", negative_prompt="")
    cond, uncond = pipe.prompt_conditioning(request, pipe.native_size, pipe.native_size)
    both = {key: torch.cat([cond[key], uncond[key]]) for key in cond}
    size = pipe.native_size // pipe.latent_factor
    x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    start = time.time()
    with torch.inference_mode():
        out = pipe.unet(x, torch.tensor([999.0, 999.0]), both["context"],
                        {"text_embeds": both["text_embeds"], "time_ids": both["time_ids"]})
    print(json.dumps({"load_s": loaded, "step_s": time.time() - start, "finite": bool(torch.isfinite(out.float()).all()),
                      "shape": list(out.shape), "family": pipe.family, "native": pipe.native_size,
                      "time_ids": cond["time_ids"].tolist(), "context": list(cond["context"].shape),
                      "pooled": list(cond["text_embeds"].shape), "rss_loaded_mb": rss_loaded, "peak_mb": rss_mb(),
                      "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
                      "params": sum(p.numel() for m in (pipe.unet, pipe.vae, *pipe.text.encoders) for p in m.parameters())}))
    """
)


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str) -> int:
    """A safetensors file of random-looking weights in `dtype`, written in chunks (never the model in memory)."""
    code, torch_dtype = _DTYPES[dtype]
    header, offset = {}, 0
    for name in sorted(shapes):
        nbytes = 2 * int(torch.Size(shapes[name]).numel())
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    values = torch.randn(8 << 20, generator=torch.Generator().manual_seed(0)) * 0.02
    chunk = values.to(torch_dtype).view(torch.int16).numpy().tobytes()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = offset
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return 8 + len(raw) + offset


@pytest.mark.full
@pytest.mark.parametrize("file_dtype", ["bf16", "fp16"])
def test_full_size_sdxl_loads_with_mmap_and_runs_a_unet_step_at_1024(tmp_path, file_dtype):
    unet, vae, texts = meta_state("sdxl")
    flat = to_original_checkpoint("sdxl", unet, vae, texts)
    path = tmp_path / f"sdxl-base-random-{file_dtype}.safetensors"
    size = write_random_safetensors(path, {k: tuple(v.shape) for k, v in flat.items()}, file_dtype)
    threads = os.environ.get("SDGEN_FULL_THREADS", "1")
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path), threads], capture_output=True, text=True,
                            env=dict(os.environ), timeout=6 * 3600)
    path.unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"full-size SDXL base, {file_dtype} file of {size / GIB:.2f} GiB:", report)
    assert report["family"] == "sdxl" and report["native"] == 1024  # the default size of XL models
    assert report["shape"] == [2, 4, 128, 128] and report["finite"]
    assert report["time_ids"] == [[1024, 1024, 0, 0, 1024, 1024]]
    assert report["context"] == [1, 77, 2048] and report["pooled"] == [1, 1280]
    assert 2.55e9 < report["unet_params"] < 2.6e9  # SDXL base U-Net: 2.567 B parameters
    assert 3.4e9 < report["params"] < 3.6e9  # with both text encoders and the VAE
    assert report["peak_mb"] * 2**20 < 16 * GIB
    if file_dtype == "bf16":  # nothing converted: the mapped file is the weights
        assert report["rss_loaded_mb"] * 2**20 < 1.15 * size
