"""The fine-tuning loss: Stable Diffusion's denoising objective (Ho et al. 2020) per sample, for
eps- and v-prediction models (Salimans & Ho 2022), so DreamBooth can weigh instance and prior
samples apart (Ruiz et al. 2022)."""

from __future__ import annotations

import torch

from sdgen.diffusion.schedules import DiscreteSchedule


def denoising_loss(unet: torch.nn.Module, latents: torch.Tensor, context: torch.Tensor,
                   schedule: DiscreteSchedule, generator: torch.Generator,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """Per-sample MSE (batch,) between the U-Net's output and its target at a random timestep.

    x_t = sqrt(ac) x0 + sqrt(1 - ac) eps; the target is eps, or v = sqrt(ac) eps - sqrt(1 - ac) x0.
    `snr_gamma`: Min-SNR weighting (Hang et al. 2023), min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v).
    """
    alphas_cumprod = schedule.alphas_cumprod
    batch = latents.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (batch,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    ac = alphas_cumprod[t].to(latents).view(batch, 1, 1, 1)
    noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
    v_prediction = schedule.prediction_type == "v_prediction"
    target = ac.sqrt() * noise - (1 - ac).sqrt() * latents if v_prediction else noise
    predicted = unet(noisy, t.float().to(latents.device), context).float()
    per_sample = (predicted - target.float()).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = (ac / (1 - ac)).view(batch).float()
        per_sample = per_sample * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_prediction else snr)
    return per_sample
