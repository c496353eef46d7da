"""The U-Net of the Stable Diffusion x4 upscaler (Stability AI, `x4-upscaling.yaml`): SD's U-Net plus two things.

- The noise level of the low-resolution conditioning image is a class label: an embedding
  table (`class_embedding`, diffusers' `num_class_embeds` with `class_embed_type` null) whose
  row is added to the time embedding.
- On the levels listed in `only_cross_attention` the first attention of every transformer
  block attends to the text too (LDM's `disable_self_attn`), so both attentions are cross-attention.
The low-resolution image itself enters as 3 extra input channels (`in_channels` 7).
Parameter names are those of the diffusers folder, like the plain U-Net's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdgen.models.layers import Attention, TransformerBlock
from sdgen.models.unet import UNet, UNetConfig


@dataclass(frozen=True)
class UpscalerUNetConfig:
    """A UNetConfig plus the noise-level embedding size and the cross-attention-only levels (down order)."""

    unet: UNetConfig
    num_class_embeds: int = 1000
    only_cross_attention: tuple[bool, ...] = (True, True, True, False)

    def __post_init__(self) -> None:
        if isinstance(self.num_class_embeds, bool) or not isinstance(self.num_class_embeds, int) \
                or self.num_class_embeds < 1:
            raise ValueError(f"num_class_embeds: expected a positive integer, got {self.num_class_embeds!r}")
        if len(self.only_cross_attention) != self.unet.levels:
            raise ValueError(f"only_cross_attention: give one entry per level ({self.unet.levels}), "
                             f"got {self.only_cross_attention}")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "UpscalerUNetConfig":
        """Read the x4 upscaler's `unet/config.json`; ValueError names any field we do not support."""
        config = dict(config)
        if config.pop("class_embed_type", None) is not None:
            raise ValueError("unet config class_embed_type: only null (a plain embedding table) is supported")
        if config.pop("class_embeddings_concat", False):
            raise ValueError("unet config class_embeddings_concat=true is not supported")
        if config.pop("mid_block_only_cross_attention", None):
            raise ValueError("unet config mid_block_only_cross_attention=true is not supported")
        num_class_embeds = config.pop("num_class_embeds", None)
        if num_class_embeds is None:
            raise ValueError("unet config num_class_embeds is missing: this is not an x4 upscaler U-Net")
        only_cross = config.pop("only_cross_attention", False)
        unet = UNetConfig.from_diffusers(config)
        if isinstance(only_cross, bool):
            only_cross = (only_cross,) * unet.levels
        return cls(unet, num_class_embeds, tuple(bool(v) for v in only_cross))

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `unet/config.json` dict."""
        return {**self.unet.to_diffusers(), "num_class_embeds": self.num_class_embeds, "class_embed_type": None,
                "only_cross_attention": list(self.only_cross_attention)}


class CrossOnlyTransformerBlock(TransformerBlock):
    """A transformer block whose first attention also reads the text context (no self-attention)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool = False):
        super().__init__(dim, heads, head_dim, context_dim, upcast)
        self.attn1 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)

    def forward(self, x: torch.Tensor, context: torch.Tensor, merge=None) -> torch.Tensor:
        # no self-attention, so nothing for token merging to shorten: `merge` is ignored
        x = x + self.attn1(self.norm1(x), context)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class UpscalerUNet(UNet):
    """The x4 upscaler's U-Net: call with `added_cond={"class_labels": noise_level}` (integers, shape (batch,))."""

    def __init__(self, cfg: UpscalerUNetConfig):
        super().__init__(cfg.unet)
        self.upscaler_cfg = cfg
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, cfg.unet.temb_dim)
        levels = cfg.unet.levels
        for level, cross_only in enumerate(cfg.only_cross_attention):
            if not cross_only:
                continue
            # down level `level` and its mirror among the up blocks (which run deepest first)
            for stage in (self.down_blocks[level], self.up_blocks[levels - 1 - level]):
                for transformer in stage.attentions:
                    transformer.transformer_blocks = nn.ModuleList(
                        [_cross_only(block, cfg.unet) for block in transformer.transformer_blocks])

    def time_embed(self, timesteps: torch.Tensor, batch: int, dtype: torch.dtype,
                   added_cond: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The time embedding plus the noise level's embedding row (diffusers adds `class_emb` to `emb`)."""
        added = dict(added_cond or {})
        labels = added.pop("class_labels", None)
        if labels is None:
            raise ValueError("the x4 upscaler U-Net needs added_cond={'class_labels': noise levels (batch,)}")
        emb = super().time_embed(timesteps, batch, dtype, added or None)
        labels = torch.as_tensor(labels, device=self.class_embedding.weight.device).long().reshape(-1).expand(batch)
        return emb + self.class_embedding(labels).to(dtype)


def _cross_only(block: TransformerBlock, cfg: UNetConfig) -> CrossOnlyTransformerBlock:
    """A cross-attention-only block of the same shape as `block`."""
    heads = block.attn1.heads
    inner = block.attn1.to_q.out_features
    return CrossOnlyTransformerBlock(block.norm1.normalized_shape[0], heads, inner // heads,
                                     cfg.cross_attention_dim, cfg.upcast_attention)
