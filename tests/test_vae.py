"""Parity of sdgen's AutoencoderKL with diffusers' on tiny random-weight models.

Tolerances: fp32 mean, logvar, samples and decodes within 1e-5 * max|reference| (measured:
bit-identical, 0.0); bf16 decodes within 0.1 * max|reference| of diffusers' bf16 decode
(measured: bit-identical too).
"""

from __future__ import annotations

import pytest
import torch

from reference_models import make_reference_vae, tiny_vae_config
from sdgen.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

FP32_RTOL = 1e-5

VARIANTS = {
    "sd": {},
    "no-mid-attention": {"mid_block_add_attention": False},
    "two-levels-one-layer": {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4},
    "no-quant-conv": {"use_quant_conv": False, "use_post_quant_conv": False, "latent_channels": 8},
}


def load_ours(reference: torch.nn.Module) -> AutoencoderKL:
    """Build our VAE on the meta device from the reference config and assign its weights."""
    cfg = VAEConfig.from_diffusers(dict(reference.config))
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


def random_pixels(size: int = 64, seed: int = 0) -> torch.Tensor:
    """Two images in [-1, 1]."""
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    print(f"{what}: max abs diff {diff:.3g} (scale {scale:.3g})")
    assert scale > 0.5, f"{what}: reference output is near flat"
    assert diff <= FP32_RTOL * scale


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
@torch.no_grad()
def test_encode_decode_equal_diffusers(overrides: dict) -> None:
    reference = make_reference_vae(seed=1, **overrides)
    ours = load_ours(reference)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    pixels = random_pixels()
    expected = reference.encode(pixels).latent_dist
    posterior = ours.encode(pixels)
    assert_close(posterior.mean, expected.mean, "mean")
    assert_close(posterior.logvar, expected.logvar, "logvar")
    assert torch.equal(posterior.mode(), posterior.mean)
    sample = posterior.sample(torch.Generator().manual_seed(7))
    assert_close(sample, expected.sample(torch.Generator().manual_seed(7)), "sample")
    latents = torch.randn(expected.mean.shape, generator=torch.Generator().manual_seed(2))
    assert_close(ours.decode(latents), reference.decode(latents).sample, "decode")


@torch.no_grad()
def test_odd_sizes_follow_diffusers() -> None:
    reference = make_reference_vae(seed=3)
    ours = load_ours(reference)
    pixels = random_pixels(size=40)  # 40 -> 20 -> 10 -> 5: not a multiple of 8
    assert_close(ours.encode(pixels).mean, reference.encode(pixels).latent_dist.mean, "mean 40px")
    latents = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(4))
    assert_close(ours.decode(latents), reference.decode(latents).sample, "decode 5x7")


@torch.no_grad()
def test_bf16_decode_close_to_diffusers() -> None:
    reference = make_reference_vae(seed=4)
    ours = load_ours(reference)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    exact = reference.decode(latents).sample
    ref16 = reference.to(torch.bfloat16).decode(latents.bfloat16()).sample.float()
    ours16 = ours.to(torch.bfloat16).decode(latents.bfloat16())
    assert ours16.dtype == torch.bfloat16
    scale = exact.abs().max().item()
    print(f"bf16 decode: ours vs fp32 {(ours16.float() - exact).abs().max():.3g}, "
          f"diffusers vs fp32 {(ref16 - exact).abs().max():.3g}, scale {scale:.3g}")
    assert (ours16.float() - ref16).abs().max().item() <= 0.1 * scale


def test_config_round_trip_and_factor() -> None:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    cfg = VAEConfig.from_diffusers(tiny_vae_config())
    assert cfg.downsample_factor == 8
    assert VAEConfig().downsample_factor == 8 and VAEConfig().scaling_factor == 0.18215
    written = cfg.to_diffusers()
    assert VAEConfig.from_diffusers(written) == cfg
    rebuilt = DiffusersAutoencoderKL.from_config(written)
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    sdxl_like = VAEConfig.from_diffusers(tiny_vae_config(scaling_factor=0.13025, force_upcast=False))
    assert sdxl_like.scaling_factor == 0.13025 and not sdxl_like.force_upcast


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ("DownEncoderBlock2D",) * 3}, "down_block_types"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"layers_per_block": [1, 2, 2, 2]}, "layers_per_block"),
    ({"norm_num_groups": 5}, "norm_num_groups"),
    ({"latents_mean": [0.0, 0.0]}, "latents_mean"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"norm_num_groups": 0}, "norm_num_groups"),
    ({"scaling_factor": -1.0}, "scaling_factor"),
    ({"scaling_factor": None}, "scaling_factor"),
    ({"in_channels": None}, "in_channels"),
])
def test_unsupported_configs_are_rejected_by_name(change: dict, message: str) -> None:
    config = tiny_vae_config()
    config.update(change)  # bypass the builder's block-type bookkeeping
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_diffusers(config)


def test_posterior_sample_uses_generator_and_clamped_logvar() -> None:
    posterior = DiagonalGaussian(torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), -30.0))
    draw = posterior.sample(torch.Generator().manual_seed(0))
    expected = torch.exp(torch.tensor(-15.0)) * torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(draw, expected)


@torch.no_grad()
def test_bad_shapes_raise_actionable_errors() -> None:
    ours = load_ours(make_reference_vae(seed=0))
    with pytest.raises(ValueError, match="pixels"):
        ours.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match="latents"):
        ours.decode(torch.zeros(1, 3, 8, 8))
