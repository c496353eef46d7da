"""The int8 path (`FastOptions.int8`, `--int8`): the activation quantizer against its definition,
int8 layers within their documented error of fp32, the layers it leaves alone, weight changes and
training, and the command line recording it so that replay does the same again."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sdgen.cli import main
from sdgen.errors import UserError
from sdgen.models.unet import UNet, UNetConfig
from sdgen.runtime import int8, kernels
from sdgen.runtime.fast import FastOptions, accelerate, restore, uses_int8

pytestmark = pytest.mark.skipif(not int8.int8_supported(), reason="no AVX-512 VNNI / oneDNN int8 here")


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """The definition, in float64: the range [min(x, 0), max(x, 0)] onto 0..255."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    zero_point = min(255, max(0, round(-low / scale)))
    q = torch.round(x.double() / scale + zero_point).clamp(0, 255).to(torch.uint8)
    return q, scale, zero_point


CASES = [((2, 320, 16, 16), 1.0, 0.5), ((7, 1283), 3.0, -10.0), ((1, 1), 1.0, 0.0), ((5, 64, 3, 3), 0.0, -2.0),
         ((3, 17), 1.0, 40.0)]


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("shape, spread, shift", CASES, ids=lambda v: str(v))
def test_activation_quantization_follows_its_definition(shape, spread, shift, use_kernel) -> None:
    if use_kernel and kernels.unavailable_reason() is not None:
        pytest.skip(f"no compiled kernels here: {kernels.unavailable_reason()}")
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * spread + shift).bfloat16()
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if use_kernel:
        q, scale, zero_point = int8.quantize_activations(x)
    else:
        with kernels.suspended():
            q, scale, zero_point = int8.quantize_activations(x)
    expected, expected_scale, expected_zero = reference_quantize(x.float())
    assert q.dtype == torch.uint8 and q.shape == x.shape and q.stride() == x.stride()
    assert scale == pytest.approx(expected_scale, rel=1e-6) and zero_point == expected_zero
    assert (q.int() - expected.int()).abs().max() <= 1  # a tie may round the other way in float32
    dequantized = (q.double() - zero_point) * scale
    assert (dequantized - x.double()).abs().max() <= 0.5001 * scale + 1e-12


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_skip_int8_and_propagate(bad, use_kernel) -> None:
    """NaN or inf (an overflowing model) reach the output as without int8, so that the pipeline's
    NaN check reports them, instead of being clamped into the 0..255 range."""
    if use_kernel and kernels.unavailable_reason() is not None:
        pytest.skip(f"no compiled kernels here: {kernels.unavailable_reason()}")
    x = torch.ones(1, 1000, 160, dtype=torch.bfloat16)
    x[0, 537, 3] = bad
    _, linear = wide_layers()
    linear = accelerate(linear.bfloat16(), FastOptions(int8=True))
    with kernels.suspended() if not use_kernel else contextlib.nullcontext(), torch.no_grad():
        assert int8.quantize_activations(x) is None
        out = linear(x)
    assert not torch.isfinite(out[0, 537]).any() and torch.isfinite(out[0, :537]).all()


def wide_layers(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Conv2d(96, 128, 3, padding=1), nn.Linear(160, 192)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@torch.no_grad()
def test_int8_layers_stay_within_two_percent_of_fp32(dtype) -> None:
    conv, linear = wide_layers()
    x_conv = torch.randn(2, 96, 12, 12, generator=torch.Generator().manual_seed(1))
    x_linear = torch.randn(3, 70, 160, generator=torch.Generator().manual_seed(2)).relu()  # one-sided, as after SiLU
    expected = conv(x_conv), linear(x_linear)
    module = accelerate(nn.Sequential(conv, linear).to(dtype), FastOptions(int8=True))
    assert uses_int8(module)
    actual = conv(x_conv.to(dtype)), linear(x_linear.to(dtype))
    for got, want in zip(actual, expected):
        assert got.dtype == dtype and got.shape == want.shape
        assert 1e-4 < relative_rms(got, want) < 0.02, relative_rms(got, want)
    assert all("_int8" in layer.__dict__ for layer in (conv, linear))


def small_unet() -> UNet:
    torch.manual_seed(3)
    cfg = UNetConfig(in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=(1, 1),
                     attention=(False, True), num_heads=(2, 4), transformer_depth=(1, 1), cross_attention_dim=64,
                     sample_size=16)
    unet = UNet(cfg).eval()
    with torch.no_grad():
        for parameter in unet.parameters():  # a trained-like spread: the default init leaves outputs near zero
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return unet


@torch.no_grad()
def test_unet_int8_error_is_bounded_and_narrow_layers_keep_bf16() -> None:
    unet = small_unet()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([500, 500])
    context = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    exact = unet(x, t, context).float()
    unet16 = unet.to(torch.bfloat16)
    plain = relative_rms(unet16(x.bfloat16(), t, context.bfloat16()), exact)
    accelerate(unet16, FastOptions(int8=True))
    assert uses_int8(unet16)
    quantized = relative_rms(unet16(x.bfloat16(), t, context.bfloat16()), exact)
    print(f"relative error vs fp32: bf16 {plain:.4f}, int8 {quantized:.4f}")
    assert plain < quantized < 0.08
    assert "_int8" not in unet16.conv_in.__dict__ and "_int8" not in unet16.conv_out.__dict__  # 4 channels
    assert "_int8" not in unet16.time_embedding.linear_1.__dict__  # two rows, fewer than MIN_ROWS
    assert any("_int8" in layer.__dict__ for layer in unet16.modules())
    restore(unet16)
    assert not uses_int8(unet16) and not any("_int8" in layer.__dict__ for layer in unet16.modules())


def test_int8_layers_repack_on_weight_change_and_train_on_the_plain_path() -> None:
    conv, _ = wide_layers(seed=1)
    conv = accelerate(conv.bfloat16(), FastOptions(int8=True))
    x = torch.randn(1, 96, 8, 8, generator=torch.Generator().manual_seed(6)).bfloat16()
    with torch.no_grad():
        before = conv(x)
        conv.weight.mul_(2)  # a LoRA merge changes the weight in place
        after = conv(x)
    bias = conv.bias[:, None, None]
    assert relative_rms(after - bias, 2 * (before - bias).float()) < 0.02
    x.requires_grad_(True)
    conv(x).float().sum().backward()  # the int8 product has no backward: training takes the plain path
    assert x.grad is not None and conv.weight.grad is not None


def test_int8_where_unsupported_is_a_clear_error(monkeypatch) -> None:
    import sdgen.runtime.fast as fast

    monkeypatch.setattr(fast, "int8_supported", lambda: False)
    with pytest.raises(UserError, match="AVX-512 VNNI"):
        accelerate(small_unet(), FastOptions(int8=True))


def _generate(out, *options: str) -> tuple[np.ndarray, str]:
    code = main(["generate", "a red circle above a blue square", "--steps", "6", "--seed", "4", "--sampler", "Euler",
                 "--dtype", "bf16", "--no-watermark", "--out", str(out), *options])
    assert code == 0
    [path] = list(out.iterdir())
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16), image.info["parameters"]


def test_cli_int8_is_recorded_and_replayed(tmp_path) -> None:
    fast, fast_text = _generate(tmp_path / "fast", "--fast")
    quantized, text = _generate(tmp_path / "int8", "--int8")
    assert "Int8: True" in text and "Int8" not in fast_text
    assert np.abs(quantized - fast).max() > 2  # the products were rounded to 8 bits
    [original] = list((tmp_path / "int8").iterdir())
    assert main(["replay", str(original), "--dtype", "bf16", "--out", str(tmp_path / "again")]) == 0
    [path] = list((tmp_path / "again").iterdir())
    with Image.open(path) as image:
        assert "Int8: True" in image.info["parameters"]
        assert np.array_equal(np.asarray(image.convert("RGB"), dtype=np.int16), quantized)
