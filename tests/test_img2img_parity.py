"""img2img on tiny random-weight SD 1.x (eps) and 2.x (v) models against two references.

- diffusers' StableDiffusionImg2ImgPipeline with an Euler scheduler. diffusers starts at index
  steps - int(steps * strength) of the schedule, AUTOMATIC1111 one step earlier
  (steps - int(steps * strength) - 1, running t_enc + 1 steps), so our strength 0.5 with 4 steps
  is diffusers' strength 0.75. diffusers encodes with a posterior sample; the reference VAE is
  made to return the mean, as ours does. The noise is the same generator's first draw.
- AUTOMATIC1111's path driven by hand: k-diffusion samplers over the schedule's tail (also the
  ancestral and Brownian-tree SDE samplers, whose noise spans the full schedule).
Tolerance for whole images: at most 3/255 per pixel and 0.6/255 on average.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

import sdgen
from img2img_reference import (
    CFG, NEGATIVE, PROMPT, SEED, SIZE, as_array, assert_close, guided_reference_denoiser, kdiffusion_img2img,
    reference_decode, reference_encode, sample_image,
)
from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.pipelines.images import to_pil
from sdgen.pipelines.img2img import pixels_from_pil
from sdgen.diffusion.noise import ImageNoise
from sdgen.pipelines.request import Img2ImgRequest, RequestError


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param)
    reference = make_reference_pipeline(request.param, workdir)
    folder = save_folder(reference, workdir / "model")
    return request.param, reference, sdgen.load(folder)


def mean_posterior(monkeypatch, vae):
    """Make diffusers' `retrieve_latents(..., sample_mode="sample")` return the posterior mean, drawing nothing."""
    encode = vae.encode

    def encode_mean(x, return_dict=True):
        output = encode(x)
        output.latent_dist.sample = lambda generator=None: output.latent_dist.mode()
        return output

    monkeypatch.setattr(vae, "encode", encode_mean)


def _ours(pipe, sampler, steps, strength, scheduler="automatic", **fields):
    fields = {"init_image": sample_image(), "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED,
              "cfg_scale": CFG, **fields}
    return pipe.img2img(steps=steps, sampler=sampler, scheduler=scheduler, strength=strength, **fields)


@pytest.mark.parametrize("steps, ours, theirs", [(4, 0.5, 0.75), (10, 0.55, 0.6)])
def test_euler_img2img_matches_diffusers(models, monkeypatch, steps, ours, theirs):
    family, reference, pipe = models
    img2img = StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = EulerDiscreteScheduler.from_config(dict(reference.scheduler.config), timestep_spacing="linspace")
    mean_posterior(monkeypatch, reference.vae)
    expected = img2img(PROMPT, image=sample_image(), negative_prompt=NEGATIVE, strength=theirs,
                       num_inference_steps=steps, guidance_scale=CFG, output_type="np",
                       generator=torch.Generator().manual_seed(SEED)).images[0].astype(np.float64)
    result = _ours(pipe, "Euler", steps, ours)
    worst, mean = assert_close(as_array(result.images[0]), expected)
    print(f"{family} img2img Euler {steps} steps vs diffusers: max {worst:.3f}/255, mean {mean:.4f}/255")


@pytest.mark.parametrize("sampler, function, karras, brownian", [
    ("Euler a", "sample_euler_ancestral", False, False),
    ("DPM++ 2M", "sample_dpmpp_2m", True, False),
    ("Heun", "sample_heun", False, False),
    ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", False, True),
])
def test_img2img_matches_kdiffusion(models, sampler, function, karras, brownian):
    family, reference, pipe = models
    steps, strength = 6, 0.6
    scheduler = "karras" if karras else ("exponential" if brownian else "uniform")
    ours = _ours(pipe, sampler, steps, strength, scheduler=scheduler)
    init = reference_encode(reference, sample_image())
    if brownian:  # k-diffusion's exponential schedule, A1111's default for the SDE samplers
        latents = _kdiffusion_exponential(reference, init, function, steps, strength)
    else:
        latents = kdiffusion_img2img(reference, init, function, steps, strength, karras=karras)
    worst, mean = assert_close(as_array(ours.images[0]), reference_decode(reference, latents))
    print(f"{family} img2img {sampler} vs k-diffusion: max {worst:.3f}/255, mean {mean:.4f}/255")


def _kdiffusion_exponential(reference, init, function, steps, strength):
    """kdiffusion_img2img with A1111's exponential schedule and a Brownian tree over the full schedule."""
    k, wrapper, guided = guided_reference_denoiser(reference)
    sigmas = k.sampling.get_sigmas_exponential(steps, float(wrapper.sigma_min), float(wrapper.sigma_max))
    t_enc = int(strength * steps)
    tail = sigmas[steps - t_enc - 1:]
    noise = ImageNoise([SEED], tuple(init.shape[1:]))
    x = init + noise.initial() * tail[0]
    positive = sigmas[sigmas > 0]
    sampler = k.sampling.BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=[SEED])
    with torch.no_grad():
        return getattr(k.sampling, function)(guided, x, tail, disable=True, noise_sampler=sampler)


def test_strength_zero_returns_the_vae_round_trip(models):
    family, reference, pipe = models
    result = _ours(pipe, "Euler a", 10, 0.0)
    round_trip = to_pil(pipe.decode(pipe.encode(pixels_from_pil([sample_image()]))))[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(round_trip))
    assert "Denoising strength: 0.0" in result.infotexts[0]


def test_strength_one_ignores_the_input(models):
    family, reference, pipe = models
    result = _ours(pipe, "Euler", 4, 1.0)
    other = pipe.img2img(init_image=sample_image(seed=5).transpose(0), prompt=PROMPT, negative_prompt=NEGATIVE,
                         seed=SEED, steps=4, sampler="Euler", cfg_scale=CFG, strength=1.0)
    txt2img = pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=4, sampler="Euler",
                            cfg_scale=CFG, width=SIZE, height=SIZE)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(other.images[0]))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(txt2img.images[0]))


def test_batches_and_seeds(models):
    family, reference, pipe = models
    together = _ours(pipe, "Euler a", 3, 0.7, n=2, batch_size=2)
    alone = _ours(pipe, "Euler a", 3, 0.7, seed=SEED + 1)
    assert together.seeds == [SEED, SEED + 1]
    difference = np.abs(np.asarray(together.images[1]).astype(int) - np.asarray(alone.images[0]).astype(int))
    assert difference.max() <= 1


def test_size_defaults_to_the_input_rounded_down_to_multiples_of_8(models):
    family, reference, pipe = models
    image = sample_image(76).crop((0, 0, 76, 60))
    result = pipe.img2img(init_image=image, prompt=PROMPT, seed=1, steps=2, strength=0.5, resize_mode="crop")
    assert result.images[0].size == (72, 56)
    assert "Size: 72x56" in result.infotexts[0]


@pytest.mark.parametrize("fields, name", [
    ({"strength": 1.5}, "strength"),
    ({"strength": -0.1}, "strength"),
    ({"init_image": "photo.png"}, "init_image"),
    ({"resize_mode": "squash"}, "resize_mode"),
    ({"width": 100000, "height": 64}, "width"),
    ({"masked_content": "lama"}, "masked_content"),
])
def test_bad_img2img_requests_name_the_field(fields, name):
    request = Img2ImgRequest(**{"init_image": sample_image(), "strength": 0.5, **fields})
    with pytest.raises(RequestError, match=name):
        request.validate()


def test_mask_of_another_size_is_refused():
    request = Img2ImgRequest(init_image=sample_image(), mask=sample_image(32).convert("L"))
    with pytest.raises(RequestError, match="mask is 32x32 but the image is 64x64"):
        request.validate()


def test_huge_input_without_size_is_refused():
    from PIL import Image

    request = Img2ImgRequest(init_image=Image.new("RGB", (4096, 2048)))
    with pytest.raises(RequestError, match="init_image is 4096x2048"):
        request.validate()
