"""Tiled VAE: close to the untiled result on a tiny random VAE; a 2048x2048 decode of SD's real-size VAE in 8 GiB.

A random VAE is a hard case for tiling (its single self-attention mixes the whole image and its
features are not smooth), so the tolerances here are loose; the test latents also carry a
brightness ramp, so tiles see different statistics (what shared GroupNorm statistics are for).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from reference_models import randomize_weights, tiny_vae_config
from sdgen.models.vae import AutoencoderKL, VAEConfig
from sdgen.pipelines.tiling import tiled_apply, tiled_vae_decode, tiled_vae_encode


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return randomize_weights(AutoencoderKL(VAEConfig.from_diffusers(tiny_vae_config())), 1).eval()


def _ramped_latents(size: int) -> torch.Tensor:
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(3))
    return noise + torch.linspace(-1, 1, size)[None, None, None, :]


def test_tiled_decode_is_close_to_untiled(vae):
    latents = _ramped_latents(40)
    with torch.inference_mode():
        whole = vae.decode(latents)
        tiled = tiled_vae_decode(vae, latents, 24, 8)
        naive = tiled_apply(lambda tile, box: vae.decode(tile), latents, 24, 8, ratio=8)
    error, naive_error = (tiled - whole).abs(), (naive - whole).abs()
    print(f"tiled decode vs whole: max {error.max():.3f}, mean {error.mean():.4f} (pixels in [-1, 1], "
          f"std {whole.std():.3f}); whole decodes per tile: mean {naive_error.mean():.4f}")
    assert error.mean() < 0.06 and error.max() < 0.5
    assert error.mean() < naive_error.mean() / 2


def test_tiled_encode_is_close_to_untiled(vae):
    with torch.inference_mode():
        pixels = vae.decode(_ramped_latents(40)).clamp(-1, 1)
        whole = vae.encode(pixels).mean
        tiled = tiled_vae_encode(vae, pixels, 192, 64)
    error = (tiled - whole).abs()
    print(f"tiled encode vs whole: max {error.max():.3f}, mean {error.mean():.4f} (latent std {whole.std():.3f})")
    assert tiled.shape == whole.shape
    assert error.mean() < 0.12 and error.max() < 1.0


def test_one_tile_is_the_untiled_computation(vae):
    latents = _ramped_latents(8)
    with torch.inference_mode():
        assert torch.equal(tiled_vae_decode(vae, latents, 24, 8), vae.decode(latents))


@pytest.mark.full  # about 10 minutes on 2 cores: `make test-full`
def test_2048_decode_of_a_real_size_vae_fits_in_8_gib():
    script = textwrap.dedent("""
        import resource, time, torch
        from sdgen.models.vae import AutoencoderKL, VAEConfig
        from sdgen.pipelines.stable_diffusion import DECODE_OVERLAP, DECODE_TILE
        from sdgen.pipelines.tiling import tiled_vae_decode
        torch.manual_seed(0)
        vae = AutoencoderKL(VAEConfig()).eval()  # SD 1.x / 2.x VAE shape, random weights
        start = time.time()
        with torch.inference_mode():
            pixels = tiled_vae_decode(vae, torch.randn(1, 4, 256, 256), DECODE_TILE, DECODE_OVERLAP)
        assert pixels.shape == (1, 3, 2048, 2048) and torch.isfinite(pixels).all()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.time() - start)
    """)
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    peak, seconds = output.split()
    print(f"2048x2048 tiled decode: peak RSS {int(peak) / 2**30:.2f} GiB in {float(seconds):.0f} s")
    assert int(peak) < 8 * 2**30
