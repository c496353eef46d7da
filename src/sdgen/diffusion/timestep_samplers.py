"""DDIM, UniPC and LCM: AUTOMATIC1111 1.10's own samplers (k-diffusion has none), in sigma form.

A1111 runs DDIM and UniPC in the variance-preserving space of CompVis (`x_vp = x / sqrt(1 + sigma^2)`)
over its own timestep grids (`sd_samplers_timesteps_impl.py`, `models/diffusion/uni_pc`). The
same steps written over sigmas take the same denoiser as every other sampler: the grids are
schedule functions (`ddim_timestep_sigmas`, `unipc_time_uniform_sigmas`) and the change of
space at the start and end is done by `registry.sample` for samplers marked `vp_space`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sdgen.diffusion.samplers import (
    Callback,
    DenoiseFn,
    NoiseSampler,
    report_step,
    default_noise_sampler,
    sample_euler_ancestral,
)


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021) with noise scale eta, written over sigmas.

    With x_vp = sqrt(a) x, a DDIM step x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z
    is exactly an ancestral Euler step: sqrt(1 - a_prev - s^2) / sqrt(a_prev) is k-diffusion's
    sigma_down and s / sqrt(a_prev) its sigma_up. eta = 0 is plain Euler; eta = 1 is "Euler a".
    """
    return sample_euler_ancestral(denoiser, x, sigmas, noise_sampler=noise_sampler, callback=callback, eta=eta)


@torch.no_grad()
def sample_lcm(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023): denoise, then re-noise to the next sigma."""
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        report_step(callback, i, sigmas, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def _unipc_update(
    x: Tensor,
    model_prev: list[Tensor],
    lambda_prev: list[Tensor],
    sigma_prev: Tensor,
    sigma: Tensor,
    order: int,
    variant: str,
    corrector_fn: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor, Tensor | None]:
    """One UniPC step (Zhao et al. 2023, data prediction, B(h) variants): predictor, then optional corrector."""
    lambda_t = -sigma.log()
    h = lambda_t - lambda_prev[-1]
    m0 = model_prev[-1]
    rks, d1s = [], []
    for i in range(1, order):
        rk = (lambda_prev[-(i + 1)] - lambda_prev[-1]) / h
        rks.append(rk)
        d1s.append((model_prev[-(i + 1)] - m0) / rk)
    rks = torch.stack(rks + [torch.ones_like(h)])

    hh = -h  # data prediction runs the exponential integrator in -lambda
    h_phi_1 = torch.expm1(hh)
    B_h = hh if variant == "bh1" else torch.expm1(hh)
    # b_i = i! phi_{i+1}(hh) / B(h), the right-hand side of the order conditions.
    h_phi_k, factorial, rows, b = h_phi_1 / hh - 1, 1, [], []
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(rows), torch.stack(b)

    # In sigma form the data-prediction update reads x_t = (sigma_t / sigma_s) x - (e^-h - 1) m0 - B(h) * residual.
    x_base = (sigma / sigma_prev) * x - h_phi_1 * m0
    d1s = torch.stack(d1s, dim=1) if d1s else None
    if d1s is None:
        x_t = x_base
    else:
        # Order 2 uses the fixed predictor coefficient 1/2 (UniPC paper, section 3.2).
        if order == 2:
            rhos_p = torch.tensor([0.5], dtype=x.dtype, device=x.device)
        else:
            rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_t = x_base - B_h * torch.einsum("k,bk...->b...", rhos_p.to(x.dtype), d1s)
    if corrector_fn is None:
        return x_t, None
    model_t = corrector_fn(x_t)
    rhos_c = torch.tensor([0.5], dtype=x.dtype, device=x.device) if order == 1 else torch.linalg.solve(R, b)
    corr = torch.einsum("k,bk...->b...", rhos_c[:-1].to(x.dtype), d1s) if d1s is not None else 0
    x_t = x_base - B_h * (corr + rhos_c[-1] * (model_t - m0))
    return x_t, model_t


@torch.no_grad()
def sample_unipc(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
    order: int = 3,
    variant: str = "bh1",
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC multistep predictor-corrector (Zhao et al. 2023), as A1111's uni_pc module runs it.

    The model output at each new point, taken for the corrector, is reused by the next step,
    so a run costs one evaluation per step. No corrector after the last step. A step to
    sigma 0 (a schedule ending in 0) returns the last denoised estimate: UniPC's update is
    singular there.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    steps = len(sigmas) - 1
    # A1111 refuses order >= steps; a lower order for short runs is the useful reading.
    order = max(1, min(order, steps))
    s_in = x.new_ones([x.shape[0]])
    model_prev = [denoiser(x, sigmas[0] * s_in)]
    lambda_prev = [-sigmas[0].log()]
    for step in range(1, steps + 1):
        report_step(callback, step - 1, sigmas, x, model_prev[-1])
        sigma, sigma_prev = sigmas[step], sigmas[step - 1]
        if sigma == 0:
            x = model_prev[-1]
            break
        step_order = min(step, order)
        if lower_order_final and step >= order:
            step_order = min(order, steps + 1 - step)
        corrector_fn = None if step == steps else (lambda x_t, sigma=sigma: denoiser(x_t, sigma * s_in))
        x, model_x = _unipc_update(x, model_prev, lambda_prev, sigma_prev, sigma, step_order, variant, corrector_fn)
        if step < steps:
            model_prev = (model_prev + [model_x])[-order:]
            lambda_prev = (lambda_prev + [-sigma.log()])[-order:]
    return x


def vp_scale(sigma: Tensor | float) -> float:
    """sqrt(1 + sigma^2): x_ve = x_vp * vp_scale(sigma) at noise level sigma."""
    return math.sqrt(1.0 + float(sigma) ** 2)
