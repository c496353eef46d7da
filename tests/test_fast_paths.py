"""Each CPU fast path stays within its tolerance of the exact fp32 model, on tiny random models.

Tolerances (relative rms error against the fp32 output of the same weights):
- fast paths in fp32 change memory layout and prepacked oneDNN convolution algorithms only, so
  summation order: within 1e-3 (measured 2e-6 to 2e-5 on an Intel Xeon, up to 1.8e-4 on an AMD
  EPYC, where oneDNN picks other kernels; the deepest random model amplifies most);
- fast paths in bf16: at most 1.5x the plain bf16 path's own error plus 0.01, as test_unet.py
  asks of bf16 against diffusers (measured: equal to the plain bf16 error within 0.002).
`restore` returns to the bit-exact default path.
"""

from __future__ import annotations

import os

import pytest
import torch

from reference_models import UNET_FAMILIES, make_reference_unet, make_reference_vae, unet_example_inputs
from sdgen.models.layers import Upsample
from sdgen.models.unet import UNet, UNetConfig
from sdgen.models.vae import AutoencoderKL, VAEConfig
from sdgen.runtime.fast import FastOptions, accelerate, restore
from sdgen.runtime.mapped import cast_state, release_file_pages

OPTIONS = [FastOptions(channels_last=True),
           FastOptions(channels_last=True, fp32_attention=False, prepack=False, blocked_attention=False),
           FastOptions(fp32_attention=False, blocked_attention=False),
           FastOptions(prepack=False, blocked_attention=False),
           FastOptions(fp32_attention=False, prepack=False)]
FP32_TOLERANCE = 1e-3
OPTION_IDS = ["all", "channels_last", "prepack", "fp32_attention", "blocked_attention"]


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


def ours_from(reference: torch.nn.Module, cls, config_cls) -> torch.nn.Module:
    with torch.device("meta"):
        model = cls(config_cls.from_diffusers(dict(reference.config)))
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


def run_unet(model: UNet, inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    added = inputs["added_cond"]
    if added is not None:
        added = {k: v.to(dtype) if k != "time_ids" else v for k, v in added.items()}
    return model(inputs["x"].to(dtype), inputs["timesteps"], inputs["context"].to(dtype), added).float()


# every family with all paths on; each path alone on SD 1.x (keeps the suite fast on 2 cores)
UNET_CASES = [(family, OPTIONS[0]) for family in UNET_FAMILIES] + [("sd1", options) for options in OPTIONS[1:]]


@pytest.mark.parametrize("family, options", UNET_CASES,
                         ids=[f"{f}-{OPTION_IDS[OPTIONS.index(o)]}" for f, o in UNET_CASES])
@torch.no_grad()
def test_unet_fast_paths_within_tolerance(family: str, options: FastOptions) -> None:
    reference = make_reference_unet(family, seed=3)
    inputs = unet_example_inputs(family, size=8)
    ours = ours_from(reference, UNet, UNetConfig)
    exact = run_unet(ours, inputs, torch.float32)
    fast32 = run_unet(accelerate(ours, options), inputs, torch.float32)
    assert relative_rms(fast32, exact) <= FP32_TOLERANCE
    assert torch.equal(run_unet(restore(ours), inputs, torch.float32), exact)

    ours16 = ours_from(reference.to(torch.bfloat16), UNet, UNetConfig)
    plain = relative_rms(run_unet(ours16, inputs, torch.bfloat16), exact)
    fast = relative_rms(run_unet(accelerate(ours16, options), inputs, torch.bfloat16), exact)
    print(f"{family}: bf16 error vs fp32 plain {plain:.4f}, fast {fast:.4f}")
    assert fast <= 1.5 * plain + 0.01


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@torch.no_grad()
def test_vae_fast_paths_within_tolerance(options: FastOptions) -> None:
    reference = make_reference_vae(seed=4)
    ours = ours_from(reference, AutoencoderKL, VAEConfig)
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    pixels = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    exact, exact_mean = ours.decode(latents), ours.encode(pixels).mean
    accelerate(ours, options)
    assert relative_rms(ours.decode(latents), exact) <= FP32_TOLERANCE
    assert relative_rms(ours.encode(pixels).mean, exact_mean) <= FP32_TOLERANCE
    assert torch.equal(restore(ours).decode(latents), exact)

    ours16 = ours_from(reference.to(torch.bfloat16), AutoencoderKL, VAEConfig)
    plain = relative_rms(ours16.decode(latents.bfloat16()), exact)
    accelerate(ours16, options)
    fast = relative_rms(ours16.decode(latents.bfloat16()), exact)
    fast_encode = relative_rms(ours16.encode(pixels.bfloat16()).mean, exact_mean)
    print(f"VAE decode bf16 error vs fp32 plain {plain:.4f}, fast {fast:.4f}; encode fast {fast_encode:.4f}")
    assert fast <= 1.5 * plain + 0.01
    assert fast_encode <= 0.05


@pytest.mark.parametrize("shape", [(2, 8, 1024, 1024, 40), (2, 4, 300, 300, 64), (1, 1, 4096, 4096, 512),
                                   (2, 2, 700, 256, 80)])
def test_blocked_attention_is_as_close_to_fp32_as_bf16_flash_attention(shape) -> None:
    """Blocked attention rounds the weights to bf16 once more than flash attention does: its error
    against the fp32 result stays within 3x flash attention's bf16 error (measured 1.5x to 2.5x)."""
    from sdgen.models.layers import blocked_attention

    batch, heads, tokens, keys, head_dim = shape
    generator = torch.Generator().manual_seed(tokens)
    q = torch.randn(batch, heads, tokens, head_dim, generator=generator)
    k, v = (torch.randn(batch, heads, keys, head_dim, generator=generator) for _ in range(2))
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.inference_mode():
        flash = torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        blocked = blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), block=256)
    assert blocked.shape == exact.shape and blocked.dtype == torch.bfloat16
    assert relative_rms(blocked, exact) <= 3 * relative_rms(flash, exact)


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize("kind", ["unet", "vae"])
@torch.no_grad()
def test_fast_attention_runs_on_the_fast_path_only(kind, compiled, monkeypatch) -> None:
    """At 16x16 latents (256 tokens) the fast bf16 path takes the compiled kernel for every
    attention where it is built, or else blocked attention for self-attention only; it stays
    within the bf16 tolerance, and the plain path never takes either."""
    from sdgen.models import layers
    from sdgen.runtime import kernels

    if compiled and kernels.unavailable_reason() is not None:
        pytest.skip(f"no compiled attention kernel here: {kernels.unavailable_reason()}")
    if not compiled:
        monkeypatch.setattr(kernels, "_state", {"reason": "off for this test"})
    calls = {"kernel": [], "blocked": []}
    kernel, blocked = layers.compiled_attention, layers.blocked_attention
    monkeypatch.setattr(layers, "compiled_attention",
                        lambda op, q, k, v, scale: calls["kernel"].append(k.shape[1]) or kernel(op, q, k, v, scale))
    monkeypatch.setattr(layers, "blocked_attention",
                        lambda q, k, v: calls["blocked"].append(k.shape[2]) or blocked(q, k, v))
    if kind == "unet":
        reference = make_reference_unet("sd1", seed=3)
        inputs = unet_example_inputs("sd1", size=16)
        exact = run_unet(ours_from(reference, UNet, UNetConfig), inputs, torch.float32)
        ours16 = ours_from(reference.to(torch.bfloat16), UNet, UNetConfig)
        run = lambda model: run_unet(model, inputs, torch.bfloat16)  # noqa: E731
    else:
        reference = make_reference_vae(seed=4)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
        exact = ours_from(reference, AutoencoderKL, VAEConfig).decode(latents)
        ours16 = ours_from(reference.to(torch.bfloat16), AutoencoderKL, VAEConfig)
        run = lambda model: model.decode(latents.bfloat16())  # noqa: E731
    plain = relative_rms(run(ours16), exact)
    assert calls == {"kernel": [], "blocked": []}
    fast = relative_rms(run(accelerate(ours16, FastOptions(fp32_attention=False, prepack=False))), exact)
    if compiled:
        assert calls["kernel"] and not calls["blocked"]
        if kind == "unet":  # cross-attention too: fewer keys than the 256 image tokens
            assert min(calls["kernel"]) < 256 <= max(calls["kernel"])
    else:
        assert not calls["kernel"] and calls["blocked"]
        assert all(keys >= layers.BLOCKED_MIN_KEYS for keys in calls["blocked"])
    assert fast <= 1.5 * plain + 0.01


def test_channels_last_reaches_every_convolution() -> None:
    """A U-Net call on the fast path never feeds a convolution an NCHW tensor (no layout round trips)."""
    reference = make_reference_unet("sd1", seed=3)
    ours = accelerate(ours_from(reference, UNet, UNetConfig).to(torch.bfloat16), FastOptions(channels_last=True))
    layouts = []
    channels_last = torch.channels_last
    hooks = [module.register_forward_pre_hook(
             lambda m, args: layouts.append(args[0].is_contiguous(memory_format=channels_last)))
             for module in ours.modules() if isinstance(module, torch.nn.Conv2d)]
    inputs = unet_example_inputs("sd1", size=16)  # deepest level 2x2: at 1x1 both layouts are the same
    with torch.no_grad():
        out = run_unet(ours, inputs, torch.bfloat16)
    for hook in hooks:
        hook.remove()
    assert layouts and all(layouts)
    assert out.is_contiguous()  # callers get the ordinary layout back


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux only")
def test_cast_state_releases_mapped_pages(tmp_path) -> None:
    """fp16 file -> bf16: the copies stay, the mapped pages go, and the file's bytes are untouched."""
    from safetensors.torch import save_file

    from sdgen.checkpoints.safetensors_io import load_safetensors

    generator = torch.Generator().manual_seed(0)
    weights = {f"w{i}": torch.randn(1024, 4096, generator=generator).half() for i in range(16)}  # 128 MiB
    path = tmp_path / "weights.safetensors"
    save_file(weights, path)
    state, _ = load_safetensors(path)
    for tensor in state.values():
        tensor.float().sum()  # page everything in, as a cast does
    before = _resident_bytes()
    cast = cast_state(state, torch.device("cpu"), torch.bfloat16)
    growth = _resident_bytes() - before
    # the bf16 copies (128 MiB) arrive, the mapped fp16 pages (128 MiB) leave
    assert growth < 48 * 2**20, f"resident memory grew by {growth / 2**20:.0f} MiB"
    for name, tensor in weights.items():
        assert torch.equal(cast[name], tensor.bfloat16())
        assert torch.equal(state[name], tensor)  # the mapping reads back the same bytes


def test_release_leaves_ordinary_memory_alone() -> None:
    """Heap tensors are never advised (MADV_DONTNEED would zero anonymous memory)."""
    tensor = torch.arange(4 << 20, dtype=torch.float32)
    assert release_file_pages([tensor]) == 0
    assert torch.equal(tensor, torch.arange(4 << 20, dtype=torch.float32))
    same = {"a": tensor.bfloat16(), "ids": torch.arange(3)}
    cast = cast_state(same, torch.device("cpu"), torch.bfloat16)
    assert cast["a"] is same["a"] and cast["ids"] is same["ids"]


@torch.no_grad()
def test_step_cache_reuses_deep_features_between_full_steps() -> None:
    """DeepCache: full calls are exact; calls in between differ, but only by the deep levels' change."""
    reference = make_reference_unet("sd1", seed=3)
    ours = ours_from(reference, UNet, UNetConfig)
    inputs = unet_example_inputs("sd1", size=8)
    x, context = inputs["x"], inputs["context"]
    steps = [torch.tensor([t, t]) for t in (999.0, 800.0, 600.0, 400.0)]
    exact = [ours(x, t, context) for t in steps]
    accelerate(ours, FastOptions(fp32_attention=False, prepack=False, blocked_attention=False, upsample_phases=False,
                                 step_cache=2))  # nothing else: exact
    cached = [ours(x, t, context) for t in steps]
    assert torch.equal(cached[0], exact[0]) and torch.equal(cached[2], exact[2])  # full calls
    for i in (1, 3):
        # the shallow levels ran at the new timestep on the kept deep map: neither output reused
        assert not torch.equal(cached[i], exact[i]) and not torch.equal(cached[i], exact[i - 1])
        error, change = relative_rms(cached[i], exact[i]), relative_rms(exact[i - 1], exact[i])
        assert error <= change * 1.01  # no worse than reusing the previous step's whole output
    assert torch.equal(ours(x, steps[0], context), exact[0])  # a new run starts with a full call
    restore(ours)
    assert ours.step_cache is None


def test_step_cache_interval_is_checked() -> None:
    from sdgen.runtime.step_cache import StepCache

    with pytest.raises(ValueError, match="interval"):
        StepCache(0)


def test_prepacked_layers_repack_on_weight_change_and_keep_autograd() -> None:
    """A merged LoRA (new weight) or an in-place edit is seen at the next call; training still gets gradients."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Flatten(2),
                                torch.nn.Linear(16, 4)).to(torch.bfloat16)
    x = torch.randn(2, 8, 4, 4, generator=generator).bfloat16()
    accelerate(model)
    with torch.no_grad():
        first = model(x)
        model[0].weight.mul_(2)  # in place
        model[2].weight = torch.nn.Parameter(model[2].weight * 3)  # replaced, as LoRA merging does
        changed = model(x)
        restore(model)
        expected = model(x)
    # packed and plain kernels agree to bf16 rounding (measured: bit-identical); the change is far larger
    assert torch.allclose(changed.float(), expected.float(), rtol=0.02, atol=0.02)
    assert not torch.allclose(first.float(), changed.float(), rtol=0.02, atol=0.02)
    accelerate(model)
    model.requires_grad_(True)
    model(x).float().sum().backward()
    assert model[0].weight.grad is not None and model[2].weight.grad is not None


UPSAMPLE_CASES = [((1, 8, 5, 7), torch.float32, False), ((2, 16, 8, 8), torch.float32, True),
                  ((1, 16, 6, 9), torch.bfloat16, False), ((2, 32, 8, 8), torch.bfloat16, True)]


@pytest.mark.parametrize("shape, dtype, channels_last", UPSAMPLE_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}-{'nhwc' if c else 'nchw'}"
                              for s, d, c in UPSAMPLE_CASES])
@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "plain"])
@torch.no_grad()
def test_upsampling_by_phases_is_the_same_function(shape, dtype, channels_last, prepack) -> None:
    """Nearest 2x then a 3x3 convolution, computed as four 2x2 convolutions of the small input: the
    same values up to rounding (fp32: summation order; bf16: the summed taps rounded once), odd
    sizes and both layouts included."""
    generator = torch.Generator().manual_seed(sum(shape))
    upsample = Upsample(shape[1]).eval()
    for tensor in upsample.parameters():
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    exact = upsample(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    upsample = upsample.to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    plain = upsample(x)
    accelerate(upsample, FastOptions(prepack=prepack))
    assert "forward" in upsample.__dict__
    phased = upsample(x)
    assert torch.equal(upsample(x, size=(2 * shape[2], 2 * shape[3])), phased)  # as the U-Net asks for it
    assert "_phases" in upsample.__dict__
    assert phased.shape == plain.shape == exact.shape and phased.dtype == dtype
    if dtype == torch.float32:
        assert relative_rms(phased, exact) <= 1e-5
    else:
        assert relative_rms(phased, exact) <= 1.5 * relative_rms(plain, exact) + 1e-3


@torch.no_grad()
def test_upsampling_by_phases_follows_weight_changes_and_odd_targets() -> None:
    """A weight changed in place (a LoRA merged) is taken up at the next call; an upsampling to an
    odd size (a U-Net skip of odd size) takes the plain path; restore drops the phase kernels."""
    upsample = accelerate(Upsample(8).eval(), FastOptions(prepack=False))
    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(2))
    before = upsample(x)
    upsample.conv.weight.mul_(2.0)
    upsample.conv.bias.zero_()
    after = upsample(x)
    assert relative_rms(after, type(upsample).forward(upsample, x)) <= 1e-5
    assert relative_rms(after, before) > 0.1
    odd = upsample(x, size=(11, 13))
    assert odd.shape[-2:] == (11, 13) and torch.equal(odd, type(upsample).forward(upsample, x, (11, 13)))
    restore(upsample)
    assert "_phases" not in upsample.__dict__ and "forward" not in upsample.__dict__
