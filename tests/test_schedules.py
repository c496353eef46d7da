"""Model schedule and sampling schedules against k-diffusion, diffusers and hand-derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdiffusion_loader import load_kdiffusion
from sdgen.diffusion import schedules as sch
from sdgen.diffusion.schedules import DiscreteSchedule, LCMSchedule

K = load_kdiffusion()
SD = DiscreteSchedule.from_diffusers_scheduler_config({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000})


def kd_model():
    return K.external.DiscreteEpsDDPMDenoiser(lambda x, t: x, SD.alphas_cumprod, quantize=False)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max())


def test_alphas_cumprod_match_diffusers_scaled_linear():
    """Our float64-built betas (as CompVis ldm) against diffusers' float32 ones: 1e-6 relative."""
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert rel_diff(SD.alphas_cumprod, ref) < 2e-6
    linear = DiscreteSchedule.from_diffusers_scheduler_config({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02})
    assert rel_diff(linear.alphas_cumprod, DDPMScheduler(beta_schedule="linear").alphas_cumprod) < 2e-5


def test_scheduler_config_reads_prediction_type_and_rejects_unsupported():
    v = DiscreteSchedule.from_diffusers_scheduler_config({"prediction_type": "v_prediction", "beta_schedule": "scaled_linear"})
    assert v.prediction_type == "v_prediction" and SD.prediction_type == "epsilon"
    for bad, word in [
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"rescale_betas_zero_snr": True}, "zero"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ]:
        with pytest.raises(ValueError, match=word):
            DiscreteSchedule.from_diffusers_scheduler_config(bad)


def test_sigmas_and_t_maps_equal_kdiffusion():
    ref = kd_model()
    assert torch.equal(SD.sigmas, ref.sigmas)
    assert torch.equal(SD.sigma_min, ref.sigma_min) and torch.equal(SD.sigma_max, ref.sigma_max)
    sigma = torch.tensor([0.0292, 0.03, 0.5, 1.0, 3.3, 14.6, 14.6146])
    assert torch.equal(SD.sigma_to_t(sigma), ref.sigma_to_t(sigma))
    assert torch.equal(SD.sigma_to_t(sigma, quantize=True), ref.sigma_to_t(sigma, quantize=True))
    t = torch.tensor([0.0, 0.5, 10.25, 500.0, 998.9, 999.0])
    assert torch.equal(SD.t_to_sigma(t), ref.t_to_sigma(t))
    # Exact table sigmas map back to integer timesteps: what DDIM relies on.
    assert torch.equal(SD.sigma_to_t(SD.sigmas[[1, 251, 501, 751]]), torch.tensor([1.0, 251.0, 501.0, 751.0]))


@pytest.mark.parametrize("steps", [1, 4, 7, 10])
def test_uniform_equals_kdiffusion_get_sigmas(steps):
    assert torch.equal(sch.uniform_sigmas(SD, steps), kd_model().get_sigmas(steps))


def test_karras_exponential_polyexponential_equal_kdiffusion():
    smin, smax = float(SD.sigma_min), float(SD.sigma_max)
    s = K.sampling
    assert torch.equal(sch.karras_sigmas(SD, 6), s.get_sigmas_karras(6, smin, smax))
    assert torch.equal(sch.karras_sigmas(SD, 6, rho=5.0, sigma_min=0.1, sigma_max=10.0), s.get_sigmas_karras(6, 0.1, 10.0, rho=5.0))
    assert torch.equal(sch.exponential_sigmas(SD, 6), s.get_sigmas_exponential(6, smin, smax))
    assert torch.equal(sch.polyexponential_sigmas(SD, 6, rho=2.0), s.get_sigmas_polyexponential(6, smin, smax, rho=2.0))
    with pytest.raises(ValueError, match="sigma_min"):
        sch.karras_sigmas(SD, 4, sigma_min=5.0, sigma_max=1.0)


def test_uniform_and_karras_match_diffusers_euler_sigmas():
    """diffusers' "linspace" spacing interpolates sigma linearly, k-diffusion log-linearly: they
    agree where the timesteps linspace(999, 0, n) are integers (n = 4, 10); Karras agrees always."""
    from diffusers import EulerDiscreteScheduler

    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace")
    same_table = DiscreteSchedule(EulerDiscreteScheduler(**base).alphas_cumprod)
    for steps in (4, 10):
        ref = EulerDiscreteScheduler(**base)
        ref.set_timesteps(steps)
        assert rel_diff(sch.uniform_sigmas(same_table, steps)[:-1], ref.sigmas[:-1]) < 1e-6
        # Our ldm-style float64 betas move the sigmas by a few 1e-6.
        assert rel_diff(sch.uniform_sigmas(SD, steps)[:-1], ref.sigmas[:-1]) < 5e-6
    karras = EulerDiscreteScheduler(**base, use_karras_sigmas=True)
    karras.set_timesteps(7)
    assert rel_diff(sch.karras_sigmas(same_table, 7)[:-1], karras.sigmas[:-1]) < 1e-6
    exponential = EulerDiscreteScheduler(**base, use_exponential_sigmas=True)
    exponential.set_timesteps(7)
    assert rel_diff(sch.exponential_sigmas(same_table, 7)[:-1], exponential.sigmas[:-1]) < 1e-6


def test_a1111_table_schedules_hand_derived():
    """simple, ddim, sgm_uniform and normal land on table entries for these step counts."""
    table = SD.sigmas
    assert torch.equal(sch.simple_sigmas(SD, 4), torch.cat([table[[999, 749, 499, 249]], torch.zeros(1)]))
    assert torch.equal(sch.ddim_uniform_sigmas(SD, 4), torch.cat([table[[751, 501, 251, 1]], torch.zeros(1)]))
    # 1000 // 7 = 142 gives timesteps 1, 143, ..., 995: eight sigmas for 7 steps, as A1111.
    assert torch.equal(sch.ddim_uniform_sigmas(SD, 7)[:-1], table[list(range(995, 0, -142))])
    sgm = sch.sgm_uniform_sigmas(SD, 3)  # timesteps 999, 666, 333 of linspace(999, 0, 4)
    assert rel_diff(sgm[:-1], table[[999, 666, 333]]) < 1e-6 and sgm[-1] == 0
    assert rel_diff(sch.normal_sigmas(SD, 4)[:-1], table[[999, 666, 333, 0]]) < 1e-6


def test_kl_optimal_and_align_your_steps():
    smin, smax = float(SD.sigma_min), float(SD.sigma_max)
    kl = sch.kl_optimal_sigmas(SD, 4)
    hand = [math.tan(k / 4 * math.atan(smin) + (1 - k / 4) * math.atan(smax)) for k in range(5)]
    assert len(kl) == 5 and rel_diff(kl, torch.tensor(hand)) < 1e-6  # ends at sigma_min, as A1111
    published = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    assert torch.allclose(sch.align_your_steps_sigmas(SD, 11), torch.tensor(published + [0.0]))
    four = sch.align_your_steps_sigmas(SD, 4, model_family="sdxl")
    assert len(four) == 5 and math.isclose(float(four[0]), 14.615, rel_tol=1e-6) and math.isclose(float(four[3]), 0.029, rel_tol=1e-5)
    # The middle values interpolate log sigma over the published list's positions.
    xs = np.linspace(0, 1, 11)
    ys = np.log([14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029][::-1])
    assert math.isclose(float(four[1]), math.exp(np.interp(2 / 3, xs, ys)), rel_tol=1e-6)
    assert torch.equal(sch.align_your_steps_sigmas(SD, 4, model_family="sd2"), sch.align_your_steps_sigmas(SD, 4))


def test_timestep_grids_of_ddim_and_unipc():
    table = SD.sigmas
    assert torch.equal(sch.ddim_timestep_sigmas(SD, 4), table[[751, 501, 251, 1]])
    assert len(sch.ddim_timestep_sigmas(SD, 7)) == 8  # 1000 // 7 = 142 gives 8 timesteps in A1111
    unipc = sch.unipc_time_uniform_sigmas(SD, 3)  # times 999, 666, 333, 0
    assert rel_diff(unipc, table[[999, 666, 333, 0]]) < 1e-5


def test_lcm_schedule_hand_derived():
    lcm = LCMSchedule(SD)
    assert torch.equal(lcm.alphas_cumprod, SD.alphas_cumprod[19::20])
    assert torch.equal(lcm.sigma_to_t(lcm.sigmas[[0, 7, 49]]), torch.tensor([19, 159, 999]))
    assert torch.equal(lcm.sigma_to_t(SD.sigmas[[150]]), torch.tensor([159]))  # nearest in log sigma
    # linspace(999, 19, 8) lands on the table indices 49, 42, ..., 0.
    assert rel_diff(lcm.uniform(8)[:-1], lcm.sigmas.flip(0)[::7]) < 1e-6


def test_beta_schedule_matches_scipy_quantiles():
    """A1111's beta schedule: sigma_min + Beta(0.6, 0.6).ppf(1 - linspace(0, 1, n)) * (sigma_max - sigma_min)."""
    from scipy import stats

    smin, smax = float(SD.sigma_min), float(SD.sigma_max)
    for alpha, beta in [(0.6, 0.6), (0.3, 0.9)]:
        ref = [smin + stats.beta.ppf(q, alpha, beta) * (smax - smin) for q in 1 - np.linspace(0, 1, 7)] + [0.0]
        ours = sch.beta_sigmas(SD, 7, alpha=alpha, beta=beta)
        assert torch.equal(ours, torch.tensor(ref, dtype=torch.float32)) or rel_diff(ours, torch.tensor(ref)) < 1e-6
