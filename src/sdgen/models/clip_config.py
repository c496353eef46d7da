"""Configurations of the CLIP text and image towers, with transformers' config.json names.

Kept apart from the modules (clip.py) so that checkpoint detection and training recipes can build
and validate configs without the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F


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
