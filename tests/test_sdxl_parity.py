"""SDXL base and refiner against diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline
on tiny random-weight models, loaded from a diffusers folder and from an original-format single file.

Compared: both text encoders (penultimate hidden states and the pooled projection), the U-Net with
its added conditioning, whole txt2img runs, the refiner as img2img, and the base-to-refiner
handoff (`denoising_end` / `denoising_start`) with Euler and with DPM++ 2M, whose history restarts
at the switch. Negative prompts: "blurry" unless a test says otherwise; the empty-negative tests
name their policy (zeros: diffusers' `negative_prompt=None`; encoded: `negative_prompt=""`).
Tolerance for whole images: at most 3/255 per pixel and 0.6/255 on average.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

import sdgen
from img2img_reference import as_array, assert_close, sample_image
from reference_sdxl import make_sdxl_base, make_sdxl_refiner, save_both_formats
from sdgen.diffusion.noise import ImageNoise
from sdgen.pipelines.request import GenerationRequest
from test_img2img_parity import mean_posterior
from test_txt2img_parity import UnroundedDPMSolver

PROMPT, NEGATIVE, SEED, SIZE, CFG = "a tranquil lake with the mountains", "blurry", 1234, 64, 7.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("sdxl")
    base = make_sdxl_base(workdir)
    refiner = make_sdxl_refiner(workdir, vae=base.vae)  # the handoff decodes with the base's VAE
    ours = {}
    for name, reference in (("base", base), ("refiner", refiner)):
        folder, single, configs = save_both_formats(reference, workdir, name)
        ours[name, "folder"] = sdgen.load(folder)
        ours[name, "single"] = sdgen.load(single, config=configs)
    return base, refiner, ours


FORMATS = ["folder", "single"]


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("negative, policy", [(NEGATIVE, True), ("", True), ("", False)])
def test_text_encoders_match(models, form, negative, policy):
    base, refiner, ours = models
    for name, reference in (("base", base), ("refiner", refiner)):
        pipe = ours[name, form]
        pipe.options = pipe.options.with_fields(zero_negative=policy)
        cond, uncond = pipe.prompt_conditioning(GenerationRequest(prompt=PROMPT, negative_prompt=negative), SIZE, SIZE)
        # diffusers zeroes the negative embeddings when negative_prompt is None, encodes "" when given
        theirs = reference.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True,
                                         negative_prompt=None if (negative == "" and policy) else negative)
        context, negative_context, pooled, negative_pooled = (t.detach() for t in theirs)
        pairs = {"context": (cond["context"], context), "pooled": (cond["text_embeds"], pooled),
                 "negative context": (uncond["context"], negative_context),
                 "negative pooled": (uncond["text_embeds"], negative_pooled)}
        for what, (a, b) in pairs.items():
            assert a.shape == b.shape, what
            assert _difference(a, b) < 1e-5, f"{name} {what}: {_difference(a, b)}"
        if negative == "" and policy:
            assert not uncond["context"].any() and not uncond["text_embeds"].any()
        print(f"{name} {form} negative={negative!r} zero={policy}: context max "
              f"{_difference(cond['context'], context):.1e}, pooled {_difference(cond['text_embeds'], pooled):.1e}")
        pipe.options = pipe.options.with_fields(zero_negative=True)


@pytest.mark.parametrize("form", FORMATS)
def test_unet_with_added_conditioning_matches(models, form):
    base, refiner, ours = models
    generator = torch.Generator().manual_seed(0)
    for name, reference in (("base", base), ("refiner", refiner)):
        pipe = ours[name, form]
        cond, uncond = pipe.prompt_conditioning(GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE), SIZE, 48)
        context = torch.cat([cond["context"], uncond["context"]])
        added = {"text_embeds": torch.cat([cond["text_embeds"], uncond["text_embeds"]]),
                 "time_ids": torch.cat([cond["time_ids"], uncond["time_ids"]])}
        x = torch.randn(2, 4, 6, 8, generator=generator)
        t = torch.tensor([666.33, 12.5])
        with torch.no_grad():
            expected = reference.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            got = pipe.unet(x, t, context, added)
        expected_ids = [[48, 64, 0, 0, 48, 64]] if name == "base" else [[48, 64, 0, 0, 6.0]]
        assert cond["time_ids"].tolist() == expected_ids  # (height, width) first, as diffusers orders them
        assert _difference(got, expected) < 1e-4 * max(1.0, float(expected.abs().max()))
        print(f"{name} {form} U-Net: max {_difference(got, expected):.2e} (output scale {float(expected.abs().max()):.1f})")


def _initial_noise(seed=SEED):
    return ImageNoise([seed], (4, SIZE // 8, SIZE // 8)).initial()


def _euler(reference):
    return EulerDiscreteScheduler.from_config(dict(reference.scheduler.config), timestep_spacing="linspace")


def _dpmpp_2m_karras(reference):
    return UnroundedDPMSolver.from_config(dict(reference.scheduler.config), use_karras_sigmas=True,
                                          algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
                                          lower_order_final=True)


def _start_latents(scheduler, steps):
    """diffusers' first latent for our initial noise: Euler works on x = noise * sigma, DPM-Solver on
    variance-preserving latents x / sqrt(1 + sigma^2); the pipeline multiplies by init_noise_sigma."""
    scheduler.set_timesteps(steps)
    sigma = scheduler.sigmas[0]
    x = _initial_noise() * sigma
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        x = x / (1 + sigma**2) ** 0.5
    return x / scheduler.init_noise_sigma


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("negative, policy", [(NEGATIVE, True), ("", True), ("", False)])
def test_base_txt2img_matches_diffusers(models, form, negative, policy):
    base, refiner, ours = models
    steps = 4  # steps - 1 divides 999: integer timesteps in both
    base.scheduler = _euler(base)
    latents = _start_latents(base.scheduler, steps)
    theirs = base(PROMPT, negative_prompt=None if (negative == "" and policy) else negative, num_inference_steps=steps,
                  guidance_scale=CFG, height=SIZE, width=SIZE, latents=latents, output_type="np").images[0]
    result = ours["base", form].generate(prompt=PROMPT, negative_prompt=negative, seed=SEED, steps=steps,
                                         sampler="Euler", cfg_scale=CFG, width=SIZE, height=SIZE, zero_negative=policy)
    worst, mean = assert_close(as_array(result.images[0]), theirs.astype(np.float64))
    print(f"SDXL base {form} Euler {steps} steps, negative={negative!r} zero={policy}: "
          f"max {worst:.3f}/255, mean {mean:.4f}/255")


@pytest.mark.parametrize("form", FORMATS)
def test_refiner_img2img_matches_diffusers(models, monkeypatch, form):
    base, refiner, ours = models
    refiner.scheduler = _euler(refiner)
    mean_posterior(monkeypatch, refiner.vae)
    # diffusers starts one schedule index later than A1111: our strength 0.5 with 4 steps is its 0.75
    theirs = refiner(PROMPT, image=sample_image(), negative_prompt=NEGATIVE, strength=0.75, num_inference_steps=4,
                     guidance_scale=CFG, output_type="np", generator=torch.Generator().manual_seed(SEED)).images[0]
    result = ours["refiner", form].img2img(init_image=sample_image(), prompt=PROMPT, negative_prompt=NEGATIVE,
                                           seed=SEED, steps=4, sampler="Euler", strength=0.5, cfg_scale=CFG)
    worst, mean = assert_close(as_array(result.images[0]), theirs.astype(np.float64))
    print(f"SDXL refiner {form} img2img Euler: max {worst:.3f}/255, mean {mean:.4f}/255")


@pytest.mark.parametrize("sampler, make_scheduler, steps, switch_at", [
    ("Euler", _euler, 10, 0.8),
    ("DPM++ 2M Karras", _dpmpp_2m_karras, 8, 0.7),
])
def test_base_to_refiner_handoff_matches_diffusers(models, sampler, make_scheduler, steps, switch_at):
    base, refiner, ours = models
    base.scheduler, refiner.scheduler = make_scheduler(base), make_scheduler(refiner)
    latents = _start_latents(base.scheduler, steps)
    cutoff = round(1000 * (1 - switch_at))
    assert all(abs(float(t) - cutoff) > 1 for t in base.scheduler.timesteps)  # no rounding question at the switch
    handed = base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG, height=SIZE,
                  width=SIZE, latents=latents, denoising_end=switch_at, output_type="latent").images
    theirs = refiner(PROMPT, negative_prompt=NEGATIVE, image=handed, num_inference_steps=steps,
                     denoising_start=switch_at, guidance_scale=CFG, output_type="np").images[0]
    result = ours["base", "folder"].generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps,
                                             sampler=sampler, cfg_scale=CFG, width=SIZE, height=SIZE,
                                             refiner=ours["refiner", "single"], refiner_switch_at=switch_at)
    worst, mean = assert_close(as_array(result.images[0]), theirs.astype(np.float64))
    print(f"SDXL handoff {sampler} {steps} steps at {switch_at}: max {worst:.3f}/255, mean {mean:.4f}/255")
    alone = ours["base", "folder"].generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps,
                                            sampler=sampler, cfg_scale=CFG, width=SIZE, height=SIZE)
    # the refiner's steps change the image by more than twice the tolerance: the comparison can tell them apart
    assert np.abs(as_array(alone.images[0]) - as_array(result.images[0])).max() > 6 / 255
    assert "Refiner: refiner [" in result.infotexts[0] and f"Refiner switch at: {switch_at}" in result.infotexts[0]


def test_handoff_test_sees_the_history_restart(models):
    """A1111's swap keeps DPM++ 2M's history across the switch; the handoff above restarts it. The two
    differ by more than the tolerance, so the diffusers comparison does check the restart."""
    from sdgen.diffusion.denoisers import cfg_denoiser, make_denoiser
    from sdgen.diffusion.registry import resolve_sampler, sample, sigmas_for
    from sdgen.pipelines.sdxl import switch_index

    base, refiner = models[2]["base", "folder"], models[2]["refiner", "folder"]
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=8, sampler="DPM++ 2M Karras",
                                cfg_scale=CFG, width=SIZE, height=SIZE)
    restarted = base.generate(request, refiner=refiner, refiner_switch_at=0.7)
    spec, schedule = resolve_sampler(request.sampler)
    sigmas = sigmas_for(spec, schedule, base.schedule, 8)
    k = switch_index(sigmas, base.schedule, 0.7)
    guided = [cfg_denoiser(make_denoiser(pipe._model_fn, pipe.schedule), *pipe.prompt_conditioning(request, SIZE, SIZE),
                           CFG) for pipe in (base, refiner)]
    by_sigma = {float(s): i for i, s in enumerate(sigmas)}
    swapped = lambda x, sigma: guided[by_sigma[float(sigma[0])] >= k](x, sigma)
    latents = sample(spec, swapped, sigmas, ImageNoise([SEED], (4, SIZE // 8, SIZE // 8)))
    kept = as_array(base.result(request, latents).images[0])
    assert np.abs(kept - as_array(restarted.images[0])).max() > 6 / 255


def test_ancestral_handoff_matches_kdiffusion_by_hand(models):
    """AUTOMATIC1111's path driven by hand: k-diffusion's Euler a over the base's part of the schedule,
    then over the refiner's, with the image's noise generator carrying on (a first-order sampler has
    no history, so A1111's model swap and the restart agree)."""
    from kdiffusion_loader import load_kdiffusion

    k = load_kdiffusion()
    base, refiner, ours = models
    steps, switch_at = 6, 0.75  # timesteps 999, 799.2, ..., 199.8, 0: the refiner takes 199.8 and 0

    def guided_reference(pipeline, ids, negative_ids):
        context, negative_context, pooled, negative_pooled = pipeline.encode_prompt(
            PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE)

        class UNetAsCompVis(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.alphas_cumprod = pipeline.scheduler.alphas_cumprod

            def apply_model(self, x, t, cond):
                return pipeline.unet(x, t, encoder_hidden_states=cond["context"], added_cond_kwargs=cond["added"]).sample

        wrapper = k.external.CompVisDenoiser(UNetAsCompVis(), quantize=False)
        both = {"context": torch.cat([context, negative_context]),
                "added": {"text_embeds": torch.cat([pooled, negative_pooled]), "time_ids": torch.tensor([ids, negative_ids])}}

        def guided(x, sigma):
            c, u = wrapper(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=both).chunk(2)
            return u + (c - u) * CFG

        return wrapper, guided

    wrapper, base_guided = guided_reference(base, [64.0, 64, 0, 0, 64, 64], [64.0, 64, 0, 0, 64, 64])
    _, refiner_guided = guided_reference(refiner, [64.0, 64, 0, 0, 6.0], [64.0, 64, 0, 0, 2.5])
    sigmas = wrapper.get_sigmas(steps)
    noise = ImageNoise([SEED], (4, SIZE // 8, SIZE // 8))
    with torch.no_grad():
        x = k.sampling.sample_euler_ancestral(base_guided, noise.initial() * sigmas[0], sigmas[:5], disable=True,
                                              noise_sampler=noise.noise_sampler)
        x = k.sampling.sample_euler_ancestral(refiner_guided, x, sigmas[4:], disable=True,
                                              noise_sampler=noise.noise_sampler)
        image = base.vae.decode(x / base.vae.config.scaling_factor).sample
    theirs = ((image[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).double().numpy()
    result = ours["base", "single"].generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps,
                                             sampler="Euler a", cfg_scale=CFG, width=SIZE, height=SIZE,
                                             refiner=ours["refiner", "folder"], refiner_switch_at=switch_at)
    worst, mean = assert_close(as_array(result.images[0]), theirs)
    print(f"SDXL handoff Euler a vs k-diffusion by hand: max {worst:.3f}/255, mean {mean:.4f}/255")
