"""Denoisers D(x, sigma, **cond) -> denoised, wrapping a model function (k-diffusion's external.py design).

A model function is `model_fn(x_in, t, **cond) -> output`: the U-Net with its conditioning as
keyword tensors batched along dim 0 (`context=...`, SDXL's `text_embeds=...`, `time_ids=...`).
The denoiser feeds it the latent scaled to unit variance, `x_in = x / sqrt(sigma^2 + 1)`, at
the fractional timestep `t = sigma_to_t(sigma)`: AUTOMATIC1111 1.10 builds k-diffusion's
`CompVisDenoiser(model, quantize=opts.enable_quantization)` and that option is off by default,
so the U-Net sees timesteps such as 666.33 between the table entries. `quantize=True` rounds
to the nearest table timestep instead (A1111's "Enable quantization in K samplers").

Guidance and masking are denoiser transforms: `cfg_denoiser` and `masked_denoiser` return
another denoiser, so any sampler works with them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor

from sdgen.diffusion.schedules import DiscreteSchedule, LCMSchedule

ModelFn = Callable[..., Tensor]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor: ...


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Shape (batch,) -> (batch, 1, 1, ...) to broadcast against a latent."""
    return v[(...,) + (None,) * (ndim - v.ndim)]


class EpsDenoiser:
    """Eps-prediction model as a denoiser: denoised = x - sigma * eps (k-diffusion DiscreteEpsDDPMDenoiser)."""

    def __init__(self, model_fn: ModelFn, schedule: DiscreteSchedule, quantize: bool = False) -> None:
        self.model_fn, self.schedule, self.quantize = model_fn, schedule, quantize

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        sigma_x = append_dims(sigma, x.ndim)
        c_in = 1 / (sigma_x**2 + 1.0) ** 0.5
        eps = self.model_fn(x * c_in, self.schedule.sigma_to_t(sigma, self.quantize), **cond)
        return x + eps * -sigma_x


class VDenoiser:
    """v-prediction model as a denoiser (Salimans & Ho 2022): c_skip x + c_out v, k-diffusion DiscreteVDDPMDenoiser."""

    def __init__(self, model_fn: ModelFn, schedule: DiscreteSchedule, quantize: bool = False) -> None:
        self.model_fn, self.schedule, self.quantize = model_fn, schedule, quantize

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        sigma_x = append_dims(sigma, x.ndim)
        c_skip = 1.0 / (sigma_x**2 + 1.0)
        c_out = -sigma_x * 1.0 / (sigma_x**2 + 1.0) ** 0.5
        c_in = 1 / (sigma_x**2 + 1.0) ** 0.5
        v = self.model_fn(x * c_in, self.schedule.sigma_to_t(sigma, self.quantize), **cond)
        return v * c_out + x * c_skip


class LCMDenoiser:
    """Latent Consistency Model (Luo et al. 2023) as AUTOMATIC1111 1.10's LCMCompVisDenoiser runs it."""

    def __init__(self, model_fn: ModelFn, schedule: DiscreteSchedule) -> None:
        if schedule.prediction_type != "epsilon":
            raise ValueError("the LCM sampler needs an epsilon-prediction model; pick another sampler for v-prediction")
        self.model_fn = model_fn
        self.schedule = schedule if isinstance(schedule, LCMSchedule) else LCMSchedule(schedule)

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        sigma_x = append_dims(sigma, x.ndim)
        t = self.schedule.sigma_to_t(sigma)
        eps = self.model_fn(x * (1 / (sigma_x**2 + 1.0) ** 0.5), t, **cond)
        denoised = x + eps * -sigma_x
        # Consistency-model boundary condition with sigma_data 0.5 and timesteps scaled by 10.
        # A1111 applies c_skip to the unscaled latent; c_skip is below 1e-5 for t >= 19.
        scaled_t = append_dims(t, x.ndim) * 10.0
        c_skip = 0.5**2 / (scaled_t**2 + 0.5**2)
        c_out = scaled_t / (scaled_t**2 + 0.5**2) ** 0.5
        return c_out * denoised + c_skip * x


def make_denoiser(
    model_fn: ModelFn,
    schedule: DiscreteSchedule,
    *,
    lcm: bool = False,
    quantize: bool = False,
) -> Denoiser:
    """The denoiser for the schedule's prediction type (or LCM's, which keeps its own 50-level schedule)."""
    if lcm:
        return LCMDenoiser(model_fn, schedule)
    if schedule.prediction_type == "v_prediction":
        return VDenoiser(model_fn, schedule, quantize)
    return EpsDenoiser(model_fn, schedule, quantize)


def cfg_denoiser(
    denoiser: Denoiser,
    cond: Mapping[str, Tensor],
    uncond: Mapping[str, Tensor] | None,
    scale: float,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + (cond - uncond) * scale, one batched call."""
    if uncond is None or scale == 1.0:
        # The guided result equals the conditional one; skip the unconditional pass.
        return lambda x, sigma: denoiser(x, sigma, **cond)
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    same_shapes = all(cond[k].shape[1:] == uncond[k].shape[1:] for k in cond)

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        if same_shapes:
            # A1111's order: conditional rows first, unconditional rows last.
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            out_cond, out_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        else:
            # Prompts of different lengths (e.g. 77 vs 154 tokens) cannot share a batch.
            out_cond, out_uncond = denoiser(x, sigma, **cond), denoiser(x, sigma, **uncond)
        return out_uncond + (out_cond - out_uncond) * scale

    return guided


def masked_denoiser(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    known: Tensor,
    keep: Tensor,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Inpainting by blending: keep the known latent where keep = 1 (AUTOMATIC1111's mask/nmask blend)."""
    inpaint = 1.0 - keep
    return lambda x, sigma: known * keep + inpaint * denoiser(x, sigma)
