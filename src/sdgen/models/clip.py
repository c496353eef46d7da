"""CLIP text and image towers (Radford et al. 2021), parameter names as in transformers' CLIP models.

One pre-norm transformer layer serves both towers: causal self-attention over token + position
embeddings for text, bidirectional attention over a class token and image patches for images.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


# OpenAI's CLIP (SD 1.x) uses quick_gelu, OpenCLIP (SD 2.x, SDXL's second encoder) the exact erf GELU.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def _check_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if type(value) is not int or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def _check_tower(config: Any) -> None:
    """Checks shared by both towers' configs."""
    _check_positive(config, "hidden_size", "intermediate_size", "num_layers", "num_heads")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    if config.projection_dim is not None:
        _check_positive(config, "projection_dim")
    if not isinstance(config.layer_norm_eps, (int, float)) or not 0 < config.layer_norm_eps < 1:
        raise ValueError(f"layer_norm_eps must be a small positive number, got {config.layer_norm_eps!r}")


# transformers' config.json names of our fields (where they differ).
_TRANSFORMERS_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "max_positions": "max_position_embeddings",
}


def _tower_from_transformers(cls: type, config: dict, model_type: str, nested: str) -> Any:
    """A tower config from transformers' config.json: the tower's own file, or nested in a CLIPModel's.
    Absent keys take transformers' defaults, which are our field defaults."""
    if not isinstance(config, dict):
        raise ValueError(f"expected a config.json object, got {type(config).__name__}")
    kind = config.get("model_type", model_type)
    if kind == "clip":
        tower, projected = {**(config.get(nested) or {}), "projection_dim": config.get("projection_dim", 512)}, True
    elif kind == model_type:
        tower, projected = config, any(a.endswith("WithProjection") for a in config.get("architectures") or [])
    else:
        raise ValueError(f"model_type {kind!r} is not a {model_type} config")
    names = {f.name: _TRANSFORMERS_NAMES.get(f.name, f.name) for f in fields(cls)}
    values = {ours: tower[theirs] for ours, theirs in names.items() if tower.get(theirs) is not None}
    for name in ("image_size", "patch_size"):  # transformers 5 also allows [height, width]
        size = values.get(name)
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"{name} {size!r} is not supported; only square sizes are")
            values[name] = size[0]
    values["projection_dim"] = tower.get("projection_dim", 512) if projected else None
    return cls(**values)


def _tower_to_transformers(config: Any, model_type: str, architecture: str) -> dict[str, Any]:
    """The config.json transformers writes for a tower; projection_dim is unused without projection."""
    suffix = "WithProjection" if config.projection_dim else ""
    return {
        "architectures": [architecture + suffix],
        "model_type": model_type,
        **{_TRANSFORMERS_NAMES.get(f.name, f.name): getattr(config, f.name) for f in fields(config)},
        "projection_dim": config.projection_dim or 512,
        "attention_dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
    }


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower; defaults are transformers' CLIPTextConfig defaults (ViT-B text tower)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    bos_token_id: int = 49406
    # eos_token_id 2 is the value of configs written before transformers PR #24773 (SD 1.x, SDXL):
    # those pool at the largest input id, which is the end token in the OpenAI vocabulary.
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        _check_tower(self)
        _check_positive(self, "vocab_size", "max_positions")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"CLIPTextConfig.{name} must be an integer, got {getattr(self, name)!r}")

    @property
    def pools_at_largest_id(self) -> bool:
        """transformers' rule: the legacy eos_token_id 2 means pooling at the argmax of the ids."""
        return self.eos_token_id == 2

    @classmethod
    def from_transformers(cls, config: dict) -> CLIPTextConfig:
        """Read a transformers config.json (CLIPTextModel, CLIPTextModelWithProjection or CLIPModel)."""
        return _tower_from_transformers(cls, config, "clip_text_model", "text_config")

    def to_transformers(self) -> dict[str, Any]:
        """The config.json transformers writes for this tower."""
        return _tower_to_transformers(self, "clip_text_model", "CLIPTextModel")


@dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP image tower (ViT); defaults are transformers' CLIPVisionConfig defaults (ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        _check_tower(self)
        _check_positive(self, "num_channels", "image_size", "patch_size")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, config: dict) -> CLIPVisionConfig:
        """Read a transformers config.json (CLIPVisionModel, ...WithProjection or CLIPModel)."""
        return _tower_from_transformers(cls, config, "clip_vision_model", "vision_config")

    def to_transformers(self) -> dict[str, Any]:
        """The config.json transformers writes for this tower."""
        return _tower_to_transformers(self, "clip_vision_model", "CLIPVisionModel")


@dataclass(frozen=True)
class CLIPConfig:
    """Both towers and the shared embedding space of a contrastive CLIP model."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512
    logit_scale_init: float = 2.6592  # log(1 / 0.07), the CLIP paper's initial temperature

    def __post_init__(self) -> None:
        _check_positive(self, "projection_dim")

    @classmethod
    def from_transformers(cls, config: dict) -> CLIPConfig:
        """Read a transformers CLIPModel config.json."""
        if not isinstance(config, dict) or config.get("model_type", "clip") != "clip":
            raise ValueError("model_type must be 'clip' for a CLIPModel config")
        projection_dim = config.get("projection_dim", 512)
        # The towers' own projection_dim would be unused: CLIPModel holds the projections.
        text = CLIPTextConfig.from_transformers({**(config.get("text_config") or {}), "architectures": []})
        vision = CLIPVisionConfig.from_transformers({**(config.get("vision_config") or {}), "architectures": []})
        return cls(text, vision, projection_dim, config.get("logit_scale_init_value", 2.6592))

    def to_transformers(self) -> dict[str, Any]:
        """The config.json transformers writes for a CLIPModel."""
        text, vision = self.text.to_transformers(), self.vision.to_transformers()
        for tower in (text, vision):
            del tower["architectures"]
            tower["projection_dim"] = self.projection_dim
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "text_config": text,
            "vision_config": vision,
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init,
            "initializer_factor": 1.0,
        }


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
