"""Hires fix and variation seeds on a tiny random-weight SD 1.x model, against AUTOMATIC1111's path by hand.

Hires fix: k-diffusion Euler at the base size, the latents upscaled bilinearly (A1111's "Latent"),
then img2img at the target size from fresh noise of the same seed (A1111 makes a new ImageRNG).
Variation seeds: the initial noise is the spherical interpolation of the seed's and the subseed's
first draws (A1111's `slerp`, written here with numpy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdgen
from img2img_reference import (
    CFG, NEGATIVE, PROMPT, SEED, as_array, assert_close, guided_reference_denoiser, kdiffusion_img2img,
    reference_decode,
)
from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.pipelines.infotext import parse_infotext

BASE = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd1-hires")
    reference = make_reference_pipeline("sd1", workdir)
    return reference, sdgen.load(save_folder(reference, workdir / "model"))


def _first_draw(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None]


def _kdiffusion_txt2img(reference, x_unit: torch.Tensor, steps: int) -> torch.Tensor:
    k, wrapper, guided = guided_reference_denoiser(reference)
    sigmas = wrapper.get_sigmas(steps)
    with torch.no_grad():
        return k.sampling.sample_euler(guided, x_unit * sigmas[0], sigmas, disable=True)


def test_hires_fix_matches_a1111_by_hand(model):
    reference, pipe = model
    first = _kdiffusion_txt2img(reference, _first_draw(SEED, (4, BASE // 8, BASE // 8)), 4)
    upscaled = torch.nn.functional.interpolate(first, size=(BASE // 4, BASE // 4), mode="bilinear", antialias=False)
    latents = kdiffusion_img2img(reference, upscaled, "sample_euler", 5, 0.6)
    expected = reference_decode(reference, latents)
    result = pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=4, sampler="Euler",
                           cfg_scale=CFG, width=BASE, height=BASE, hires_scale=2.0, hires_strength=0.6,
                           hires_steps=5)
    assert result.images[0].size == (2 * BASE, 2 * BASE)
    worst, mean = assert_close(as_array(result.images[0]), expected)
    print(f"hires fix (Latent) vs A1111 by hand: max {worst:.3f}/255, mean {mean:.4f}/255")
    params = parse_infotext(result.infotexts[0])
    assert params["Size"] == f"{BASE}x{BASE}" and params["Hires upscale"] == "2.0"
    assert params["Hires steps"] == "5" and params["Hires upscaler"] == "Latent"
    assert params["Denoising strength"] == "0.6"


def test_hires_fix_with_a_pixel_upscaler(model):
    reference, pipe = model
    result = pipe.generate(prompt=PROMPT, seed=3, steps=3, sampler="Euler a", width=BASE, height=24,
                           hires_scale=1.5, hires_upscaler="Lanczos", n=2, batch_size=2)
    assert [image.size for image in result.images] == [(48, 32), (48, 32)]  # 36 rounds down to 32
    assert "Hires upscaler: Lanczos" in result.infotexts[1]


def _slerp(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's rng.slerp on one image's (channels, height, width) noise: it normalises along dim 1, so each
    (channel, column) vector is interpolated on its own."""
    low_n = low / np.linalg.norm(low, axis=1, keepdims=True)
    high_n = high / np.linalg.norm(high, axis=1, keepdims=True)
    omega = np.arccos((low_n * high_n).sum(1, keepdims=True))
    return (np.sin((1 - t) * omega) * low + np.sin(t * omega) * high) / np.sin(omega)


def test_variation_seed_noise_is_the_slerp_of_both_seeds(model):
    reference, pipe = model
    shape = (4, BASE // 8, BASE // 8)
    low, high = _first_draw(SEED, shape)[0].double().numpy(), _first_draw(99, shape)[0].double().numpy()
    noise = torch.from_numpy(_slerp(0.3, low, high)).float()[None]
    expected = reference_decode(reference, _kdiffusion_txt2img(reference, noise, 4))
    result = pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, subseed=99, subseed_strength=0.3,
                           steps=4, sampler="Euler", cfg_scale=CFG, width=BASE, height=BASE)
    worst, mean = assert_close(as_array(result.images[0]), expected)
    print(f"variation seed vs slerp by hand: max {worst:.3f}/255, mean {mean:.4f}/255")
    params = parse_infotext(result.infotexts[0])
    assert params["Variation seed"] == "99" and params["Variation seed strength"] == "0.3"


def test_variation_seeds_follow_a1111(model):
    reference, pipe = model
    common = dict(prompt=PROMPT, steps=3, sampler="Euler", width=BASE, height=BASE)
    full = pipe.generate(seed=5, subseed=8, subseed_strength=1.0, **common)
    other = pipe.generate(seed=8, **common)
    assert np.array_equal(np.asarray(full.images[0]), np.asarray(other.images[0]))
    batch = pipe.generate(seed=5, subseed=8, subseed_strength=0.5, n=2, **common)
    assert batch.seeds == [5, 5] and batch.subseeds == [8, 9]  # one seed, subseeds count up
    plain = pipe.generate(seed=5, subseed=8, **common)
    assert "Variation seed" not in plain.infotexts[0]
    random = pipe.generate(seed=5, subseed_strength=0.5, **common)
    assert 0 <= random.subseeds[0] < 4294967294
