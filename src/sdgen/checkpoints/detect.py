"""Which model a single file holds, and its diffusers / transformers configs, from key names and tensor shapes.

Detection follows stable-diffusion.cpp's `detect_from_weights`: each family is a structural
signature (which text encoders, whether the U-Net has SDXL's `label_emb`, and the U-Net's
cross-attention width equal to the text width), every family is tested, and exactly one must
match. Config inference reads shapes only (channels per level, res blocks per level, attention
levels, transformer depth, linear or conv projections, text widths and depths). Head counts
are not visible in shapes: SD 1.x uses 8 heads everywhere, SD 2.x and SDXL a head size of 64,
CLIP text towers a head size of 64; a `config_dir` overrides all of this.
"""

from __future__ import annotations

import re

import torch

from sdgen.checkpoints.ldm_keys import TEXT_ENCODERS, UNET_PREFIX

HEAD_SIZE = 64
SD1_HEADS = 8
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025}
IMAGE_SIZE = {"sd1": 512, "sd2": 512, "sdxl": 1024, "sdxl_refiner": 1024}
SDXL_TIME_EMBED_DIM = 256  # each of SDXL's size/crop/aesthetic numbers gets a 256-wide sinusoid


def _indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """Distinct values of the first group of `pattern` matched at the start of keys."""
    regex = re.compile(pattern)
    return sorted({int(m[1]) for key in state if (m := regex.match(key))})


def _text_width(state: dict[str, torch.Tensor], kind: str, prefix: str) -> int | None:
    names = ("token_embedding.weight",) if kind == "openclip" else (
        "text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
    for name in names:
        if prefix + name in state:
            return state[prefix + name].shape[1]
    return None


def detect_family(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(family, variant) of an original-format checkpoint; ValueError unless exactly one family matches."""
    unet = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not unet:
        raise ValueError(
            "unknown architecture: no U-Net weights (model.diffusion_model.*); this looks like a VAE, LoRA "
            "or embedding file, not a full checkpoint"
        )
    to_k = [v for k, v in unet.items() if k.endswith(".attn2.to_k.weight")]
    if not to_k:
        raise ValueError("unknown architecture: the U-Net has no cross-attention layers")
    context = to_k[0].shape[1]
    has_label_emb = UNET_PREFIX + "label_emb.0.0.weight" in state
    found = {prefix: (kind, _text_width(state, kind, prefix)) for encoders in TEXT_ENCODERS.values()
             for kind, prefix in encoders}
    found = {prefix: value for prefix, value in found.items() if value[1] is not None}
    matches = []
    for family, encoders in TEXT_ENCODERS.items():
        wanted = {prefix for _, prefix in encoders}
        if set(found) != wanted or has_label_emb != family.startswith("sdxl"):
            continue
        if sum(found[prefix][1] for prefix in wanted) == context:
            matches.append(family)
    if len(matches) != 1:
        encoders = ", ".join(f"{prefix}* ({kind}, width {width})" for prefix, (kind, width) in found.items()) or "none"
        raise ValueError(
            f"unknown architecture: U-Net cross-attention width {context}, "
            f"label_emb {'present' if has_label_emb else 'absent'}, text encoders: {encoders}"
            + (f" (matches {', '.join(matches)})" if matches else "")
        )
    in_channels = state[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1]
    variants = {4: "base", 9: "inpaint"}
    if in_channels not in variants:
        raise ValueError(f"unsupported U-Net with {in_channels} input channels (4 = text-to-image, 9 = inpainting)")
    return matches[0], variants[in_channels]


def _heads(family: str, channels: list[int]) -> int | list[int]:
    if family == "sd1":
        return SD1_HEADS
    if any(c % HEAD_SIZE for c in channels):
        raise ValueError(f"cannot infer attention heads for channels {channels} (head size {HEAD_SIZE} expected)")
    return [c // HEAD_SIZE for c in channels]


def unet_config(state: dict[str, torch.Tensor], family: str) -> dict:
    """diffusers UNet2DConditionModel config of an original U-Net (prefix removed)."""
    conv_in = state["input_blocks.0.0.weight"]
    downsamplers = _indices(state, r"input_blocks\.(\d+)\.0\.op\.weight")
    if not downsamplers:
        raise ValueError("unknown U-Net layout: no downsampling blocks")
    per, levels = downsamplers[0] - 1, len(downsamplers) + 1
    expected = [(level + 1) * (per + 1) for level in range(levels - 1)]
    if per < 1 or downsamplers != expected or _indices(state, r"input_blocks\.(\d+)\.")[-1] != levels * (per + 1) - 1:
        raise ValueError(f"unknown U-Net layout: downsamplers at input blocks {downsamplers}")
    first = [1 + level * (per + 1) for level in range(levels)]
    channels = [state[f"input_blocks.{block}.0.out_layers.3.weight"].shape[0] for block in first]
    attention = [f"input_blocks.{block}.1.proj_in.weight" in state for block in first]
    depths = [len(_indices(state, rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\.")) for block in first]
    mid_depth = len(_indices(state, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if not any(attention) or not mid_depth:
        raise ValueError("unknown U-Net layout: no attention blocks")
    proj_in = state[f"input_blocks.{first[attention.index(True)]}.1.proj_in.weight"]
    context = state[f"input_blocks.{first[attention.index(True)]}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    if state["time_embed.0.weight"].shape[0] != 4 * channels[0]:
        raise ValueError("unknown U-Net layout: time embedding width is not 4x the first level's channels")
    # diffusers takes the mid block's depth from the last entry, so a last level without attention carries it.
    per_level = [d if a else 1 for d, a in zip(depths, attention)]
    if not attention[-1]:
        per_level[-1] = mid_depth
    used = {d for d, a in zip(depths, attention) if a} | {mid_depth}
    down_types = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": IMAGE_SIZE[family] // 8,
        "in_channels": conv_in.shape[1],
        "out_channels": state["out.2.weight"].shape[0],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": per,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": context,
        "transformer_layers_per_block": used.pop() if len(used) == 1 else per_level,
        "attention_head_dim": _heads(family, channels),
        "use_linear_projection": proj_in.ndim == 2,
        "upcast_attention": family == "sd2",  # as diffusers' SD 2.1 config: fp16 attention overflows otherwise
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
    }
    if "label_emb.0.0.weight" in state:
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = SDXL_TIME_EMBED_DIM
        config["projection_class_embeddings_input_dim"] = state["label_emb.0.0.weight"].shape[1]
    return config


# Where the VAE's structure shows, in original and in diffusers names.
_VAE_NAMES = {
    "original": (r"encoder\.down\.(\d+)\.block\.", r"encoder\.down\.0\.block\.(\d+)\.",
                 "encoder.down.{}.block.0.conv1.weight", ("encoder.mid.attn_1.q.weight",)),
    "diffusers": (r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder\.down_blocks\.0\.resnets\.(\d+)\.",
                  "encoder.down_blocks.{}.resnets.0.conv1.weight",
                  ("encoder.mid_block.attentions.0.to_q.weight", "encoder.mid_block.attentions.0.query.weight")),
}


def vae_config(state: dict[str, torch.Tensor], family: str | None, names: str = "original") -> dict:
    """diffusers AutoencoderKL config from VAE weights (prefix removed) in `original` or `diffusers` names."""
    level_pattern, block_pattern, first_conv, attention = _VAE_NAMES[names]
    levels = _indices(state, level_pattern)
    per = len(_indices(state, block_pattern))
    if not levels or levels != list(range(len(levels))) or not per or "decoder.conv_in.weight" not in state:
        raise ValueError("unknown VAE layout: encoder levels or decoder input missing")
    channels = [state[first_conv.format(level)].shape[0] for level in levels]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": per,
        "act_fn": "silu",
        "latent_channels": state["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": 32,
        "sample_size": IMAGE_SIZE.get(family or "sd1", 512),
        "scaling_factor": VAE_SCALING.get(family or "sd1", 0.18215),
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": any(name in state for name in attention),
    }


def openclip_layers_kept(state: dict[str, torch.Tensor], family: str) -> int:
    """OpenCLIP resblocks to keep: SD 2.x drops the last one when the whole tower was saved (see ldm_keys)."""
    layers = len(_indices(state, r"transformer\.resblocks\.(\d+)\."))
    if family == "sd2" and "text_projection" in state:
        return layers - 1  # the original code saved the full tower; SD 2.x uses its penultimate layer
    return layers  # a converter (diffusers' script, A1111 merges of such files) already dropped it


def text_config(state: dict[str, torch.Tensor], kind: str) -> dict:
    """transformers CLIPTextConfig dict of a text encoder already in transformers names."""
    vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
    if hidden % HEAD_SIZE:
        raise ValueError(f"cannot infer text encoder heads for width {hidden} (head size {HEAD_SIZE} expected)")
    projection = state.get("text_projection.weight")
    # CLIP's vocabulary ends with <|startoftext|>, <|endoftext|> (49406, 49407 in the real one).
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection is not None else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_indices(state, r"text_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": hidden // HEAD_SIZE,
        "max_position_embeddings": state["text_model.embeddings.position_embedding.weight"].shape[0],
        "hidden_act": "quick_gelu" if kind == "clip" else "gelu",  # OpenAI CLIP vs OpenCLIP
        "layer_norm_eps": 1e-5,
        "projection_dim": projection.shape[0] if projection is not None else hidden,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 1,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }
