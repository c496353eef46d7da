"""Tiny random-weight diffusers models (U-Net, VAE) shared by the parity tests.

Test-side only: sdgen code never imports diffusers. The config dicts are constructor
arguments of diffusers' `UNet2DConditionModel` / `AutoencoderKL` (the same fields as their
`config.json`), shrunk so that a 64x64 image (8x8 latent) runs in a fraction of a second.

Families (`tiny_unet_config(family)`):
- "sd1": Stable Diffusion 1.x layout, 4 levels, 2 res blocks per level, cross-attention on the
  first three levels, conv projections, 8 heads everywhere (the `attention_head_dim` quirk:
  diffusers reads that field as the number of heads), cross_attention_dim 32.
- "sd2": same layout, linear projections, per-level head counts, upcast_attention (SD 2.1).
- "sdxl": 3 levels, no attention on the first, transformer depth 0/1/2 per level (SDXL's
  0/2/10 scaled down), text_time added conditioning (pooled text 32 + 6 time ids x 8).
- "sdxl_refiner": 4 levels, attention on the middle two, depth 2, 5 time ids (SDXL refiner).
- "generic": not an SD layout: 2 levels, attention only on the second, 1 res block per level.
Any field can be overridden, e.g. `tiny_unet_config("sd1", in_channels=9)` for inpainting.
The SD families keep SD's invariants that single-file checkpoints do not record (32 norm groups,
time embedding 4x the first level's channels); head counts are not SD's (heads of 64 channels
would make the models large), so reading a tiny single file needs its diffusers config.
"""

from __future__ import annotations

import math

import torch

# Text conditioning sizes the tiny U-Nets expect; tiny text encoders must produce these.
SD1_CONTEXT_DIM = 32
SD2_CONTEXT_DIM = 32
SDXL_CONTEXT_DIM = 64  # SDXL concatenates two text encoders' hidden states (32 + 32 here)
SDXL_POOLED_DIM = 32  # pooled projection of the second text encoder ("text_embeds")
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim: sinusoidal size per time id
SDXL_REFINER_CONTEXT_DIM = 32

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

_UNET_CONFIGS: dict[str, dict] = {
    "sd1": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=_SD_DOWN,
        up_block_types=_SD_UP,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,  # SD's value: single files do not record it
        cross_attention_dim=SD1_CONTEXT_DIM,
        attention_head_dim=8,  # number of heads, as SD 1.x's config (quirk)
    ),
    "sd2": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=_SD_DOWN,
        up_block_types=_SD_UP,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,  # SD's value: single files do not record it
        cross_attention_dim=SD2_CONTEXT_DIM,
        attention_head_dim=(2, 4, 8, 8),  # heads per level, as SD 2.x's (5, 10, 20, 20)
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,  # SD's value: single files do not record it
        cross_attention_dim=SDXL_CONTEXT_DIM,
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM,
    ),
    "sdxl_refiner": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,  # SD's value: single files do not record it
        cross_attention_dim=SDXL_REFINER_CONTEXT_DIM,
        attention_head_dim=(2, 4, 8, 8),
        transformer_layers_per_block=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # the refiner's 5 time ids: original size, crop, aesthetic score
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 5 * SDXL_TIME_EMBED_DIM,
    ),
    "generic": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 48),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=24,
        attention_head_dim=3,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
}

UNET_FAMILIES = tuple(_UNET_CONFIGS)


def tiny_unet_config(family: str = "sd1", **overrides) -> dict:
    """Constructor arguments (= config.json fields) of a tiny diffusers UNet2DConditionModel."""
    if family not in _UNET_CONFIGS:
        raise ValueError(f"unknown U-Net family {family!r}; expected one of {UNET_FAMILIES}")
    config = dict(_UNET_CONFIGS[family])
    config.update(overrides)
    return config


def tiny_vae_config(**overrides) -> dict:
    """Constructor arguments of a tiny diffusers AutoencoderKL: SD's 4-level layout, factor 8.

    Block types follow the number of levels in `block_out_channels`, so overriding it is enough.
    """
    config = dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,  # SD's value: single files do not record it
        scaling_factor=0.18215,
    )
    config.update(overrides)
    levels = len(config["block_out_channels"])
    config["down_block_types"] = ("DownEncoderBlock2D",) * levels
    config["up_block_types"] = ("UpDecoderBlock2D",) * levels
    return config


@torch.no_grad()
def randomize_weights(module: torch.nn.Module, seed: int, gain: float = 1.5) -> torch.nn.Module:
    """Re-draw every parameter so that outputs are far from flat (default init gives near-flat ones).

    Matrices and kernels: normal with std gain / sqrt(fan_in); norm scales 1 + 0.2 N(0, 1);
    biases and norm shifts 0.1 N(0, 1). Deterministic in `seed`, independent of torch's global RNG.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            value = noise * (gain / math.sqrt(fan_in))
        elif name.endswith("weight"):
            value = 1.0 + 0.2 * noise
        else:
            value = 0.1 * noise
        param.copy_(value.to(param.dtype))
    return module


def make_reference_unet(family: str = "sd1", seed: int = 0, **overrides):
    """A tiny diffusers UNet2DConditionModel of `family` with randomized weights, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)  # construction draws from the global RNG; keep it reproducible
    model = UNet2DConditionModel(**tiny_unet_config(family, **overrides))
    return randomize_weights(model, seed).eval()


def make_reference_vae(seed: int = 0, **overrides):
    """A tiny diffusers AutoencoderKL with randomized weights, in eval mode."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**tiny_vae_config(**overrides))
    return randomize_weights(model, seed).eval()


def unet_example_inputs(family: str, batch: int = 2, size: int = 8, seed: int = 0, **overrides) -> dict:
    """Random inputs for a tiny U-Net of `family`: x, fractional timesteps, context, added_cond."""
    config = tiny_unet_config(family, **overrides)
    generator = torch.Generator().manual_seed(seed)
    context_dim = config["cross_attention_dim"]
    inputs = {
        "x": torch.randn(batch, config["in_channels"], size, size, generator=generator),
        "timesteps": torch.tensor([999.0, 421.37, 3.5, 0.0][:batch]),
        "context": torch.randn(batch, 7, context_dim, generator=generator),
        "added_cond": None,
    }
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"]
        n_ids = (config["projection_class_embeddings_input_dim"] - SDXL_POOLED_DIM) // time_dim
        time_ids = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0][:n_ids]).repeat(batch, 1)
        inputs["added_cond"] = {
            "text_embeds": torch.randn(batch, SDXL_POOLED_DIM, generator=generator),
            "time_ids": time_ids,
        }
    return inputs
