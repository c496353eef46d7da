"""The compiled bf16 kernels (sdgen.runtime.kernels: attention, GEGLU, GroupNorm + SiLU): accuracy,
shapes, the fallback.

It is built on first use on CPUs with AVX-512 BF16; elsewhere these tests skip with the reason and
the fast path keeps PyTorch's operations (tested in test_fast_paths.py with the kernel off).
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from sdgen.models import layers
from sdgen.runtime import kernels


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


@pytest.fixture
def kernel():
    reason = kernels.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no compiled attention kernel here: {reason}")
    op = kernels.attention_kernel()
    assert op is not None, "the kernel should build on this CPU (see stderr for the compiler's message)"
    return op


def random_qkv(heads: int, queries: int, keys: int, dim: int, seed: int, magnitude: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, queries, dim, generator=generator) * magnitude
    k, v = (torch.randn(heads, keys, dim, generator=generator) for _ in range(2))
    # the kernel sees bf16 inputs: the exact result is computed from the same rounded values
    return tuple(t.bfloat16() for t in (q, k, v))


# (heads, queries, keys, dim): SD's head sizes (40, 64, 80, 160; 512 in the VAE), query counts that
# are not a multiple of the six-row tile, key counts that are not a multiple of 16 (77: the text's),
# odd-sized heads, and each way the value product splits its columns (24, 56, 72, 88: whole vectors
# with a half one).
SHAPES = [(16, 1024, 1024, 40), (4, 300, 300, 64), (2, 257, 257, 80), (3, 97, 130, 160), (1, 600, 600, 512),
          (5, 1, 1, 8), (2, 37, 17, 42), (1, 13, 5, 2), (3, 50, 77, 24), (2, 40, 90, 56), (2, 20, 33, 72),
          (2, 31, 77, 88)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_is_as_close_to_float32_attention_as_bf16_flash_attention(kernel, shape) -> None:
    """Scores and softmax in fp32, weights rounded to bf16, each output rounded once: its error
    against fp32 attention of the same inputs stays within 1.5x that of PyTorch's bf16 flash
    attention, which is the output's own rounding (measured 1.05x to 1.4x; blocked matrix products
    without the kernel: 1.5x to 2.5x)."""
    heads, queries, keys, dim = shape
    q, k, v = random_qkv(heads, queries, keys, dim, seed=queries + dim)
    scale = dim ** -0.5
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    flash = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    out = kernels.compiled_attention(kernel, q, k, v, scale)
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    assert relative_rms(out, exact) <= 1.5 * relative_rms(flash, exact) + 1e-4
    assert (out.float() - exact).abs().max().item() <= 0.02


def test_kernel_keeps_its_accuracy_when_one_key_dominates(kernel) -> None:
    """Large scores (sharp attention, as in trained models): the row maximum is subtracted before
    the exponential, so nothing overflows and each row still sums to one."""
    q, k, v = random_qkv(2, 64, 300, 40, seed=5, magnitude=40.0)
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = kernels.compiled_attention(kernel, q, k, v, 40 ** -0.5)
    assert torch.isfinite(out).all()
    assert relative_rms(out, exact) <= 0.01


def test_fast_attention_takes_the_kernel_when_there_is_one(kernel) -> None:
    """multi_head_attention on the fast path gives exactly the kernel's result, for self- and
    cross-attention (77 keys)."""
    for keys in (300, 77):
        q = random_qkv(1, 2 * 300, 1, 3 * 40, seed=9)[0].view(2, 300, 120)
        k, v = (t.view(2, keys, 120) for t in random_qkv(1, 2 * keys, 2 * keys, 120, seed=keys)[1:])
        through_layers = layers.multi_head_attention(q, k, v, heads=3, blocked=True)
        heads_first = [t.view(2, -1, 3, 40).transpose(1, 2).reshape(6, -1, 40) for t in (q, k, v)]
        direct = kernels.compiled_attention(kernel, *heads_first, 40 ** -0.5)
        assert torch.equal(through_layers, direct.view(2, 3, 300, 40).transpose(1, 2).reshape(2, 300, 120))


@pytest.mark.parametrize("rows,inner", [(300, 1280), (7, 24), (1, 5)])
def test_geglu_kernel_is_as_close_to_float32_as_pytorchs_bf16_geglu(kernel, rows, inner) -> None:
    """value * gelu(gate) in fp32, rounded once: at most PyTorch's bf16 error (two roundings;
    measured 0.8x to 0.9x of it), inner sizes off the 16-lane vector included."""
    generator = torch.Generator().manual_seed(rows)
    projected = (torch.randn(2, rows, 2 * inner, generator=generator) * 3).bfloat16()
    value, gate = projected.float().chunk(2, dim=-1)
    exact = value * torch.nn.functional.gelu(gate)
    bf16_value, bf16_gate = projected.chunk(2, dim=-1)
    pytorch = bf16_value * torch.nn.functional.gelu(bf16_gate)
    out = kernels.geglu_kernel()(projected)
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    assert relative_rms(out, exact) <= relative_rms(pytorch, exact) + 1e-4


def test_geglu_kernel_gelu_holds_across_the_range(kernel) -> None:
    """The erf approximation: gelu within bf16 rounding of the exact one from -12 to 12 (large
    negative inputs give tiny, not cancelled, values), with the value half set to one."""
    gate = torch.linspace(-12, 12, 4001).bfloat16()
    projected = torch.cat([torch.ones_like(gate), gate])[None]
    exact = torch.nn.functional.gelu(gate.double())
    out = kernels.geglu_kernel()(projected)[0].double()
    assert ((out - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all()


def test_fast_geglu_takes_the_kernel_and_the_plain_path_does_not(kernel) -> None:
    from sdgen.runtime.fast import FastOptions, accelerate, restore

    ff = layers.GEGLU(64, 128).bfloat16()
    x = torch.randn(2, 30, 64).bfloat16()
    with torch.no_grad():
        plain = ff(x)
        fused = accelerate(ff, FastOptions())(x)
        expected = kernels.geglu_kernel()(ff.proj(x))
        again = restore(ff)(x)
    assert torch.equal(fused, expected) and not torch.equal(fused, plain)
    assert torch.equal(again, plain)


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "norm-only"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("shape", [(1, 64, 96, 96), (2, 320, 8, 8), (1, 32, 5, 7), (3, 64, 1, 1), (1, 40, 17, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_group_norm_kernel_is_as_close_to_float32_as_pytorchs_bf16(kernel, shape, layout, silu) -> None:
    """group_norm(x) (and silu) with the statistics in fp32 lanes and double, rounded once: at most
    PyTorch's bf16 error (measured about half of it with SiLU), in both layouts, on inputs with a
    mean far from zero (no cancellation in the variance), with channel counts and spatial sizes off
    the 16-lane vector; the output keeps the input's layout."""
    generator = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=generator) * 2 + 30).bfloat16()
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(8 if shape[1] == 40 else 32, shape[1], eps=1e-6)
    activation = torch.nn.functional.silu if silu else (lambda t: t)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        norm.bias.normal_(generator=generator)
        exact = activation(norm(x.float()))
        pytorch = activation(norm.bfloat16()(x))
        out = kernels.group_norm_kernel()(x, norm.num_groups, norm.weight.float(), norm.bias.float(), 1e-6, silu)
    assert out.shape == exact.shape and out.dtype == torch.bfloat16 and out.stride() == x.stride()
    assert relative_rms(out, exact) <= relative_rms(pytorch, exact) + 1e-4


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_fast_resblock_takes_the_norm_kernel_and_restore_leaves_it(kernel, layout, monkeypatch) -> None:
    from sdgen.runtime.fast import FastOptions, accelerate, restore

    calls = []
    original = kernels.group_norm_kernel
    monkeypatch.setattr(layers, "group_norm_kernel", lambda: calls.append(1) or original())
    block = layers.ResBlock(64, 64, None, groups=32, eps=1e-5).bfloat16()
    x = torch.randn(1, 64, 12, 12).bfloat16()
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = block(x)
        assert calls == []
        fast = accelerate(block, FastOptions())(x)  # prepacked convolutions return channels-last tensors
        assert len(calls) == 2  # norm1 and norm2
        again = restore(block)(x)
    assert torch.equal(again, plain) and not torch.equal(fast, plain)
    assert relative_rms(fast, plain.float()) <= 0.02


def test_suspended_runs_pytorchs_operations_in_the_block_only(kernel) -> None:
    """What the benchmark's "no compiled kernels" rows time: inside the block the fast path takes
    PyTorch's blocked products (a different rounding), after it the kernel again."""
    q, k, v = (t.view(1, 300, 80) for t in random_qkv(1, 300, 300, 80, seed=4))
    with_kernel = layers.multi_head_attention(q, k, v, heads=2, blocked=True)
    with kernels.suspended():
        assert kernels.attention_kernel() is None and kernels.group_norm_kernel() is None
        without = layers.multi_head_attention(q, k, v, heads=2, blocked=True)
    assert kernels.attention_kernel() is kernel
    assert not torch.equal(with_kernel, without)
    assert torch.equal(layers.multi_head_attention(q, k, v, heads=2, blocked=True), with_kernel)


def test_kernels_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv("SDGEN_NO_KERNELS", "1")
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.unavailable_reason() == "turned off by SDGEN_NO_KERNELS=1"
    assert kernels.attention_kernel() is None and kernels.geglu_kernel() is None
    assert kernels.group_norm_kernel() is None


def test_the_kernels_build_from_source_into_an_empty_cache(tmp_path) -> None:
    """What `make setup` runs on a fresh machine (the suite itself may reuse a cached build)."""
    if kernels.unavailable_reason() is not None:
        pytest.skip(f"no compiled kernels here: {kernels.unavailable_reason()}")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "sdgen.runtime.kernels"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CPU kernels ready in" in result.stdout and "compiling" in result.stderr
    assert list(tmp_path.glob(f"sdgen/kernels/*/{kernels.LIBRARY}"))


def test_the_kernel_benchmark_runs(kernel) -> None:
    """bench/attention_kernel.py in its smoke mode: one table row per shape, within the test's tolerance."""
    script = Path(__file__).parents[1] / "bench" / "attention_kernel.py"
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| (")]
    assert len(rows) == 2
    assert all(float(row[3]) > 0 and float(row[5]) < 0.01 for row in rows), result.stdout


def test_the_package_data_carries_every_source_and_header_the_build_reads() -> None:
    """A wheel or non-editable install builds from the files setuptools copied: a header left out
    of package-data fails the build only on users' machines."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["sdgen"]
    package_root = Path(kernels.__file__).parents[2]
    for path in kernels.SOURCES + kernels.HEADERS:
        relative = path.relative_to(package_root).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_a_failed_build_falls_back_to_pytorch_with_one_message(tmp_path, monkeypatch, capsys) -> None:
    """A machine without a working compiler (here: a source that does not compile) keeps working
    on PyTorch's attention; the reason is printed once and the build is not retried."""
    if kernels.unavailable_reason() is not None:
        pytest.skip("the kernel is not tried on this machine")
    broken = tmp_path / "attention.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCES", [broken])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.attention_kernel() is None
    assert kernels.geglu_kernel() is None
    message = capsys.readouterr().err
    assert message.count("compiled kernels unavailable, using PyTorch's operations: build failed") == 1
    q, k, v = (t.view(1, 300, 80) for t in random_qkv(1, 300, 300, 80, seed=2))
    heads_first = [t.view(1, 300, 2, 40).transpose(1, 2) for t in (q, k, v)]
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in heads_first))
    out = layers.multi_head_attention(q, k, v, heads=2, blocked=True)  # blocked matrix products
    assert relative_rms(out, exact.transpose(1, 2).reshape(1, 300, 80)) <= 0.01
