"""CLIP text and image towers (Radford et al. 2021), parameter names as in transformers' CLIP models.

One pre-norm transformer layer serves both towers: causal self-attention over token + position
embeddings for text, bidirectional attention over a class token and image patches for images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdgen.models.clip_config import ACTIVATIONS, CLIPConfig, CLIPTextConfig, CLIPVisionConfig


# Layers shared by both towers --------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017) through torch's scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        batch, length, width = x.shape
        # (batch, length, width) -> (batch, heads, length, head_dim)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in projections)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    """Two-layer feed-forward block."""

    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)) (GPT-2 / CLIP layout)."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config.hidden_size, config.num_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """A stack of transformer layers returning every hidden state, the input first (as transformers)."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))

    def forward(self, x: torch.Tensor, causal: bool) -> list[torch.Tensor]:
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], causal))
        return states


class _PositionIdsIgnored(nn.Module):
    """Embeddings that compute positions with arange in forward, so they skip the `position_ids`
    buffer older transformers versions saved (sometimes damaged, e.g. stored as floats)."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# Text tower --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderOutput:
    """hidden_states: final-norm output of layer -clip_skip (the U-Net context); penultimate: raw
    output of the second-to-last layer (SDXL); pooled: final-norm state at the end token;
    text_embeds: pooled @ text_projection when the tower has one."""

    hidden_states: torch.Tensor
    penultimate: torch.Tensor
    pooled: torch.Tensor
    text_embeds: torch.Tensor | None = None


class TextEmbeddings(_PositionIdsIgnored):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)
        # Initial scales of OpenAI's CLIP code.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        return tokens + self.position_embedding(positions)


class TextTransformer(nn.Module):
    """CLIP text transformer: embeddings, causal encoder, final layer norm."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1,
                inputs_embeds: torch.Tensor | None = None) -> TextEncoderOutput:
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer ids of shape (batch, length), got {tuple(input_ids.shape)}")
        if not 1 <= input_ids.shape[1] <= cfg.max_positions:
            raise ValueError(f"input_ids length {input_ids.shape[1]} is outside 1..{cfg.max_positions} positions")
        if type(clip_skip) is not int or not 1 <= clip_skip <= cfg.num_layers:
            raise ValueError(f"clip_skip must be an integer in 1..{cfg.num_layers}, got {clip_skip!r}")
        if inputs_embeds is not None and tuple(inputs_embeds.shape) != (*input_ids.shape, cfg.hidden_size):
            raise ValueError(f"inputs_embeds must have shape {(*input_ids.shape, cfg.hidden_size)} (the ids' "
                             f"shape plus the width), got {tuple(inputs_embeds.shape)}")
        states = self.encoder(self.embeddings(input_ids, inputs_embeds), causal=True)
        last = self.final_layer_norm(states[-1])
        # AUTOMATIC1111's clip skip: the output of layer -k, normalised by the final layer norm.
        hidden = last if clip_skip == 1 else self.final_layer_norm(states[-clip_skip])
        if cfg.pools_at_largest_id:
            end = input_ids.argmax(dim=-1)
        else:  # first end token: the pad token may be the end token too
            end = (input_ids == cfg.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), end]
        return TextEncoderOutput(hidden, states[-2], pooled)


class CLIPTextModel(nn.Module):
    """CLIP text encoder (transformers' CLIPTextModel, or CLIPTextModelWithProjection when
    `projection_dim` is set): the conditioning of SD 1.x/2.x and both SDXL encoders."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        self.text_projection = None
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, *,
                inputs_embeds: torch.Tensor | None = None) -> TextEncoderOutput:
        """Outputs for token ids; `inputs_embeds` (batch, length, width), when given, replaces their
        token embeddings (textual inversion), the ids still mark the end token the pooled output takes."""
        out = self.text_model(input_ids, clip_skip, inputs_embeds)
        return out if self.text_projection is None else replace(out, text_embeds=self.text_projection(out.pooled))


# Image tower -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageEncoderOutput:
    """hidden_states: last layer output (no norm); penultimate: second-to-last layer output (as
    IP-Adapter uses); pooled: post-norm class token; image_embeds: pooled @ visual_projection."""

    hidden_states: torch.Tensor
    penultimate: torch.Tensor
    pooled: torch.Tensor
    image_embeds: torch.Tensor | None = None


class VisionEmbeddings(_PositionIdsIgnored):
    """ViT embeddings (Dosovitskiy et al. 2020): class token + linear patch embedding + positions."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.patch_embedding = nn.Conv2d(config.num_channels, width, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, width)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            expected = f"(batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size})"
            raise ValueError(f"pixels must have shape {expected}, got {tuple(pixels.shape)}; resize the image first")
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    """CLIP ViT: embeddings, pre-norm (`pre_layrnorm`, sic), encoder, post-norm of the class token."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> ImageEncoderOutput:
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False)
        return ImageEncoderOutput(states[-1], states[-2], self.post_layernorm(states[-1][:, 0]))


class CLIPVisionModel(nn.Module):
    """CLIP image encoder (transformers' CLIPVisionModel, or CLIPVisionModelWithProjection when
    `projection_dim` is set); takes pixels already resized and normalised with CLIP's mean and std."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.visual_projection = None
        if config.projection_dim is not None:
            self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> ImageEncoderOutput:
        out = self.vision_model(pixels)
        return out if self.visual_projection is None else replace(out, image_embeds=self.visual_projection(out.pooled))


# Both towers -------------------------------------------------------------------------------------


class CLIPModel(nn.Module):
    """Contrastive CLIP (transformers' CLIPModel): both towers, their projections and the logit scale."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config.text)
        self.vision_model = VisionTransformer(config.vision)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((), config.logit_scale_init))

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1) -> TextEncoderOutput:
        """Text tower outputs with text_embeds in the shared space (not normalised)."""
        out = self.text_model(input_ids, clip_skip)
        return replace(out, text_embeds=self.text_projection(out.pooled))

    def encode_image(self, pixels: torch.Tensor) -> ImageEncoderOutput:
        """Image tower outputs with image_embeds in the shared space (not normalised)."""
        out = self.vision_model(pixels)
        return replace(out, image_embeds=self.visual_projection(out.pooled))

    def image_text_similarity(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """logits_per_image (images, texts): exp(logit_scale) times the cosine similarity."""
        image = F.normalize(self.encode_image(pixels).image_embeds, dim=-1)
        text = F.normalize(self.encode_text(input_ids).text_embeds, dim=-1)
        return self.logit_scale.exp() * image @ text.T
