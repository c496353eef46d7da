"""Token merging for Stable Diffusion (ToMe; Bolya and Hoffman 2023), off by default.

Before self-attention at the U-Net's highest-resolution attention level, a share of the tokens
is averaged into the tokens most similar to them; attention runs on what is left, and every
merged token takes its partner's result back. The image changes (bench/RESULTS.md has the
measured difference); A1111 calls the share "Token merging ratio".

Each 2x2 cell of the latent grid keeps its top-left token as a destination (fixed, so an image
depends only on its seed); the others are sources, and the `ratio * tokens` sources with the
most similar destination (cosine similarity) are merged into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


MAX_RATIO = 0.75  # every source token: three of each 2x2 cell


def check_ratio(ratio: float) -> float:
    """The share of tokens to merge: 0 (off) up to MAX_RATIO (every source token)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= MAX_RATIO:
        raise ValueError(f"token merging ratio: expected a number from 0 to {MAX_RATIO}, got {ratio!r}")
    return float(ratio)


@dataclass(frozen=True)
class TokenMerge:
    """One merge plan for a batch of token sequences: `merge` shortens them, `unmerge` restores."""

    tokens: int
    sources: torch.Tensor  # (S,) positions of the source tokens
    destinations: torch.Tensor  # (D,) positions of the destination tokens
    kept: torch.Tensor  # (B, S - r) indices into `sources` of the sources left alone
    merged: torch.Tensor  # (B, r) indices into `sources` of the sources merged away
    partner: torch.Tensor  # (B, r) index into `destinations` each merged source went to

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): the kept sources, then the destinations averaged with theirs."""
        channels = x.shape[-1]
        sources, destinations = x[:, self.sources], x[:, self.destinations]
        kept = sources.gather(1, _expand(self.kept, channels))
        merged = sources.gather(1, _expand(self.merged, channels))
        destinations = destinations.scatter_reduce(1, _expand(self.partner, channels), merged, reduce="mean",
                                                   include_self=True)
        return torch.cat([kept, destinations], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): each merged source gets its destination's value."""
        batch, _, channels = y.shape
        kept, destinations = y[:, :self.kept.shape[1]], y[:, self.kept.shape[1]:]
        out = y.new_empty(batch, self.tokens, channels)
        out[:, self.destinations] = destinations
        out.scatter_(1, _expand(self.sources[self.kept], channels), kept)
        out.scatter_(1, _expand(self.sources[self.merged], channels),
                     destinations.gather(1, _expand(self.partner, channels)))
        return out


def _expand(index: torch.Tensor, channels: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, channels)


def plan_merge(x: torch.Tensor, height: int, width: int, ratio: float) -> TokenMerge | None:
    """The merge plan for (B, height * width, C) tokens, or None when nothing would be merged."""
    batch, tokens, _ = x.shape
    if ratio <= 0 or tokens != height * width or min(height, width) < 2:
        return None
    grid = torch.zeros(height, width, dtype=torch.bool, device=x.device)
    grid[::2, ::2] = True
    positions = torch.arange(tokens, device=x.device)
    destinations, sources = positions[grid.flatten()], positions[~grid.flatten()]
    count = min(int(tokens * ratio), len(sources))
    if count == 0:
        return None
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    similarity = unit[:, sources] @ unit[:, destinations].transpose(1, 2)  # (B, S, D)
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged = order[:, :count]
    return TokenMerge(tokens=tokens, sources=sources, destinations=destinations, kept=order[:, count:],
                      merged=merged, partner=partner.gather(1, merged))
