"""Tiny random-weight transformers CLIP models for parity tests (test side only)."""

from __future__ import annotations

import torch
import transformers

TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter (layer norms included, so a swapped norm shows) random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == "logit_scale":
                continue
            noise = torch.randn(parameter.shape, generator=generator) * scale
            is_norm_gain = "norm" in name and name.endswith(".weight")
            parameter.copy_(1 + noise if is_norm_gain else noise)
    return model.eval()


def text_config(vocab_size: int = 1000, hidden_act: str = "quick_gelu", eos_token_id: int = 999, **changes):
    settings = dict(TINY_TEXT, vocab_size=vocab_size, hidden_act=hidden_act, eos_token_id=eos_token_id,
                    bos_token_id=min(998, vocab_size - 2), pad_token_id=1, projection_dim=24)
    settings.update(changes)
    config = transformers.CLIPTextConfig(**settings)
    config._attn_implementation = "eager"  # compare against plain matmul attention, not SDPA
    return config


def vision_config(hidden_act: str = "quick_gelu", **changes):
    config = transformers.CLIPVisionConfig(**dict(TINY_VISION, hidden_act=hidden_act, projection_dim=24, **changes))
    config._attn_implementation = "eager"
    return config


def text_model(config, projection: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return randomize(cls(config), seed)


def vision_model(config, projection: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    return randomize(cls(config), seed)


def clip_model(text, vision, projection_dim: int = 24, seed: int = 0) -> torch.nn.Module:
    config = transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = randomize(transformers.CLIPModel(config), seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    return model


def published_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keys as published folders name them: transformers 5 keeps CLIPTextModel / CLIPVisionModel
    weights without the `text_model.` / `vision_model.` prefix in memory and in save_pretrained."""
    state = model.state_dict()
    if isinstance(model, transformers.CLIPTextModel):
        return {f"text_model.{k}": v for k, v in state.items()}
    if isinstance(model, transformers.CLIPVisionModel):
        return {f"vision_model.{k}": v for k, v in state.items()}
    return dict(state)


def config_json(model: torch.nn.Module) -> dict:
    """The config.json save_pretrained writes for the model (architectures included)."""
    return {**model.config.to_dict(), "architectures": [type(model).__name__]}
