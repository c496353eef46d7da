"""Schedules, denoisers, samplers and seeded noise (k-diffusion's design, AUTOMATIC1111 1.10's names).

A txt2img run, with `model_fn(x_in, t, **cond)` binding the U-Net:

    spec, schedule_name = resolve_sampler(request.sampler, request.scheduler)
    schedule = DiscreteSchedule.from_diffusers_scheduler_config(scheduler_config)
    denoiser = cfg_denoiser(make_denoiser(model_fn, schedule, lcm=spec.lcm), cond, uncond, cfg_scale)
    sigmas = sigmas_for(spec, schedule_name, schedule, steps)
    noise = ImageNoise([seed + i for i in range(batch)], (4, height // 8, width // 8))
    latents = sample(spec, denoiser, sigmas, noise, callback=progress)

img2img runs the tail of the schedule from the encoded image:

    full, tail = img2img_sigmas(lambda n: sigmas_for(spec, schedule_name, schedule, n), steps, strength)
    latents = sample(spec, denoiser, tail, noise, init_latent=encoded, full_sigmas=full)
"""

from sdgen.diffusion.denoisers import EpsDenoiser, LCMDenoiser, VDenoiser, cfg_denoiser, make_denoiser, masked_denoiser
from sdgen.diffusion.noise import BrownianNoise, ImageNoise
from sdgen.diffusion.registry import (
    SAMPLERS,
    SCHEDULERS,
    SamplerNameError,
    SamplerSpec,
    SchedulerSpec,
    img2img_sigmas,
    img2img_steps,
    list_samplers,
    list_schedulers,
    resolve_sampler,
    resolve_scheduler,
    sample,
    schedule_label,
    sigmas_for,
)
from sdgen.diffusion.samplers import Interrupted
from sdgen.diffusion.schedules import DiscreteSchedule, LCMSchedule

__all__ = [
    "SAMPLERS", "SCHEDULERS", "BrownianNoise", "DiscreteSchedule", "EpsDenoiser", "ImageNoise", "Interrupted",
    "LCMDenoiser", "LCMSchedule", "SamplerNameError", "SamplerSpec", "SchedulerSpec", "VDenoiser", "cfg_denoiser",
    "img2img_sigmas", "img2img_steps", "list_samplers", "list_schedulers", "make_denoiser", "masked_denoiser",
    "resolve_sampler", "resolve_scheduler", "sample", "schedule_label", "sigmas_for",
]
