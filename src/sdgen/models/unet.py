"""The latent-diffusion U-Net (Rombach et al. 2022) of Stable Diffusion 1.x, 2.x and XL.

Parameter names are those of a diffusers `unet/` folder (`down_blocks.1.attentions.0...`);
which blocks exist is decided by the per-level fields of `UNetConfig`, not by block-type names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdgen.models.layers import (
    Downsample, ResBlock, SpatialTransformer, Stage, TimestepEmbedding, Upsample, group_norm, timestep_embedding,
)

_ATTN_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_ATTN_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
_MID_ATTN = "UNetMidBlock2DCrossAttn"

# diffusers fields we accept only at the value SD / SDXL use: (field, allowed values, why)
_FIXED_FIELDS = (
    ("center_input_sample", (False,), "inputs are not re-centred"),
    ("only_cross_attention", (False,), "self-attention is always present"),
    ("dual_cross_attention", (False,), "dual cross-attention (Versatile Diffusion) is not supported"),
    ("downsample_padding", (1,), "the U-Net downsamplers pad by 1"),
    ("mid_block_scale_factor", (1, 1.0), "mid-block outputs are not rescaled"),
    ("act_fn", ("silu",), "the activation is SiLU"),
    ("resnet_time_scale_shift", ("default",), "scale-shift time conditioning is not supported"),
    ("resnet_skip_time_act", (False,), "the time embedding goes through SiLU in every res block"),
    ("resnet_out_scale_factor", (1, 1.0), "res block outputs are not rescaled"),
    ("time_embedding_type", ("positional",), "only sinusoidal time embeddings are supported"),
    ("time_embedding_act_fn", (None,), "no activation after the time embedding"),
    ("timestep_post_act", (None,), "no activation after the time MLP"),
    ("conv_in_kernel", (3,), "conv_in is 3x3"),
    ("conv_out_kernel", (3,), "conv_out is 3x3"),
    ("attention_type", ("default",), "GLIGEN gated attention is not supported"),
    ("class_embed_type", (None,), "class-conditioned U-Nets (upscalers, unCLIP) are not supported"),
    ("num_class_embeds", (None,), "class-conditioned U-Nets (upscalers, unCLIP) are not supported"),
    ("class_embeddings_concat", (False,), "class-conditioned U-Nets are not supported"),
    ("encoder_hid_dim", (None,), "a text projection before cross-attention is not supported"),
    ("encoder_hid_dim_type", (None,), "a text projection before cross-attention is not supported"),
    ("reverse_transformer_layers_per_block", (None,), "up blocks mirror the down blocks' depths"),
    ("mid_block_only_cross_attention", (None, False), "self-attention is always present"),
    ("cross_attention_norm", (None,), "no norm on the text context"),
    ("dropout", (0, 0.0), "dropout is not used (inference and our training loop)"),
)


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a U-Net; every per-level tuple has one entry per resolution level (down order).

    Defaults are Stable Diffusion 1.5's. The up path mirrors the down path, with one more res
    block per level (it also consumes the downsampler's skip).
    """

    in_channels: int = 4  # 9 for inpainting models: latent, mask, masked-image latent
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)  # res blocks per down level
    attention: tuple[bool, ...] = (True, True, True, False)  # spatial transformer after each res block
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads; head size = channels // heads
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # transformer blocks per spatial transformer
    mid_block: bool = True  # res-attention-res at the lowest resolution (diffusers' mid_block_type)
    cross_attention_dim: int = 768  # width of the text context
    use_linear_projection: bool = False  # transformer projections: linear (SD 2 / XL) or 1x1 conv (SD 1)
    upcast_attention: bool = False  # attention in float32 for fp16/bf16 inputs (SD 2.1)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True  # timestep embedding order [cos, sin]
    freq_shift: int = 0
    time_embed_dim: int | None = None  # width of the time embedding; None = 4 * block_out_channels[0]
    time_cond_proj_dim: int | None = None  # guidance-scale embedding width of LCM-distilled U-Nets
    addition_embed_type: str | None = None  # "text_time" for SDXL: pooled text + size/crop ids
    addition_time_embed_dim: int | None = None  # sinusoidal width per SDXL time id
    projection_class_embeddings_input_dim: int | None = None  # pooled text width + n_ids * addition_time_embed_dim
    sample_size: int = 64  # the latent size the model was trained at

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ValueError("block_out_channels: give at least one level")
        for name in ("in_channels", "out_channels", "cross_attention_dim", "norm_num_groups"):
            _check_positive_ints(name, (getattr(self, name),))
        for name in ("block_out_channels", "layers_per_block"):
            _check_positive_ints(name, getattr(self, name))
        for name in ("time_embed_dim", "time_cond_proj_dim", "addition_time_embed_dim",
                     "projection_class_embeddings_input_dim"):
            if getattr(self, name) is not None:
                _check_positive_ints(name, (getattr(self, name),))
        for name in ("layers_per_block", "attention", "num_heads", "transformer_depth"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name}: give one entry per level ({levels}), got {getattr(self, name)}")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels: {channels} is not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")
        for level, (channels, heads) in enumerate(zip(self.block_out_channels, self.num_heads)):
            if not (self.attention[level] or (self.mid_block and level == levels - 1)):
                continue  # heads and depth of a level without attention are never used
            _check_positive_ints("num_heads", (heads,))
            _check_positive_ints("transformer_depth", (self.transformer_depth[level],))
            if heads > channels:
                raise ValueError(f"num_heads: level {level} has {heads} heads for {channels} channels")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type: {self.addition_embed_type!r} is not supported "
                             "(None, or 'text_time' for SDXL)")
        if self.addition_embed_type and not (self.addition_time_embed_dim and
                                             self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")

    @property
    def levels(self) -> int:
        """Number of resolution levels."""
        return len(self.block_out_channels)

    @property
    def temb_dim(self) -> int:
        """Width of the time embedding fed to every res block."""
        return self.time_embed_dim or 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Latent sizes must be multiples of this for exact 2x up/down sampling (others are handled)."""
        return 2 ** (self.levels - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> UNetConfig:
        """Read a diffusers `unet/config.json` dict; ValueError names any unsupported field."""
        for name, allowed, why in _FIXED_FIELDS:
            if name in config and config[name] not in allowed:
                raise ValueError(f"unet config {name}={config[name]!r} is not supported: {why}")
        down = list(config.get("down_block_types", (_ATTN_DOWN,) * 3 + (_PLAIN_DOWN,)))
        up = list(config.get("up_block_types", (_PLAIN_UP,) + (_ATTN_UP,) * 3))
        levels = len(down)
        attention = []
        for name in down:
            if name not in (_ATTN_DOWN, _PLAIN_DOWN):
                raise ValueError(f"unet config down_block_types: {name!r} is not supported "
                                 f"(use {_ATTN_DOWN} or {_PLAIN_DOWN})")
            attention.append(name == _ATTN_DOWN)
        mirrored = [_ATTN_UP if a else _PLAIN_UP for a in reversed(attention)]
        if up != mirrored:
            raise ValueError(f"unet config up_block_types {up} must mirror down_block_types {down}: expected {mirrored}")
        mid_type = config.get("mid_block_type", _MID_ATTN)
        if mid_type not in (_MID_ATTN, None):
            raise ValueError(f"unet config mid_block_type {mid_type!r} is not supported (use {_MID_ATTN} or null)")

        def per_level(name: str, default: Any) -> tuple:
            value = config.get(name)
            return _as_levels(default if value is None else value, levels, name)

        # diffusers' naming quirk: `attention_head_dim` holds the NUMBER of heads unless
        # `num_attention_heads` is given (which diffusers' own U-Net still refuses).
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        cross_dim = config.get("cross_attention_dim", 1280)
        if isinstance(cross_dim, (list, tuple)):
            if len(set(cross_dim)) != 1:
                raise ValueError(f"unet config cross_attention_dim: one width for all levels is supported, got {cross_dim}")
            cross_dim = cross_dim[0]
        sample_size = config.get("sample_size", 64)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        block_out = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
        if len(block_out) != levels or len(up) != levels:
            raise ValueError(f"unet config: {len(block_out)} block_out_channels, {levels} down blocks and "
                             f"{len(up)} up blocks must agree")
        groups = config.get("norm_num_groups", 32)
        if groups is None:
            raise ValueError("unet config norm_num_groups=null (no output norm) is not supported")
        return cls(
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            block_out_channels=block_out,
            layers_per_block=per_level("layers_per_block", 2),
            attention=tuple(attention),
            num_heads=_as_levels(heads, levels, "attention_head_dim"),
            transformer_depth=per_level("transformer_layers_per_block", 1),
            mid_block=mid_type is not None,
            cross_attention_dim=cross_dim,
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            norm_num_groups=groups,
            norm_eps=config.get("norm_eps", 1e-5),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=config.get("freq_shift", 0),
            time_embed_dim=config.get("time_embedding_dim"),
            time_cond_proj_dim=config.get("time_cond_proj_dim"),
            addition_embed_type=config.get("addition_embed_type"),
            addition_time_embed_dim=config.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim"),
            sample_size=sample_size,
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `unet/config.json` dict for this config (heads written as `attention_head_dim`)."""
        down = [_ATTN_DOWN if a else _PLAIN_DOWN for a in self.attention]
        up = [_ATTN_UP if a else _PLAIN_UP for a in reversed(self.attention)]
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": down,
            "mid_block_type": _MID_ATTN if self.mid_block else None,
            "up_block_types": up,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": _compact(self.layers_per_block),
            "attention_head_dim": _compact(self.num_heads),
            "transformer_layers_per_block": _compact(self.transformer_depth),
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "time_embedding_dim": self.time_embed_dim,
            "time_cond_proj_dim": self.time_cond_proj_dim,
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "act_fn": "silu",
            "center_input_sample": False,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
        }


def _check_positive_ints(name: str, values: tuple) -> None:
    """ValueError naming `name` unless every value is an int >= 1 (bools and floats are mistakes)."""
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected positive integers, got {value!r}")


def _as_levels(value: Any, levels: int, name: str) -> tuple:
    """An int or a per-level list of a diffusers config as a per-level tuple."""
    if not isinstance(value, (list, tuple)):
        return (value,) * levels
    if len(value) != levels:
        raise ValueError(f"unet config {name}: {len(value)} entries for {levels} levels")
    if any(isinstance(v, (list, tuple)) for v in value):
        raise ValueError(f"unet config {name}: per-block lists are not supported, give one value per level")
    return tuple(value)


def _compact(values: tuple) -> Any:
    """One value when all levels agree (as the published configs write it), else the list."""
    return values[0] if len(set(values)) == 1 else list(values)


class UNet(nn.Module):
    """Conditional U-Net: eps / v prediction from noisy latents, timesteps and a text context.

    Down levels store a skip after every res(-attention) block and after each downsampler; up
    levels concatenate one skip before each of their res blocks, deepest first.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.channels_last = False  # NHWC activations: oneDNN's native layout (set by sdgen.runtime.fast)
        self.step_cache = None  # a runtime.step_cache.StepCache reuses deep features across steps
        channels, temb = cfg.block_out_channels, cfg.temb_dim
        groups, eps = cfg.norm_num_groups, cfg.norm_eps

        def resnet(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, temb, groups, eps)

        def transformer(level: int) -> SpatialTransformer:
            return SpatialTransformer(channels[level], cfg.num_heads[level], cfg.transformer_depth[level],
                                      cfg.cross_attention_dim, groups, cfg.use_linear_projection,
                                      cfg.upcast_attention)

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb, cfg.time_cond_proj_dim)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        last = cfg.levels - 1
        self.down_blocks = nn.ModuleList()
        skip_channels = [channels[0]]  # conv_in's output is the first skip
        c_in = channels[0]
        for level, c_out in enumerate(channels):
            n = cfg.layers_per_block[level]
            resnets = [resnet(c_in if i == 0 else c_out, c_out) for i in range(n)]
            attentions = [transformer(level) for _ in range(n)] if cfg.attention[level] else None
            downsampler = Downsample(c_out) if level < last else None
            self.down_blocks.append(Stage(resnets, attentions, downsampler=downsampler))
            skip_channels += [c_out] * (n + (downsampler is not None))
            c_in = c_out

        if cfg.mid_block:
            self.mid_block = Stage([resnet(channels[-1], channels[-1]) for _ in range(2)], [transformer(last)])
        else:
            self.mid_block = None

        self.up_blocks = nn.ModuleList()
        c_prev = channels[-1]
        for level in reversed(range(cfg.levels)):
            c_out = channels[level]
            n = cfg.layers_per_block[level] + 1
            resnets = []
            for i in range(n):
                resnets.append(resnet((c_prev if i == 0 else c_out) + skip_channels.pop(), c_out))
            attentions = [transformer(level) for _ in range(n)] if cfg.attention[level] else None
            upsampler = Upsample(c_out) if level > 0 else None
            self.up_blocks.append(Stage(resnets, attentions, upsampler=upsampler))
            c_prev = c_out

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def time_embed(self, timesteps: torch.Tensor, batch: int, dtype: torch.dtype,
                   added_cond: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Time embedding (plus SDXL's pooled-text and size/crop embedding) fed to every res block."""
        cfg = self.cfg
        timesteps = torch.as_tensor(timesteps, device=self.conv_in.weight.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        if timesteps.ndim != 1 or timesteps.shape[0] not in (1, batch):
            raise ValueError(f"timesteps: expected shape ({batch},), got {tuple(timesteps.shape)}")
        timesteps = timesteps.expand(batch)
        added_cond = added_cond or {}
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        condition = added_cond.get("timestep_cond")
        if condition is not None:
            condition = condition.to(dtype)
        emb = self.time_embedding(t_emb.to(dtype), condition)
        if cfg.addition_embed_type == "text_time":
            if "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("this SDXL-type U-Net needs added_cond={'text_embeds': (batch, dim), "
                                 "'time_ids': (batch, n_ids)}")
            text_embeds, time_ids = added_cond["text_embeds"], added_cond["time_ids"]
            time_embeds = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim,
                                             cfg.flip_sin_to_cos, cfg.freq_shift)
            add = torch.cat([text_embeds, time_embeds.reshape(text_embeds.shape[0], -1).to(text_embeds.dtype)], -1)
            if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
                raise ValueError(f"added_cond: text_embeds and time_ids give {add.shape[-1]} features, the model "
                                 f"expects {cfg.projection_class_embeddings_input_dim}")
            emb = emb + self.add_embedding(add.to(dtype))
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                added_cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Predict the model output (eps or v) for latents `x` (b, c, h, w) at float `timesteps` (b,).

        `context` is the text encoder's hidden states (b, tokens, cross_attention_dim); `added_cond`
        holds SDXL's "text_embeds" and "time_ids", and "timestep_cond" for LCM-distilled models.
        """
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x: expected (batch, {self.cfg.in_channels}, height, width), got {tuple(x.shape)}")
        if context.shape[-1] != self.cfg.cross_attention_dim:
            raise ValueError(f"context: expected width {self.cfg.cross_attention_dim}, got {context.shape[-1]}")
        context = context.to(x.dtype)
        emb = self.time_embed(timesteps, x.shape[0], x.dtype, added_cond)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        h = self.conv_in(x)
        skips = [h]
        h = _res_attention(self.down_blocks[0], h, emb, context, skips)
        # step caching (runtime/step_cache.py, off by default) may stand in for the deep levels
        cache = self.step_cache if self.cfg.levels > 1 else None
        key = cache.key(x, context) if cache is not None else None
        deep = cache.lookup(timesteps, key) if cache is not None else None
        if deep is None:
            deep = self._deep_levels(h, emb, context, skips)
            if cache is not None:
                cache.store(key, deep)
        h = _up_level(self.up_blocks[-1], deep, emb, context, skips)
        return self.conv_out(group_norm(self.conv_norm_out, h, silu=True)).contiguous()

    def _deep_levels(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                     skips: list[torch.Tensor]) -> torch.Tensor:
        """Everything between the first down level and the last up level: the map entering the last up level."""
        for level, stage in enumerate(self.down_blocks):
            if level:
                h = _res_attention(stage, h, emb, context, skips)
            if stage.downsamplers is not None:
                h = stage.downsamplers[0](h)
                skips.append(h)
        if self.mid_block is not None:
            h = self.mid_block.resnets[0](h, emb)
            h = self.mid_block.attentions[0](h, context)
            h = self.mid_block.resnets[1](h, emb)
        for stage in self.up_blocks[:-1]:
            h = _up_level(stage, h, emb, context, skips)
        return h


def _up_level(stage: Stage, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
              skips: list[torch.Tensor]) -> torch.Tensor:
    """An up level: each res block takes the latest skip concatenated, then its transformer if any."""
    for i, resnet in enumerate(stage.resnets):
        h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
        if len(stage.attentions):
            h = stage.attentions[i](h, context)
    if stage.upsamplers is not None:
        # upsample to the next skip's size: odd sizes (e.g. 9 -> 5 -> 9) stay aligned
        h = stage.upsamplers[0](h, size=skips[-1].shape[-2:])
    return h


def _res_attention(stage: Stage, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                   skips: list[torch.Tensor]) -> torch.Tensor:
    """A down level's res blocks, each followed by its transformer if any, recording every output."""
    for i, resnet in enumerate(stage.resnets):
        h = resnet(h, emb)
        if len(stage.attentions):
            h = stage.attentions[i](h, context)
        skips.append(h)
    return h
