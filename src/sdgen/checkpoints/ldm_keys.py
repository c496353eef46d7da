"""Original single-file names (CompVis / Stability "ldm" / "sgm") <-> diffusers / transformers names.

The U-Net and VAE maps are derived from the diffusers config (levels, res blocks per level,
attention per level), as ComfyUI's `unet_to_diffusers` and stable-diffusion.cpp's
`name_conversion.cpp` do, so one function serves SD 1.x, 2.x, XL and tiny test models. Each map
pairs module paths; a key converts through its longest mapped prefix, and a key no pair covers
is an error (the file does not have the layout the config describes).

Text encoders: OpenAI CLIP (SD 1.x, SDXL's first encoder) is stored with transformers' own names
under `cond_stage_model.transformer.`; OpenCLIP (SD 2.x, SDXL's second encoder) uses
open_clip's names (`transformer.resblocks.N.attn.in_proj_weight` holds q, k, v stacked,
`text_projection` is stored as (width, projection), the transpose of a Linear weight).

SD 2.x conditions on OpenCLIP ViT-H's penultimate layer (`layer: "penultimate"` in its yaml):
the original code runs 23 of the 24 resblocks and then `ln_final`. diffusers' converter drops
resblock 23 and `text_projection` (its SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) and builds a 23-layer
CLIPTextModel whose `last_hidden_state` (final layer norm applied) is exactly that output, so
our SD 2.x text encoder config says `num_hidden_layers = 23`: `num_layers` below is the number
of layers kept, and deeper resblocks are dropped. SDXL keeps all 32 layers of its OpenCLIP
ViT-bigG and its projection (the pooled embedding feeds the U-Net).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sdgen.checkpoints.parts import CheckpointParts

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Per family: (encoder kind, prefix of its weights in a single file), in pipeline order.
TEXT_ENCODERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("clip", "cond_stage_model.transformer."),),
    "sd2": (("openclip", "cond_stage_model.model."),),
    "sdxl": (("clip", "conditioner.embedders.0.transformer."), ("openclip", "conditioner.embedders.1.model.")),
    "sdxl_refiner": (("openclip", "conditioner.embedders.0.model."),),
}

_UNET_RESNET = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"),
)
_VAE_RESNET = (
    ("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"), ("conv_shortcut", "nin_shortcut"),
)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_VAE_LINEAR = re.compile(r".*mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")
_OPENCLIP_LAYER = (
    ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


class KeyMap:
    """Module-path pairs (diffusers, original); a key converts through its longest mapped prefix."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.to_original_paths = dict(pairs)
        self.to_diffusers_paths = {original: diffusers for diffusers, original in pairs}

    @staticmethod
    def _convert(key: str, table: dict[str, str]) -> str | None:
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            mapped = table.get(".".join(parts[:cut]))
            if mapped is not None:
                return ".".join([mapped, *parts[cut:]])
        return None

    def to_diffusers(self, key: str) -> str | None:
        """The diffusers name of an original key, None if no pair covers it."""
        return self._convert(key, self.to_diffusers_paths)

    def to_original(self, key: str) -> str | None:
        """The original name of a diffusers key, None if no pair covers it."""
        return self._convert(key, self.to_original_paths)


def _leaves(diffusers: str, original: str, leaves: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [(f"{diffusers}.{d}", f"{original}.{o}") for d, o in leaves]


def _layers_per_block(config: dict) -> int:
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise ValueError(f"layers_per_block must be one integer for the single-file layout, got {per!r}")
    return per


def unet_key_map(config: dict) -> KeyMap:
    """LDM `input_blocks/middle_block/output_blocks` <-> diffusers `down_blocks/mid_block/up_blocks`."""
    levels, per = len(config["block_out_channels"]), _layers_per_block(config)
    down_attention = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    up_attention = [kind.startswith("CrossAttn") for kind in config["up_block_types"]]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid_block_type {config['mid_block_type']!r} has no single-file layout")
    pairs = [
        ("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
    ]
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text + size embedding
        pairs += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
    # input_blocks: 0 is conv_in, then per level `per` resnet(+attention) blocks and a downsampler.
    for level in range(levels):
        for j in range(per):
            block = 1 + level * (per + 1) + j
            pairs += _leaves(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{block}.0", _UNET_RESNET)
            if down_attention[level]:
                pairs.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{block}.1"))
        if level < levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{(level + 1) * (per + 1)}.0.op"))
    pairs += _leaves("mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    pairs += _leaves("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    # output_blocks: per level `per + 1` blocks; the last one of a level also holds the upsampler.
    for level in range(levels):
        for j in range(per + 1):
            block = level * (per + 1) + j
            pairs += _leaves(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{block}.0", _UNET_RESNET)
            if up_attention[level]:
                pairs.append((f"up_blocks.{level}.attentions.{j}", f"output_blocks.{block}.1"))
        if level < levels - 1:
            slot = 2 if up_attention[level] else 1
            block = level * (per + 1) + per
            pairs.append((f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{block}.{slot}.conv"))
    return KeyMap(pairs)


def vae_key_map(config: dict) -> KeyMap:
    """LDM `encoder.down.i.block.j` / `decoder.up.i` (numbered from the bottom) <-> diffusers names."""
    levels, per = len(config["block_out_channels"]), _layers_per_block(config)
    same = ("conv_in", "conv_out")
    pairs = [(f"{part}.{name}", f"{part}.{name}") for part in ("encoder", "decoder") for name in same]
    pairs += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.conv_norm_out", f"{part}.norm_out"))
        pairs += _leaves(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        pairs += _leaves(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)
        pairs += _leaves(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
    for level in range(levels):
        for j in range(per):
            pairs += _leaves(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", _VAE_RESNET)
        if level < levels - 1:
            pairs.append((f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv"))
        original = levels - 1 - level  # the LDM decoder numbers its levels from the lowest resolution
        for j in range(per + 1):
            pairs += _leaves(f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.up.{original}.block.{j}", _VAE_RESNET)
        if level < levels - 1:
            pairs.append((f"decoder.up_blocks.{level}.upsamplers.0.conv", f"decoder.up.{original}.upsample.conv"))
    return KeyMap(pairs)


def _rename(state: dict[str, torch.Tensor], convert, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        name = convert(key)
        if name is None:
            raise ValueError(f"unexpected {what} key {key!r} for the layout in the config")
        out[name] = tensor
    return out


def unet_to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """U-Net weights (prefix `model.diffusion_model.` removed) renamed to diffusers names."""
    return _rename(state, unet_key_map(config).to_diffusers, "U-Net")


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers U-Net weights renamed to the original names (without the prefix)."""
    return _rename(state, unet_key_map(config).to_original, "U-Net")


def vae_to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """VAE weights (prefix removed) to diffusers names; mid attention 1x1 convs become linear weights."""
    out = _rename(state, vae_key_map(config).to_diffusers, "VAE")
    return {k: v[:, :, 0, 0] if v.ndim == 4 and _VAE_LINEAR.fullmatch(k) else v for k, v in out.items()}


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers VAE weights to the original names, linear attention weights as (out, in, 1, 1) convs."""
    state = {k: v[:, :, None, None] if v.ndim == 2 and _VAE_LINEAR.fullmatch(k) else v for k, v in state.items()}
    return _rename(state, vae_key_map(config).to_original, "VAE")


def normalize_clip_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text names with the `text_model.` prefix (transformers >= 5.6 saves without it,
    the oldest SD files too); the `position_ids` buffer, not a weight in current transformers, is dropped."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        keep = key.startswith("text_model.") or key.startswith("text_projection.")
        out[key if keep else f"text_model.{key}"] = tensor
    return out


def clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP as SD stores it (transformers names under the prefix) to our contract names."""
    return normalize_clip_names(state)


def clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel weights as SD stores them (`text_model.*` under the prefix)."""
    return normalize_clip_names(state)


def openclip_key_map(num_layers: int) -> KeyMap:
    """open_clip text tower modules <-> transformers CLIPTextModel modules (fused q/k/v handled apart)."""
    pairs = [("text_model.embeddings.token_embedding", "token_embedding"), ("text_model.final_layer_norm", "ln_final")]
    for layer in range(num_layers):
        pairs += _leaves(f"text_model.encoder.layers.{layer}", f"transformer.resblocks.{layer}", _OPENCLIP_LAYER)
    return KeyMap(pairs)


def openclip_to_transformers(
    state: dict[str, torch.Tensor], *, num_layers: int, with_projection: bool
) -> dict[str, torch.Tensor]:
    """open_clip text weights (prefix removed) to transformers names, keeping the first `num_layers` layers."""
    keymap, out = openclip_key_map(num_layers), {}
    for key, tensor in state.items():
        resblock = _RESBLOCK.match(key)
        if resblock and int(resblock[1]) >= num_layers:
            continue  # SD 2.x's unused last layer (see the module docstring)
        if key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = tensor
        elif key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = tensor.t().contiguous()
        elif key in ("logit_scale", "attn_mask"):
            continue
        elif fused := _IN_PROJ.fullmatch(key):
            layer, kind = fused.groups()
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
        else:
            name = keymap.to_diffusers(key)
            if name is None:
                raise ValueError(f"unexpected OpenCLIP text encoder key {key!r}")
            out[name] = tensor
    return out


def openclip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text weights to open_clip names: q/k/v stacked into in_proj, projection transposed."""
    state = normalize_clip_names(state)
    layers = 1 + max((int(m[1]) for k in state if (m := _QKV.fullmatch(k))), default=-1)
    keymap, out = openclip_key_map(layers), {}
    for key, tensor in state.items():
        if key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()
        elif fused := _QKV.fullmatch(key):
            layer, name, kind = fused.groups()
            if name == "q":
                parts = [state[f"text_model.encoder.layers.{layer}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
                out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        else:
            name = keymap.to_original(key)
            if name is None:
                raise ValueError(f"unexpected CLIP text encoder key {key!r}")
            out[name] = tensor
    return out


def to_original_checkpoint(
    family: str,
    unet: tuple[dict, dict[str, torch.Tensor]],
    vae: tuple[dict, dict[str, torch.Tensor]],
    text_encoders: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """diffusers-named parts (config, state) -> one flat state dict with the original single-file names."""
    if family not in TEXT_ENCODERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(TEXT_ENCODERS)}")
    if len(text_encoders) != len(TEXT_ENCODERS[family]):
        raise ValueError(f"{family} has {len(TEXT_ENCODERS[family])} text encoder(s), got {len(text_encoders)}")
    flat = {UNET_PREFIX + k: v for k, v in unet_to_original(unet[1], unet[0]).items()}
    flat.update({VAE_PREFIX + k: v for k, v in vae_to_original(vae[1], vae[0]).items()})
    for (kind, prefix), state in zip(TEXT_ENCODERS[family], text_encoders):
        converted = clip_to_original(state) if kind == "clip" else openclip_to_original(state)
        flat.update({prefix + k: v for k, v in converted.items()})
    return flat


def parts_to_original(parts: "CheckpointParts") -> dict[str, torch.Tensor]:
    """A loaded model back in the original single-file names (save it with `safetensors.torch.save_file`)."""
    if parts.vae_config is None:
        raise ValueError("the model has no VAE to write")
    return to_original_checkpoint(
        parts.family, (parts.unet_config, parts.unet_state), (parts.vae_config, parts.vae_state),
        [state for _, state in parts.text_encoders],
    )
