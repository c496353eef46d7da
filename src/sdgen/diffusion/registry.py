"""Samplers and schedules by their AUTOMATIC1111 1.10 names, and one call that runs a sampler.

Names, aliases, options and default schedules are A1111 1.10's (`sd_samplers_kdiffusion.py`,
`sd_samplers_timesteps.py`, `sd_samplers_lcm.py`, `sd_schedulers.py`); the `options` dicts are
what its `/sdapi/v1/samplers` returns. "Automatic" means the sampler's own default: Karras for
DPM++ 2M, DPM++ SDE, DPM++ 2S a, DPM2 and DPM2 a, exponential for the 2M/3M SDE samplers,
uniform (k-diffusion `get_sigmas`) for the others, A1111's own timestep grids for DDIM and
UniPC. A1111 ignores the schedule for DDIM and UniPC; here an explicit schedule applies to
them too (they are written over sigmas), and "Automatic" keeps A1111's grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

from sdgen.diffusion import samplers as k, schedules as sch, timestep_samplers as ts
from sdgen.diffusion.noise import ImageNoise
from sdgen.diffusion.samplers import Interrupted
from sdgen.errors import UserError


class SamplerNameError(UserError, ValueError):
    """An unknown sampler or schedule name; the message lists the known ones."""


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as A1111 lists it: name, aliases, options, and the function that runs it."""

    name: str
    function: Callable[..., Tensor]
    aliases: tuple[str, ...] = ()
    options: Mapping[str, object] = field(default_factory=dict)
    automatic_schedule: str | None = None  # a schedule name; None: the sampler's default in `options`
    vp_space: bool = False  # A1111 runs it on CompVis (variance-preserving) latents: DDIM, UniPC
    lcm: bool = False  # needs the LCM denoiser and its 50-level schedule
    eta: float | None = None  # default eta for samplers that take one

    @property
    def default_schedule(self) -> str:
        return self.automatic_schedule or str(self.options.get("scheduler", "uniform"))


def _spec(name: str, function, aliases: tuple[str, ...], options: dict | None = None, **kw) -> SamplerSpec:
    return SamplerSpec(name, function, aliases, MappingProxyType(dict(options or {})), **kw)


# A1111 1.10's order (k-diffusion samplers, then timestep samplers, then LCM).
SAMPLERS: tuple[SamplerSpec, ...] = (
    _spec("DPM++ 2M", k.sample_dpmpp_2m, ("k_dpmpp_2m",), {"scheduler": "karras"}),
    _spec(
        "DPM++ SDE", k.sample_dpmpp_sde, ("k_dpmpp_sde",),
        {"scheduler": "karras", "second_order": True, "brownian_noise": True}, eta=1.0,
    ),
    _spec(
        "DPM++ 2M SDE", k.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",),
        {"scheduler": "exponential", "brownian_noise": True}, eta=1.0,
    ),
    _spec(
        "DPM++ 2M SDE Heun", k.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde_heun",),
        {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}, eta=1.0,
    ),
    _spec(
        "DPM++ 2S a", k.sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",),
        {"scheduler": "karras", "uses_ensd": True, "second_order": True}, eta=1.0,
    ),
    _spec(
        "DPM++ 3M SDE", k.sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde",),
        {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True}, eta=1.0,
    ),
    _spec("Euler a", k.sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": True}, eta=1.0),
    _spec("Euler", k.sample_euler, ("k_euler",)),
    _spec("LMS", k.sample_lms, ("k_lms",)),
    _spec("Heun", k.sample_heun, ("k_heun",), {"second_order": True}),
    _spec(
        "DPM2", k.sample_dpm_2, ("k_dpm_2",),
        {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True},
    ),
    _spec(
        "DPM2 a", k.sample_dpm_2_ancestral, ("k_dpm_2_a",),
        {"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True, "second_order": True}, eta=1.0,
    ),
    _spec("DDIM", ts.sample_ddim, ("ddim",), automatic_schedule="ddim_timesteps", vp_space=True, eta=0.0),
    _spec("UniPC", ts.sample_unipc, ("unipc",), automatic_schedule="unipc_time_uniform", vp_space=True),
    _spec("LCM", ts.sample_lcm, ("k_lcm",), lcm=True),
)


@dataclass(frozen=True)
class SchedulerSpec:
    """A schedule type as A1111's `/sdapi/v1/schedulers` lists it, with its function."""

    name: str
    label: str
    function: Callable[..., Tensor] | None
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: tuple[str, ...] | None = None


SCHEDULERS: tuple[SchedulerSpec, ...] = (
    SchedulerSpec("automatic", "Automatic", None),
    SchedulerSpec("uniform", "Uniform", sch.uniform_sigmas, need_inner_model=True),
    SchedulerSpec("karras", "Karras", sch.karras_sigmas, default_rho=7.0),
    SchedulerSpec("exponential", "Exponential", sch.exponential_sigmas),
    SchedulerSpec("polyexponential", "Polyexponential", sch.polyexponential_sigmas, default_rho=1.0),
    SchedulerSpec("sgm_uniform", "SGM Uniform", sch.sgm_uniform_sigmas, need_inner_model=True, aliases=("SGMUniform",)),
    SchedulerSpec("kl_optimal", "KL Optimal", sch.kl_optimal_sigmas),
    SchedulerSpec("align_your_steps", "Align Your Steps", sch.align_your_steps_sigmas),
    SchedulerSpec("simple", "Simple", sch.simple_sigmas, need_inner_model=True),
    SchedulerSpec("normal", "Normal", sch.normal_sigmas, need_inner_model=True),
    SchedulerSpec("ddim", "DDIM", sch.ddim_uniform_sigmas, need_inner_model=True),
    SchedulerSpec("beta", "Beta", sch.beta_sigmas, need_inner_model=True),
)

# The grids "Automatic" gives DDIM and UniPC; internal, not offered as schedule types.
_SAMPLER_GRIDS = {"ddim_timesteps": sch.ddim_timestep_sigmas, "unipc_time_uniform": sch.unipc_time_uniform_sigmas}


def _index(pairs) -> dict:
    """Lower-cased name -> entry; the first entry to claim a name keeps it."""
    table: dict = {}
    for name, entry in pairs:
        table.setdefault(name.lower(), entry)
    return table


def _lookup(name: str, table: Mapping[str, object]) -> object | None:
    return table.get(name.strip().lower())


# k-diffusion function names (sample_euler_ancestral) work as aliases too; the shared
# sample_dpmpp_2m_sde goes to "DPM++ 2M SDE", the first sampler listed with it.
_SAMPLER_NAMES = _index((n, s) for s in SAMPLERS for n in (s.name, *s.aliases, s.function.__name__))
_SCHEDULER_NAMES = _index((n, s) for s in SCHEDULERS for n in (s.name, s.label, *(s.aliases or ())))


def resolve_scheduler(name: str | None) -> SchedulerSpec:
    """A schedule type by name, label or alias, any case; None means Automatic."""
    if name is None or not name.strip():
        return SCHEDULERS[0]
    spec = _lookup(name, _SCHEDULER_NAMES)
    if spec is None:
        labels = ", ".join(s.label for s in SCHEDULERS)
        raise SamplerNameError(f"unknown schedule type {name!r}; choose one of: {labels}")
    return spec


def resolve_sampler(name: str, scheduler: str | None = None) -> tuple[SamplerSpec, str]:
    """(sampler, schedule name) for an A1111 sampler name, alias or legacy "<sampler> <schedule>" name.

    "DPM++ 2M Karras" gives (DPM++ 2M, "karras"): as in A1111's get_sampler_and_scheduler a
    schedule named in the sampler name wins over the `scheduler` argument. Names are matched
    without regard to case; an unknown name raises SamplerNameError listing the known ones.
    """
    schedule = resolve_scheduler(scheduler)
    spec = _lookup(name, _SAMPLER_NAMES) if isinstance(name, str) else None
    if spec is None and isinstance(name, str):
        lowered = name.strip().lower()
        for candidate in SCHEDULERS[1:]:
            for option in (candidate.label, candidate.name, *(candidate.aliases or ())):
                suffix = " " + option.lower()
                if lowered.endswith(suffix) and _lookup(lowered[: -len(suffix)], _SAMPLER_NAMES) is not None:
                    spec, schedule = _lookup(lowered[: -len(suffix)], _SAMPLER_NAMES), candidate
                    break
            if spec is not None:
                break
    if spec is None:
        raise SamplerNameError(f"unknown sampler {name!r}; choose one of: {', '.join(s.name for s in SAMPLERS)}")
    return spec, schedule.name


def schedule_label(spec: SamplerSpec, schedule_name: str | None) -> str:
    """The "Schedule type" A1111 1.10 writes to infotext: the sampler's default label for Automatic."""
    scheduler = resolve_scheduler(schedule_name)
    if scheduler.name == "automatic" and "scheduler" in spec.options:
        # KDiffusionSampler.get_sigmas records the default it picked, e.g. Karras for DPM++ 2M.
        scheduler = resolve_scheduler(str(spec.options["scheduler"]))
    return scheduler.label


def list_samplers() -> list[dict]:
    """`/sdapi/v1/samplers` items: {name, aliases, options}."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in SAMPLERS]


def list_schedulers() -> list[dict]:
    """`/sdapi/v1/schedulers` items: {name, label, aliases, default_rho, need_inner_model}."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": None if s.aliases is None else list(s.aliases),
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULERS
    ]


def sigmas_for(
    spec: SamplerSpec,
    schedule_name: str,
    schedule: sch.DiscreteSchedule,
    steps: int,
    *,
    model_family: str = "sd1",
    **schedule_options,
) -> Tensor:
    """The full sigma list A1111 1.10 uses for `steps` steps of this sampler (KDiffusionSampler.get_sigmas).

    `schedule` is the model's (LCM's 50-level view is taken for LCM). Samplers flagged
    discard_next_to_last_sigma get one extra step whose penultimate sigma is dropped.
    `schedule_options` (rho, sigma_min, sigma_max; alpha, beta for "beta") reach the schedules
    that take them; None values are ignored.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= len(schedule.sigmas):
        raise ValueError(f"steps must be an integer from 1 to {len(schedule.sigmas)}, got {steps!r}")
    if spec.lcm and not isinstance(schedule, sch.LCMSchedule):
        schedule = sch.LCMSchedule(schedule)
    name = resolve_scheduler(schedule_name).name
    if name == "automatic":
        name = spec.default_schedule
    discard = bool(spec.options.get("discard_next_to_last_sigma", False))
    n = steps + 1 if discard else steps
    if name in _SAMPLER_GRIDS:
        sigmas = _SAMPLER_GRIDS[name](schedule, n)
    else:
        scheduler = resolve_scheduler(name)
        kwargs = {key: v for key, v in schedule_options.items() if v is not None}
        if scheduler.name == "align_your_steps":
            kwargs["model_family"] = model_family
        sigmas = scheduler.function(schedule, n, **kwargs)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.float().cpu()


def img2img_steps(steps: int, strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """(schedule steps, t_enc) as A1111's setup_img2img_steps; t_enc + 1 steps are run."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"denoising strength must be between 0 and 1, got {strength}")
    if fix_steps:
        # "img2img_fix_steps": stretch the schedule so that exactly `steps` steps run.
        return (int(steps / min(strength, 0.999)) if strength > 0 else 0), steps - 1
    return steps, int(min(strength, 0.999) * steps)


def img2img_sigmas(
    schedule_fn: Callable[[int], Tensor],
    steps: int,
    strength: float,
    *,
    fix_steps: bool = False,
) -> tuple[Tensor, Tensor]:
    """(full sigmas, tail to run) for img2img: A1111 runs `sigmas[steps - t_enc - 1:]` of the full list."""
    full_steps, t_enc = img2img_steps(steps, strength, fix_steps)
    if full_steps < 1:
        raise ValueError("denoising strength 0 with fixed steps leaves nothing to run; raise the strength")
    sigmas = schedule_fn(full_steps)
    # Lists of a different length than steps + 1 (DDIM's grid, kl_optimal) keep the same tail length.
    return sigmas, sigmas[max(len(sigmas) - t_enc - 2, 0):]


def sample(
    spec: SamplerSpec,
    denoiser: k.DenoiseFn,
    sigmas: Tensor,
    noise: ImageNoise,
    *,
    init_latent: Tensor | None = None,
    full_sigmas: Tensor | None = None,
    callback: k.Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
    sgm_noise_multiplier: bool = False,
    **sampler_options,
) -> Tensor:
    """Run a sampler from seeded noise (txt2img) or from a noised `init_latent` (img2img).

    txt2img starts at `noise.initial() * sigmas[0]` (times sqrt(1 + sigma^2) for the VP-space
    samplers and with A1111's "SGM noise multiplier"); img2img at `init_latent + noise * sigmas[0]`.
    `full_sigmas` is the whole schedule when `sigmas` is its img2img tail: SDE samplers span
    their Brownian tree over it, as A1111 does. If the callback raises `Interrupted`, the
    latest denoised estimate is returned (A1111 shows the image so far).

    img2img with DDIM or UniPC differs from A1111 on purpose: A1111 noises the image to one grid
    step above the first timestep it evaluates (its own code calls this "likely off by a bit");
    here the noise level is the first sigma, as for every other sampler.
    """
    first = noise.initial()
    sigmas = sigmas.to(first.device)
    if init_latent is not None:
        x = init_latent + first * sigmas[0]
    elif spec.vp_space or sgm_noise_multiplier:
        x = first * torch.sqrt(1.0 + sigmas[0] ** 2)
    else:
        x = first * sigmas[0]
    kwargs: dict = {}
    if spec.eta is not None:
        kwargs["eta"] = spec.eta if eta is None else eta
        if spec.function is not ts.sample_ddim:
            kwargs["s_noise"] = s_noise
    if "solver_type" in spec.options:
        kwargs["solver_type"] = spec.options["solver_type"]
    if spec.options.get("brownian_noise"):
        noise_sampler = noise.brownian(sigmas if full_sigmas is None else full_sigmas)
    else:
        noise_sampler = noise.noise_sampler

    kwargs.update(sampler_options)  # e.g. UniPC's order / variant, A1111's uni_pc_* settings
    latest = {"denoised": x}

    def report(i: int, total: int, x_i: Tensor, denoised: Tensor) -> None:
        latest["denoised"] = denoised
        if callback is not None:
            callback(i, total, x_i, denoised)

    try:
        x = spec.function(denoiser, x, sigmas, noise_sampler=noise_sampler, callback=report, **kwargs)
    except Interrupted:
        return latest["denoised"]
    if spec.vp_space and sigmas[-1] > 0:
        # A1111 returns the CompVis latent at the last timestep, x_vp = x / sqrt(1 + sigma^2).
        x = x / ts.vp_scale(sigmas[-1])
    return x
