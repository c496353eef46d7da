"""Schedules, denoisers, samplers and seeded noise (k-diffusion's design, AUTOMATIC1111 1.10's names)."""

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
    sigmas_for,
)
from sdgen.diffusion.samplers import Interrupted
from sdgen.diffusion.schedules import DiscreteSchedule, LCMSchedule

__all__ = [
    "SAMPLERS", "SCHEDULERS", "BrownianNoise", "DiscreteSchedule", "EpsDenoiser", "ImageNoise", "Interrupted",
    "LCMDenoiser", "LCMSchedule", "SamplerNameError", "SamplerSpec", "SchedulerSpec", "VDenoiser", "cfg_denoiser",
    "img2img_sigmas", "img2img_steps", "list_samplers", "list_schedulers", "make_denoiser", "masked_denoiser",
    "resolve_sampler", "resolve_scheduler", "sample", "sigmas_for",
]
