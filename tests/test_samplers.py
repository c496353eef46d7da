"""Samplers, denoisers, noise and the registry against k-diffusion and diffusers.

The model is a cheap analytic one (a fixed channel mix, a timestep-dependent shift, tanh) so
that every difference comes from sampler arithmetic. Differences are reported relative to the
largest magnitude of the reference result; the bound is 1e-5 (float32) unless a docstring
explains a larger one.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from kdiffusion_loader import load_kdiffusion
from sdgen.diffusion import registry, samplers, timestep_samplers
from sdgen.diffusion.denoisers import EpsDenoiser, VDenoiser, cfg_denoiser, make_denoiser, masked_denoiser
from sdgen.diffusion.noise import ImageNoise, slerp
from sdgen.diffusion.registry import SamplerNameError, img2img_sigmas, resolve_sampler, sample, sigmas_for
from sdgen.diffusion.schedules import DiscreteSchedule, LCMSchedule

K = load_kdiffusion()
SHAPE = (4, 8, 8)
SEEDS = [1234, 1235]
TOL = 1e-5


class AnalyticModel:
    """output = tanh(W x_in + b + sin(t / 37) + mean(context)): deterministic, cheap, t-sensitive."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g) / channels**0.5
        self.b = torch.randn(channels, generator=g) * 0.1
        self.batches: list[int] = []

    def __call__(self, x_in, t, context=None):
        self.batches.append(x_in.shape[0])
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x_in.shape[0])
        h = torch.einsum("oc,bchw->bohw", self.w, x_in) + self.b[:, None, None] + torch.sin(t / 37.0)[:, None, None, None]
        if context is not None:
            h = h + context.mean(dim=(1, 2))[:, None, None, None]
        return torch.tanh(h)


def schedule(prediction_type: str = "epsilon", alphas_cumprod=None) -> DiscreteSchedule:
    if alphas_cumprod is None:
        return DiscreteSchedule.from_diffusers_scheduler_config({"prediction_type": prediction_type})
    return DiscreteSchedule(alphas_cumprod, prediction_type)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def report(name: str, value: float) -> None:
    print(f"\n  {name}: max abs diff / max |ref| = {value:.2e}")


class RefNoise:
    """The per-image generator convention, written independently of sdgen's ImageNoise."""

    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.initial = torch.stack([torch.randn(SHAPE, generator=g) for g in self.generators])

    def __call__(self, sigma, sigma_next):
        return torch.stack([torch.randn(SHAPE, generator=g) for g in self.generators])


def a1111_sigmas(spec, steps, kd_denoiser):
    """A1111 1.10 KDiffusionSampler.get_sigmas for "Automatic", from k-diffusion's own functions."""
    discard = spec.options.get("discard_next_to_last_sigma", False)
    n = steps + 1 if discard else steps
    smin, smax = kd_denoiser.sigmas[0].item(), kd_denoiser.sigmas[-1].item()
    kind = spec.options.get("scheduler")
    if kind == "karras":
        sigmas = K.sampling.get_sigmas_karras(n, smin, smax)
    elif kind == "exponential":
        sigmas = K.sampling.get_sigmas_exponential(n, smin, smax)
    else:
        sigmas = kd_denoiser.get_sigmas(n)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


KDIFFUSION_SAMPLERS = ["Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", KDIFFUSION_SAMPLERS)
def test_matches_kdiffusion(name, prediction_type):
    """A1111's "Automatic" schedule for the sampler, same per-image noise (or Brownian trees)."""
    spec, _ = resolve_sampler(name)
    model, sched = AnalyticModel(), schedule(prediction_type)
    wrapper = K.external.DiscreteVDDPMDenoiser if prediction_type == "v_prediction" else K.external.DiscreteEpsDDPMDenoiser
    kd_denoiser = wrapper(model, sched.alphas_cumprod, quantize=False)
    steps = 5
    ref_sigmas = a1111_sigmas(spec, steps, kd_denoiser)
    sigmas = sigmas_for(spec, "automatic", sched, steps)
    assert torch.equal(sigmas, ref_sigmas)

    ref_noise = RefNoise(SEEDS)
    x = ref_noise.initial * ref_sigmas[0]
    kwargs = {"disable": True}
    params = inspect.signature(spec.function).parameters
    if spec.options.get("brownian_noise"):
        kwargs["noise_sampler"] = K.sampling.BrownianTreeNoiseSampler(x, ref_sigmas[ref_sigmas > 0].min(), ref_sigmas.max(), seed=SEEDS)
    elif "noise_sampler" in inspect.signature(getattr(K.sampling, spec.function.__name__)).parameters and "eta" in params:
        kwargs["noise_sampler"] = ref_noise
    if "solver_type" in spec.options:
        kwargs["solver_type"] = spec.options["solver_type"]
    ref = getattr(K.sampling, spec.function.__name__)(kd_denoiser, x, ref_sigmas, **kwargs)

    ours = sample(spec, make_denoiser(model, sched), sigmas, ImageNoise(SEEDS, SHAPE))
    report(f"{name} ({prediction_type}) vs k-diffusion", rel(ours, ref))
    assert rel(ours, ref) < TOL


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE"])
def test_karras_and_uniform_schedules_with_kdiffusion(name):
    spec, _ = resolve_sampler(name)
    model, sched = AnalyticModel(), schedule()
    kd_denoiser = K.external.DiscreteEpsDDPMDenoiser(model, sched.alphas_cumprod, quantize=False)
    for schedule_name, ref_sigmas in [("karras", K.sampling.get_sigmas_karras(4, sched.sigma_min.item(), sched.sigma_max.item())), ("uniform", kd_denoiser.get_sigmas(4))]:
        sigmas = sigmas_for(spec, schedule_name, sched, 4)
        assert torch.equal(sigmas, ref_sigmas)
        ref_noise = RefNoise(SEEDS)
        x = ref_noise.initial * sigmas[0]
        noise_sampler = K.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS) if spec.options.get("brownian_noise") else ref_noise
        ref = getattr(K.sampling, spec.function.__name__)(kd_denoiser, x, sigmas, disable=True, noise_sampler=noise_sampler)
        ours = sample(spec, make_denoiser(model, sched), sigmas, ImageNoise(SEEDS, SHAPE))
        report(f"{name} {schedule_name} vs k-diffusion", rel(ours, ref))
        assert rel(ours, ref) < TOL


def test_quantized_timesteps_match_kdiffusion():
    model, sched = AnalyticModel(), schedule()
    kd_denoiser = K.external.DiscreteEpsDDPMDenoiser(model, sched.alphas_cumprod, quantize=True)
    x, sigma = torch.randn(2, *SHAPE), torch.tensor([3.3, 0.7])
    assert torch.equal(EpsDenoiser(model, sched, quantize=True)(x, sigma), kd_denoiser(x, sigma))


# --- diffusers schedulers ----------------------------------------------------------------

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def run_diffusers(scheduler, model, x, generators=None, steps=None):
    """The usual set_timesteps / scale_model_input / step loop (optionally only the first `steps`)."""
    timesteps = scheduler.timesteps if steps is None else scheduler.timesteps[:steps]
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        kwargs = {"generator": generators} if accepts_generator and generators is not None else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def continued_generators(seeds):
    """Per-image generators after the initial draw, and that draw: what diffusers continues from."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    initial = torch.stack([torch.randn(SHAPE, generator=g) for g in generators])
    return generators, initial


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    "name, scheduler_cls, config, steps",
    [
        ("Euler", "EulerDiscreteScheduler", dict(timestep_spacing="linspace"), 4),
        ("Euler", "EulerDiscreteScheduler", dict(timestep_spacing="linspace", use_karras_sigmas=True), 6),
        ("Euler a", "EulerAncestralDiscreteScheduler", dict(timestep_spacing="linspace"), 4),
        ("Heun", "HeunDiscreteScheduler", dict(timestep_spacing="linspace"), 4),
        ("LMS", "LMSDiscreteScheduler", dict(timestep_spacing="linspace"), 10),
        ("DPM2", "KDPM2DiscreteScheduler", dict(timestep_spacing="linspace"), 4),
    ],
)
def test_matches_diffusers_karras_style(name, scheduler_cls, config, steps, prediction_type):
    """diffusers' k-diffusion ports, given diffusers' own sigma list (its table, its spacing).

    With "linspace" spacing and 4 or 10 steps the timesteps are integers, so diffusers' linear
    sigma interpolation equals A1111's log-linear one. diffusers' DPM2 has no
    discard-penultimate-sigma step, so our DPM2 runs on diffusers' sigmas directly.
    """
    import diffusers

    scheduler = getattr(diffusers, scheduler_cls)(**BASE, prediction_type=prediction_type, **config)
    scheduler.set_timesteps(steps)
    model = AnalyticModel()
    generators, initial = continued_generators(SEEDS)
    ref = run_diffusers(scheduler, model, initial * scheduler.init_noise_sigma, generators)

    spec, _ = resolve_sampler(name)
    sched = schedule(prediction_type, scheduler.alphas_cumprod)
    sigmas = torch.unique_consecutive(scheduler.sigmas.float())  # Heun and DPM2 repeat entries
    schedule_fn = registry.resolve_scheduler("karras" if config.get("use_karras_sigmas") else "uniform").function
    assert torch.allclose(sigmas, schedule_fn(sched, steps), rtol=1e-6)
    ours = sample(spec, make_denoiser(model, sched), sigmas, ImageNoise(SEEDS, SHAPE))
    report(f"{name} {config} ({prediction_type}) vs diffusers {scheduler_cls}", rel(ours, ref))
    assert rel(ours, ref) < TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_diffusers_multistep(prediction_type):
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint) runs in VP space: the same
    trajectory starts from x_ve = x_vp * sqrt(1 + sigma^2). "linspace" spacing gives integer
    timesteps; diffusers' Karras option rounds timesteps to integers, which A1111 does not."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**BASE, prediction_type=prediction_type, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace")
    scheduler.set_timesteps(6)
    model = AnalyticModel()
    _, initial = continued_generators(SEEDS)
    ref = run_diffusers(scheduler, model, initial * scheduler.init_noise_sigma)
    sched = schedule(prediction_type, scheduler.alphas_cumprod)
    sigmas = scheduler.sigmas.float()
    x = initial * timestep_samplers.vp_scale(sigmas[0])
    ours = samplers.sample_dpmpp_2m(make_denoiser(model, sched), x, sigmas)
    report(f"DPM++ 2M ({prediction_type}) vs diffusers DPMSolverMultistep", rel(ours, ref))
    assert rel(ours, ref) < TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(prediction_type, eta):
    """A1111's DDIM grid for 4 steps is 1, 251, 501, 751: diffusers' "leading" spacing with
    steps_offset 1. A1111 evaluates the model at all but the lowest and returns the latent at
    t = 1, which is diffusers' state after its first 3 of 4 steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**BASE, prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [751, 501, 251, 1]
    model = AnalyticModel()
    generators, initial = continued_generators(SEEDS)
    x = initial
    for t in scheduler.timesteps[:3]:
        x = scheduler.step(model(x, t), t, x, eta=eta, generator=generators).prev_sample
    spec, _ = resolve_sampler("DDIM")
    sched = schedule(prediction_type, scheduler.alphas_cumprod)
    sigmas = sigmas_for(spec, "automatic", sched, 4)
    ours = sample(spec, make_denoiser(model, sched), sigmas, ImageNoise(SEEDS, SHAPE), eta=eta)
    report(f"DDIM eta={eta} ({prediction_type}) vs diffusers DDIM", rel(ours, x))
    assert rel(ours, x) < TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_matches_diffusers(variant, prediction_type):
    """A1111 runs UniPC (order 3, lower_order_final, data prediction) over times 999 -> 0 and
    returns the VP latent at t = 0; diffusers' "linspace" spacing with final_sigmas_type
    "sigma_min" is the same grid where (999 * k / steps) is an integer (steps = 9)."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        **BASE, prediction_type=prediction_type, solver_order=3, solver_type=variant, predict_x0=True,
        lower_order_final=True, timestep_spacing="linspace", final_sigmas_type="sigma_min",
    )
    steps = 9
    scheduler.set_timesteps(steps)
    model = AnalyticModel()
    _, initial = continued_generators(SEEDS)
    ref = run_diffusers(scheduler, model, initial * scheduler.init_noise_sigma)
    sched = schedule(prediction_type, scheduler.alphas_cumprod)
    sigmas = scheduler.sigmas.float()
    assert rel(sigmas, sigmas_for(resolve_sampler("UniPC")[0], "automatic", sched, steps)) < 1e-5
    x = initial * timestep_samplers.vp_scale(sigmas[0])
    ours = timestep_samplers.sample_unipc(make_denoiser(model, sched), x, sigmas, variant=variant) / timestep_samplers.vp_scale(sigmas[-1])
    report(f"UniPC {variant} ({prediction_type}) vs diffusers UniPCMultistep", rel(ours, ref))
    assert rel(ours, ref) < TOL
    # The whole A1111 path: its float32 grid (666.00006 rather than 666), VP start and end.
    spec = resolve_sampler("UniPC")[0]
    grid = sample(spec, make_denoiser(model, sched), sigmas_for(spec, "automatic", sched, steps), ImageNoise(SEEDS, SHAPE), variant=variant)
    report(f"UniPC {variant} ({prediction_type}) A1111 grid vs diffusers", rel(grid, ref))
    assert rel(grid, ref) < TOL


def test_lcm_matches_diffusers():
    """A1111's LCM with 8 steps runs timesteps 999, 859, ..., 19 (diffusers takes them as custom
    timesteps). A1111 starts from noise * sigma_max in k-diffusion's space, diffusers from VP
    noise; diffusers is given the VP form of A1111's start, x / sqrt(1 + sigma_max^2)."""
    from diffusers import LCMScheduler

    timesteps = list(range(999, 0, -140))
    scheduler = LCMScheduler(**BASE)
    scheduler.set_timesteps(timesteps=timesteps)
    model = AnalyticModel()
    generators, initial = continued_generators(SEEDS)
    spec, _ = resolve_sampler("LCM")
    sched = schedule("epsilon", scheduler.alphas_cumprod)
    sigmas = sigmas_for(spec, "automatic", sched, 8)
    x_vp = initial * sigmas[0] / timestep_samplers.vp_scale(sigmas[0])
    ref = run_diffusers(scheduler, model, x_vp, generators)
    ours = sample(spec, make_denoiser(model, sched, lcm=True), sigmas, ImageNoise(SEEDS, SHAPE))
    report("LCM vs diffusers LCMScheduler", rel(ours, ref))
    assert rel(ours, ref) < TOL
    with pytest.raises(ValueError, match="epsilon"):
        make_denoiser(model, schedule("v_prediction"), lcm=True)


# --- noise ---------------------------------------------------------------------------------

def test_image_noise_is_per_image_generator():
    noise = ImageNoise([7, 8, 9], SHAPE)
    first = noise.initial()
    for i, seed in enumerate([7, 8, 9]):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(first[i], torch.randn(SHAPE, generator=g))
        single = ImageNoise([seed], SHAPE)
        single.initial()
        following = torch.randn(SHAPE, generator=g)
        assert torch.equal(single.next()[0], following)
    assert torch.equal(noise.next()[1], ImageNoise([8], SHAPE).next()[0])  # next() draws the initial first
    assert torch.equal(noise.initial(), first)  # cached, not redrawn
    as_double = ImageNoise([7], SHAPE, dtype=torch.float64).initial()
    assert as_double.dtype == torch.float64 and torch.equal(as_double.float(), first[:1])


def test_eta_noise_seed_delta_and_variation_seed():
    noise = ImageNoise([5], SHAPE, eta_noise_seed_delta=31337)
    noise.initial()
    g = torch.Generator().manual_seed(5 + 31337)
    assert torch.equal(noise.next()[0], torch.randn(SHAPE, generator=g))
    base = ImageNoise([5], SHAPE).initial()
    assert torch.equal(ImageNoise([5], SHAPE, subseeds=[6], subseed_strength=0.0).initial(), base)
    sub = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(ImageNoise([5], SHAPE, subseeds=[6], subseed_strength=1.0).initial()[0], sub, atol=1e-5)
    assert torch.allclose(ImageNoise([5], SHAPE, subseeds=[6], subseed_strength=0.3).initial()[0], slerp(0.3, base[0], sub))
    with pytest.raises(ValueError):
        ImageNoise([], SHAPE)


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE"])
def test_batch_independence(name):
    """Image i of a batch equals the same seed generated alone (ancestral noise and Brownian trees)."""
    spec, _ = resolve_sampler(name)
    model, sched = AnalyticModel(), schedule()
    sigmas = sigmas_for(spec, "automatic", sched, 4)
    batch = sample(spec, make_denoiser(model, sched), sigmas, ImageNoise([20, 21, 22], SHAPE))
    for i, seed in enumerate([20, 21, 22]):
        alone = sample(spec, make_denoiser(model, sched), sigmas, ImageNoise([seed], SHAPE))
        assert torch.allclose(batch[i], alone[0], rtol=0, atol=1e-6)


# --- denoisers ------------------------------------------------------------------------------

def test_cfg_one_batched_call_and_skip_at_scale_one():
    model, sched = AnalyticModel(), schedule()
    denoiser = EpsDenoiser(model, sched)
    x, sigma = torch.randn(2, *SHAPE), torch.tensor([2.0, 2.0])
    cond, uncond = {"context": torch.randn(2, 3, 5)}, {"context": torch.randn(2, 3, 5)}
    model.batches.clear()
    guided = cfg_denoiser(denoiser, cond, uncond, 7.5)(x, sigma)
    assert model.batches == [4]
    c, u = denoiser(x, sigma, **cond), denoiser(x, sigma, **uncond)
    assert torch.allclose(guided, u + (c - u) * 7.5, atol=1e-6)
    model.batches.clear()
    assert torch.equal(cfg_denoiser(denoiser, cond, uncond, 1.0)(x, sigma), c) and model.batches == [2]
    long_uncond = {"context": torch.randn(2, 6, 5)}  # a longer prompt: two calls
    model.batches.clear()
    cfg_denoiser(denoiser, cond, long_uncond, 5.0)(x, sigma)
    assert model.batches == [2, 2]
    with pytest.raises(ValueError, match="same keys"):
        cfg_denoiser(denoiser, cond, {"y": torch.zeros(2, 3)}, 5.0)


def test_v_denoiser_matches_kdiffusion_and_mask_blend():
    model, sched = AnalyticModel(), schedule("v_prediction")
    x, sigma = torch.randn(2, *SHAPE), torch.tensor([5.0, 0.1])
    ref = K.external.DiscreteVDDPMDenoiser(model, sched.alphas_cumprod, quantize=False)(x, sigma)
    assert torch.equal(VDenoiser(model, sched)(x, sigma), ref)
    known, keep = torch.randn(2, *SHAPE), (torch.rand(2, 1, 8, 8) > 0.5).float()
    blended = masked_denoiser(lambda x, s: VDenoiser(model, sched)(x, s), known, keep)(x, sigma)
    assert torch.equal(blended[keep.expand_as(blended) > 0], known[keep.expand_as(known) > 0])


# --- callback, interrupt, img2img ---------------------------------------------------------------

def test_callback_steps_and_interrupt_returns_latest_denoised():
    spec, _ = resolve_sampler("Heun")
    model, sched = AnalyticModel(), schedule()
    sigmas = sigmas_for(spec, "automatic", sched, 5)
    seen = []

    def stop_at_two(step, total, x, denoised):
        seen.append((step, total, denoised.clone()))
        if step == 2:
            raise samplers.Interrupted

    out = sample(spec, make_denoiser(model, sched), sigmas, ImageNoise(SEEDS, SHAPE), callback=stop_at_two)
    assert [(s, t) for s, t, _ in seen] == [(0, 5), (1, 5), (2, 5)]
    assert torch.equal(out, seen[-1][2])
    with pytest.raises(samplers.Interrupted):
        samplers.sample_euler(make_denoiser(model, sched), torch.randn(1, *SHAPE) * sigmas[0], sigmas, callback=stop_at_two)


def test_img2img_sigmas_follow_a1111():
    spec, _ = resolve_sampler("Euler")
    sched = schedule()
    full_fn = lambda n: sigmas_for(spec, "automatic", sched, n)  # noqa: E731
    full, tail = img2img_sigmas(full_fn, 10, 0.5)
    assert torch.equal(tail, full[4:]) and len(tail) == 7  # t_enc = 5, A1111 runs t_enc + 1 steps
    full, tail = img2img_sigmas(full_fn, 10, 0.5, fix_steps=True)
    assert len(full) == 21 and torch.equal(tail, full[10:])
    with pytest.raises(ValueError, match="strength"):
        img2img_sigmas(full_fn, 10, 1.5)
    init = torch.randn(2, *SHAPE)
    noise, firsts = ImageNoise(SEEDS, SHAPE), []
    sample(spec, make_denoiser(AnalyticModel(), sched), tail, noise, init_latent=init, callback=lambda i, n, x, d: firsts.append(x) if i == 0 else None)
    assert torch.allclose(firsts[0], init + noise.initial() * tail[0])


# --- registry -------------------------------------------------------------------------------

def test_resolve_names_aliases_and_legacy_suffixes():
    assert resolve_sampler("DPM++ 2M Karras") == (registry.SAMPLERS[0], "karras")
    assert resolve_sampler("dpm++ 2m sde heun KARRAS")[0].name == "DPM++ 2M SDE Heun"
    assert resolve_sampler("DPM++ 2M SDE Heun") == (resolve_sampler("k_dpmpp_2m_sde_heun")[0], "automatic")
    assert resolve_sampler("Euler a")[0].name == "Euler a"
    assert resolve_sampler("k_euler_a")[0].name == "Euler a"
    assert resolve_sampler("sample_euler_ancestral")[0].name == "Euler a"
    assert resolve_sampler("Euler", "SGM Uniform")[1] == "sgm_uniform"
    assert resolve_sampler("Euler", "sgmuniform")[1] == "sgm_uniform"
    assert resolve_sampler("LMS", "Karras")[1] == "karras"
    assert resolve_sampler("Euler", None)[1] == "automatic"
    assert resolve_sampler("DPM2 a Exponential", "karras") == (resolve_sampler("DPM2 a")[0], "exponential")


def test_infotext_schedule_labels():
    assert registry.schedule_label(resolve_sampler("DPM++ 2M")[0], "automatic") == "Karras"
    assert registry.schedule_label(resolve_sampler("DPM++ 2M SDE")[0], None) == "Exponential"
    assert registry.schedule_label(resolve_sampler("Euler a")[0], "automatic") == "Automatic"
    assert registry.schedule_label(*resolve_sampler("Euler a", "sgm_uniform")) == "SGM Uniform"
    assert registry.schedule_label(*resolve_sampler("DPM++ 2M Karras")) == "Karras"


def test_unknown_names_raise_with_the_choices():
    with pytest.raises(SamplerNameError, match=r"unknown sampler 'Eulr'; choose one of: DPM\+\+ 2M, .*Euler a") as info:
        resolve_sampler("Eulr")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"unknown schedule type 'karas'.*Karras"):
        resolve_sampler("Euler", "karas")
    with pytest.raises(ValueError, match="steps"):
        sigmas_for(resolve_sampler("Euler")[0], "automatic", schedule(), 0)


def test_api_listings_and_defaults():
    samplers_list = registry.list_samplers()
    assert samplers_list[0] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert {s["name"] for s in samplers_list} >= {"Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM++ 2M", "DPM++ SDE", "DDIM", "UniPC", "LCM"}
    schedulers_list = registry.list_schedulers()
    assert schedulers_list[2] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}
    assert [s["label"] for s in schedulers_list][:4] == ["Automatic", "Uniform", "Karras", "Exponential"]
    defaults = {s.name: s.default_schedule for s in registry.SAMPLERS}
    assert defaults["DPM++ SDE"] == defaults["DPM2"] == "karras" and defaults["DPM++ 2M SDE"] == "exponential"
    assert defaults["Euler a"] == "uniform" and defaults["DDIM"] == "ddim_timesteps"
    sched = schedule()
    dpm2 = sigmas_for(resolve_sampler("DPM2")[0], "automatic", sched, 4)
    karras5 = K.sampling.get_sigmas_karras(5, sched.sigma_min.item(), sched.sigma_max.item())
    assert torch.equal(dpm2, torch.cat([karras5[:-2], karras5[-1:]]))
    lcm = sigmas_for(resolve_sampler("LCM")[0], "karras", sched, 4)
    assert torch.isclose(lcm[0], LCMSchedule(sched).sigma_max) and torch.isclose(lcm[-2], LCMSchedule(sched).sigma_min)


@pytest.mark.parametrize("name", [s.name for s in registry.SAMPLERS])
def test_every_sampler_runs_with_short_and_explicit_schedules(name):
    spec, _ = resolve_sampler(name)
    sched = schedule()
    denoiser = make_denoiser(AnalyticModel(), sched, lcm=spec.lcm)
    for schedule_name, steps in [("automatic", 1), ("automatic", 3), ("karras", 3), ("exponential", 2), ("sgm_uniform", 3)]:
        sigmas = sigmas_for(spec, schedule_name, sched, steps)
        steps_seen = []
        out = sample(spec, denoiser, sigmas, ImageNoise([3], SHAPE), callback=lambda i, n, x, d: steps_seen.append(i))
        assert out.shape == (1, *SHAPE) and torch.isfinite(out).all()
        assert steps_seen == list(range(len(sigmas) - 1))
