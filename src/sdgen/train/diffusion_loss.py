"""The denoising objective Stable Diffusion is trained with (Ho et al. 2020), eps-prediction."""

from __future__ import annotations

import torch

from sdgen.diffusion.schedules import scaled_linear_alphas_cumprod


class NoiseObjective:
    """x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) eps; the model predicts eps; Min-SNR-5 weighting
    (Hang et al. 2023) speeds up convergence without changing what the model learns to predict."""

    def __init__(self, snr_gamma: float | None = 5.0) -> None:
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.snr_gamma = snr_gamma

    def __call__(self, model, latents: torch.Tensor, context: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        batch = latents.shape[0]
        t = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        ac = self.alphas_cumprod[t].view(batch, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
        predicted = model(noisy, t.float(), context).float()
        per_sample = (predicted - noise).pow(2).mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            snr = ac.view(batch) / (1 - ac.view(batch))
            per_sample = per_sample * torch.clamp(snr, max=self.snr_gamma) / snr
        return per_sample.mean()
