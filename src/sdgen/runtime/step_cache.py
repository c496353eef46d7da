"""Step caching for the U-Net: DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free").

Between neighbouring sampling steps the U-Net's deep features change little; the shallow ones
carry the detail. Every `interval`-th call runs the whole U-Net and keeps the feature map that
enters the last up level; the calls in between run only the first down level and the last up
level (with that level's fresh skips) on top of the kept map. Off by default: it trades image
fidelity for speed (bench/RESULTS.md reports both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepCache:
    """Per-U-Net cache of the deep feature map, renewed every `interval` calls and at each new sampling run."""

    interval: int = 3
    _calls: int = 0
    _last_timestep: float | None = None
    _deep: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"step cache interval: expected an integer >= 1, got {self.interval!r}")

    @staticmethod
    def key(x: torch.Tensor, context: torch.Tensor) -> tuple:
        """Calls that may share a kept map: same latent and context shapes (a batch with guidance, one size)."""
        return tuple(x.shape), tuple(context.shape), x.dtype

    def lookup(self, timesteps: torch.Tensor, key: tuple) -> torch.Tensor | None:
        """The kept deep map when this call may reuse it, else None (the call runs the whole U-Net)."""
        timestep = float(torch.as_tensor(timesteps).max())
        # samplers walk from high noise down: a timestep that does not decrease starts a new run
        if self._last_timestep is None or timestep >= self._last_timestep:
            self._calls = 0
            self._deep.clear()
        self._last_timestep = timestep
        reuse = self._calls % self.interval != 0 and key in self._deep
        self._calls += 1
        return self._deep[key] if reuse else None

    def store(self, key: tuple, deep: torch.Tensor) -> None:
        self._deep[key] = deep

    def reset(self) -> None:
        self._calls, self._last_timestep = 0, None
        self._deep.clear()
