"""Noise levels: the model's discrete schedule and the sampling schedules (sigma lists) built on it.

A DDPM-trained model (Stable Diffusion) knows 1000 noise levels `alphas_cumprod[t]`. In
k-diffusion's variance-exploding view a latent at level t is `x = x0 + sigma * noise` with
`sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)`. A sampling schedule is a descending
list of sigmas, normally ending in 0 (fully denoised). The schedule functions here are
AUTOMATIC1111 1.10's (`modules/sd_schedulers.py`), which call k-diffusion's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """alphas_cumprod of SD's "scaled_linear" betas (sqrt-linear), as CompVis ldm computes them."""
    # ldm builds the betas in float64 and stores alphas_cumprod as float32; diffusers builds
    # them in float32, which moves alphas_cumprod by about 1e-7 relative.
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def linear_alphas_cumprod(beta_start: float, beta_end: float, num_train_timesteps: int) -> Tensor:
    """alphas_cumprod of DDPM's "linear" betas (Ho et al. 2020)."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


class DiscreteSchedule:
    """The model's noise levels in sigma form, with k-diffusion's `DiscreteSchedule` t <-> sigma maps."""

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.float()
        self.prediction_type = prediction_type
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # ascending in t
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_diffusers_scheduler_config(cls, config: Mapping) -> "DiscreteSchedule":
        """Read the training schedule and prediction type of a diffusers `scheduler_config.json`."""
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config: trained_betas is not supported; use beta_start/beta_end/beta_schedule")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config: rescale_betas_zero_snr (zero terminal SNR) is not supported")
        kind = config.get("beta_schedule", "scaled_linear")
        args = (
            float(config.get("beta_start", 0.00085)),
            float(config.get("beta_end", 0.012)),
            int(config.get("num_train_timesteps", 1000)),
        )
        if kind == "scaled_linear":
            alphas_cumprod = scaled_linear_alphas_cumprod(*args)
        elif kind == "linear":
            alphas_cumprod = linear_alphas_cumprod(*args)
        else:
            raise ValueError(f"scheduler config: beta_schedule {kind!r} is not supported; use scaled_linear or linear")
        return cls(alphas_cumprod, config.get("prediction_type", "epsilon"))

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Fractional timestep of each sigma by linear interpolation in log sigma (k-diffusion)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        # low_idx: the last table entry at or below log_sigma, kept one short of the end.
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at a fractional timestep, interpolating log sigma (k-diffusion)."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()

    def uniform(self, steps: int) -> Tensor:
        """k-diffusion's `get_sigmas(n)`: sigmas at timesteps linspace(T-1, 0, n), then 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, steps)
        return append_zero(self.t_to_sigma(t))


class LCMSchedule(DiscreteSchedule):
    """AUTOMATIC1111's view of an LCM model: only the 50 timesteps it was distilled on (20k + 19)."""

    def __init__(self, base: DiscreteSchedule, original_steps: int = 50) -> None:
        total = len(base.alphas_cumprod)
        self.skip_steps = total // original_steps
        # Entry k holds timestep k * skip + (skip - 1): 19, 39, ..., 999 for SD.
        picked = total - 1 - self.skip_steps * torch.arange(original_steps - 1, -1, -1)
        super().__init__(base.alphas_cumprod[picked], base.prediction_type)

    def sigma_to_t(self, sigma: Tensor, quantize: bool = True) -> Tensor:
        """The model timestep of the nearest table sigma (always quantized, as A1111's LCM denoiser)."""
        dists = sigma.log() - self.log_sigmas.to(sigma.device)[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip_steps + (self.skip_steps - 1)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        index = torch.clamp(((t - (self.skip_steps - 1)) / self.skip_steps).float(), min=0, max=len(self.sigmas) - 1)
        return super().t_to_sigma(index)

    def uniform(self, steps: int) -> Tensor:
        start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
        return append_zero(self.t_to_sigma(torch.linspace(start, end, steps)))


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# Schedule functions: fn(schedule, steps, **options) -> sigmas, as AUTOMATIC1111 1.10 defines them.

def uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """A1111 "Uniform" (and "Automatic" for most samplers): k-diffusion's get_sigmas(steps)."""
    return schedule.uniform(steps)


def karras_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    sigma_min, sigma_max = _bounds(schedule, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Sigmas evenly spaced in log sigma (k-diffusion get_sigmas_exponential)."""
    sigma_min, sigma_max = _bounds(schedule, sigma_min, sigma_max)
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def polyexponential_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    rho: float = 1.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Log sigma as a polynomial of the step ramp (k-diffusion get_sigmas_polyexponential)."""
    sigma_min, sigma_max = _bounds(schedule, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, steps) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def sgm_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Stability's sgm discretisation: `steps` of `steps + 1` evenly spaced timesteps, then 0."""
    start, end = schedule.sigma_to_t(schedule.sigma_max), schedule.sigma_to_t(schedule.sigma_min)
    sigmas = schedule.t_to_sigma(torch.linspace(start, end, steps + 1)[:-1])
    return append_zero(sigmas)


def kl_optimal_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Sigmas evenly spaced in arctan(sigma) (Sabour et al. 2024, "Align Your Steps" appendix)."""
    # As in A1111 1.10 this ends at sigma_min, not 0: the last step leaves that much noise.
    sigma_min, sigma_max = _bounds(schedule, sigma_min, sigma_max)
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    step = torch.arange(steps + 1) / steps
    return torch.tan(step * alpha_min + (1.0 - step) * alpha_max)


# NVIDIA's published 10-step "Align Your Steps" sigmas (11 values) for SD 1.5 and SDXL.
_AYS_SIGMAS = {
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def align_your_steps_sigmas(schedule: DiscreteSchedule, steps: int, model_family: str = "sd1") -> Tensor:
    """Align Your Steps (Sabour et al. 2024): the published sigmas, log-linearly resampled to `steps`."""
    # As A1111: SDXL models (base, refiner) get the SDXL list, every other model the SD 1.5 one.
    sigmas = _AYS_SIGMAS["sdxl" if model_family.lower().startswith("sdxl") else "sd1"]
    if steps == len(sigmas):
        return torch.tensor(sigmas + [0.0], dtype=torch.float32)
    # A1111 resamples the 11 values to `steps` values (so `steps` equal to 11 keeps all of them).
    log_reversed = np.log(sigmas[::-1])
    resampled = np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(sigmas)), log_reversed))[::-1]
    return torch.tensor(np.append(resampled, 0.0), dtype=torch.float32)


def simple_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """ComfyUI's "simple": every (T / steps)-th table sigma from the top, then 0."""
    stride = len(schedule.sigmas) / steps
    sigmas = [float(schedule.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def normal_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """ComfyUI's "normal": `steps` timesteps evenly spaced from sigma_max's to sigma_min's, then 0."""
    start, end = schedule.sigma_to_t(schedule.sigma_max), schedule.sigma_to_t(schedule.sigma_min)
    sigmas = [float(schedule.t_to_sigma(t)) for t in torch.linspace(start, end, steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def ddim_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """ComfyUI's "ddim_uniform" (A1111 schedule "DDIM"): table sigmas 1, 1 + T//steps, ..., then 0."""
    # May give more than `steps` sigmas when T is not a multiple of steps, as in A1111.
    stride = max(len(schedule.sigmas) // steps, 1)
    sigmas = [float(s) for s in schedule.sigmas[1::stride]][::-1]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def beta_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    alpha: float = 0.6,
    beta: float = 0.6,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Beta schedule (Lee et al. 2024, "Beta Sampling is All You Need"): sigmas at Beta(alpha, beta) quantiles."""
    # A1111 spaces sigma itself (not timesteps) by Beta(alpha, beta) quantiles; 0.6/0.6 are its defaults.
    sigma_min, sigma_max = _bounds(schedule, sigma_min, sigma_max)
    quantiles = [beta_ppf(float(q), alpha, beta) for q in 1 - np.linspace(0, 1, steps)]
    return torch.tensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0], dtype=torch.float32)


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the regularized incomplete beta function I_x(a, b), by bisection."""
    if q <= 0.0 or q >= 1.0:
        return 0.0 if q <= 0.0 else 1.0
    low, high = 0.0, 1.0
    for _ in range(60):  # 2^-60: below float64 resolution of x in [0, 1]
        mid = (low + high) / 2
        low, high = (mid, high) if regularized_incomplete_beta(mid, a, b) < q else (low, mid)
    return (low + high) / 2


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) from its continued fraction (DLMF 8.17.22), evaluated by the modified Lentz method."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)  # the fraction converges fast below the mean
    log_beta_ab = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - log_beta_ab
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            coeff = 1.0
        elif i % 2:  # d_{2m+1}
            coeff = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_{2m}
            coeff = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coeff * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + coeff / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * (f - 1.0)


def ddim_timestep_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """AUTOMATIC1111's DDIM timesteps 1, 1 + 1000//steps, ... as descending sigmas, without a final 0."""
    # A1111's DDIM evaluates the model at every timestep but the lowest one and stops there:
    # with 4 steps it calls the model at 751, 501 and 251 and returns the latent at t = 1.
    total = len(schedule.sigmas)
    if steps > total:
        raise ValueError(f"DDIM takes at most {total} steps, got {steps}")
    timesteps = torch.clip(torch.arange(0, total, total // steps) + 1, 0, total - 1)
    return schedule.sigmas[timesteps.flip(0)]


def unipc_time_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """AUTOMATIC1111's UniPC "time_uniform" grid: steps + 1 times from T - 1 to 0, without a final 0."""
    total = len(schedule.sigmas)
    # A1111 (uni_pc.py) spaces continuous times from 1 to 1/T and gives the model (t - 1/T) * T;
    # computing it the same way keeps the same float32 timesteps (999, 749.25, ...).
    t_continuous = torch.linspace(1.0, 1.0 / total, steps + 1)
    return schedule.t_to_sigma((t_continuous - 1.0 / total) * total)


def _bounds(schedule: DiscreteSchedule, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    sigma_min = float(schedule.sigma_min) if sigma_min is None else float(sigma_min)
    sigma_max = float(schedule.sigma_max) if sigma_max is None else float(sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return sigma_min, sigma_max
