"""Seeded noise with AUTOMATIC1111's conventions (`modules/rng.py`, "RNG source: CPU").

Image i of a batch owns a CPU generator seeded with its seed (seed + i for a request). Its
first draw is the initial latent noise; ancestral samplers continue the same generator, one
draw per image per step, so an image comes out the same whatever batch it is generated in.
Noise is drawn on the CPU in float32 and then moved, so it does not depend on the device.
SDE samplers use one Brownian tree per image seeded with the image's seed, as A1111 does
unless "Do not make DPM++ SDE deterministic across different batch sizes" is set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchsde
from torch import Tensor


def slerp(t: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation of two noises along dim 1, A1111's variation-seed blend."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        # Nearly parallel: A1111 falls back to this blend (note the weights as it has them).
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


class ImageNoise:
    """Per-image seeded noise for one batch: `initial()` latent noise, then `noise_sampler` draws."""

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        *,
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        eta_noise_seed_delta: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not seeds:
            raise ValueError("ImageNoise needs at least one seed")
        if not 0.0 <= subseed_strength <= 1.0:
            raise ValueError(f"subseed_strength must be between 0 and 1, got {subseed_strength}")
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(int(n) for n in shape)
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = subseed_strength
        self.eta_noise_seed_delta = int(eta_noise_seed_delta)
        self.device, self.dtype = torch.device(device), dtype
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        self._initial: Tensor | None = None

    def initial(self) -> Tensor:
        """The initial latent noise, (batch, *shape): each generator's first draw."""
        if self._initial is None:
            images = []
            for i, generator in enumerate(self.generators):
                noise = torch.randn(self.shape, generator=generator)
                if self.subseeds is not None and self.subseed_strength != 0:
                    subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                    subnoise = torch.randn(self.shape, generator=torch.Generator("cpu").manual_seed(subseed))
                    noise = slerp(self.subseed_strength, noise, subnoise)
                images.append(noise)
            if self.eta_noise_seed_delta:
                # A1111's ENSD: later draws come from generators reseeded with seed + delta.
                delta = self.eta_noise_seed_delta
                self.generators = [torch.Generator("cpu").manual_seed(s + delta) for s in self.seeds]
            self._initial = torch.stack(images).to(self.device, self.dtype)
        return self._initial

    def next(self) -> Tensor:
        """The next draw of every image's generator, (batch, *shape)."""
        self.initial()
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device, self.dtype)

    def noise_sampler(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """Fresh unit noise for an ancestral step (the step's sigmas do not matter)."""
        return self.next()

    def brownian(self, sigmas: Tensor) -> "BrownianNoise":
        """Brownian-tree noise over the range of `sigmas` (the full schedule, also for img2img)."""
        positive = sigmas[sigmas > 0]
        return BrownianNoise(self.seeds, self.shape, positive.min(), sigmas.max(), device=self.device, dtype=self.dtype)


class BrownianNoise:
    """One torchsde Brownian tree per image (k-diffusion BrownianTreeNoiseSampler with a seed list)."""

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        sigma_min: Tensor,
        sigma_max: Tensor,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        t0, t1 = torch.as_tensor(sigma_min).cpu(), torch.as_tensor(sigma_max).cpu()
        self.sign = 1
        if t1 < t0:
            t0, t1, self.sign = t1, t0, -1
        w0 = torch.zeros(tuple(shape))
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]
        self.device, self.dtype = torch.device(device), dtype

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """Unit-variance noise: the tree's increment over [sigma_next, sigma] / sqrt(|sigma - sigma_next|)."""
        t0, t1 = torch.as_tensor(sigma).cpu(), torch.as_tensor(sigma_next).cpu()
        sign = self.sign
        if t1 < t0:
            t0, t1, sign = t1, t0, -sign
        w = torch.stack([tree(t0, t1) for tree in self.trees]) * sign
        return (w / (t1 - t0).abs().sqrt()).to(self.device, self.dtype)
