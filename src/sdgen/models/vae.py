"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), as SD 1.x / 2.x / XL use it.

Parameter names are those of a diffusers `vae/` folder (`encoder.down_blocks.0.resnets.0...`).
`encode` and `decode` work on unscaled latents: the pipeline applies `scaling_factor` (and
`shift_factor`, `latents_mean` / `latents_std` where a model has them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdgen.models.layers import Downsample, ResBlock, SelfAttention2d, Stage, Upsample, group_norm

_DOWN, _UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
_EPS = 1e-6  # every norm of the SD VAE uses this epsilon

# diffusers fields we accept only at the value the SD family uses: (field, allowed values, why)
_FIXED_FIELDS = (
    ("act_fn", ("silu",), "the activation is SiLU"),
    ("norm_type", ("group",), "spatial (MoVQ) norms are not supported"),
)


@dataclass(frozen=True)
class VAEConfig:
    """Shape and latent statistics of an AutoencoderKL; defaults are the SD 1.x / 2.x VAE's."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder order; the decoder reverses it
    layers_per_block: int = 2  # encoder res blocks per level; the decoder has one more
    norm_num_groups: int = 32
    mid_block_attention: bool = True  # self-attention between the two mid res blocks
    use_quant_conv: bool = True  # 1x1 convs around the latent (absent in SD3 / Flux VAEs)
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215  # latents * scaling_factor have about unit variance (SDXL: 0.13025)
    shift_factor: float | None = None  # subtracted before scaling where a model defines it
    latents_mean: tuple[float, ...] | None = None  # per-channel latent statistics (Playground v2.5)
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # decode in float32 even when the U-Net runs in half precision
    sample_size: int = 512

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels: give at least one level")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                     "block_out_channels"):
            values = getattr(self, name)
            for value in values if isinstance(values, tuple) else (values,):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name}: expected positive integers, got {value!r}")
        if isinstance(self.scaling_factor, bool) or not isinstance(self.scaling_factor, (int, float)) \
                or self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor: expected a positive number, got {self.scaling_factor!r}")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels: {channels} is not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.latent_channels:
                raise ValueError(f"{name}: give one value per latent channel ({self.latent_channels})")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (levels - 1), 8 for SD."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> VAEConfig:
        """Read a diffusers `vae/config.json` dict; ValueError names any unsupported field."""
        for name, allowed, why in _FIXED_FIELDS:
            if name in config and config[name] not in allowed:
                raise ValueError(f"vae config {name}={config[name]!r} is not supported: {why}")
        block_out = tuple(config.get("block_out_channels", (64,)))
        for name, block in (("down_block_types", _DOWN), ("up_block_types", _UP)):
            types = list(config.get(name, (block,)))
            if types != [block] * len(block_out):
                raise ValueError(f"vae config {name}: expected {len(block_out)} x {block!r} "
                                 f"(one per block_out_channels), got {types}")
        layers = config.get("layers_per_block", 1)
        if not isinstance(layers, int):
            raise ValueError(f"vae config layers_per_block: one int for all levels is supported, got {layers}")
        sample_size = config.get("sample_size", 32)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        mean, std = config.get("latents_mean"), config.get("latents_std")
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            latent_channels=config.get("latent_channels", 4),
            block_out_channels=block_out,
            layers_per_block=layers,
            norm_num_groups=config.get("norm_num_groups", 32),
            mid_block_attention=bool(config.get("mid_block_add_attention", True)),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
            scaling_factor=config.get("scaling_factor", 0.18215),
            shift_factor=config.get("shift_factor"),
            latents_mean=tuple(mean) if mean is not None else None,
            latents_std=tuple(std) if std is not None else None,
            force_upcast=bool(config.get("force_upcast", True)),
            sample_size=sample_size,
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `vae/config.json` dict for this config."""
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [_DOWN] * levels,
            "up_block_types": [_UP] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": list(self.latents_mean) if self.latents_mean is not None else None,
            "latents_std": list(self.latents_std) if self.latents_std is not None else None,
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_attention,
        }


@dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element (Kingma & Welling 2014)."""

    mean: torch.Tensor
    logvar: torch.Tensor  # clamped to [-30, 20] as LDM does, so exp() stays finite

    @property
    def std(self) -> torch.Tensor:
        """Standard deviation exp(logvar / 2)."""
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std * eps, eps from `generator` (same draws as diffusers)."""
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean


def _mid_block(channels: int, groups: int, attention: bool) -> Stage:
    """Res block, optional single-head self-attention, res block, at the lowest resolution."""
    resnets = [ResBlock(channels, channels, None, groups, _EPS) for _ in range(2)]
    return Stage(resnets, [SelfAttention2d(channels, groups, _EPS)] if attention else None)


class Encoder(nn.Module):
    """Pixels -> posterior parameters (2 * latent_channels), downsampling 2x per level but the last."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        c_in = channels[0]
        for level, c_out in enumerate(channels):
            resnets = [ResBlock(c_in if i == 0 else c_out, c_out, None, groups, _EPS)
                       for i in range(cfg.layers_per_block)]
            is_last = level == len(channels) - 1
            self.down_blocks.append(Stage(resnets, downsampler=None if is_last else Downsample(c_out, asymmetric=True)))
            c_in = c_out
        self.mid_block = _mid_block(channels[-1], groups, cfg.mid_block_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down_blocks:
            for resnet in stage.resnets:
                h = resnet(h)
            if stage.downsamplers is not None:
                h = stage.downsamplers[0](h)
        h = _run_mid(self.mid_block, h)
        return self.conv_out(group_norm(self.conv_norm_out, h, silu=True))


class Decoder(nn.Module):
    """Latents -> pixels, upsampling 2x per level but the last, with layers_per_block + 1 res blocks each."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[-1], 3, padding=1)
        self.mid_block = _mid_block(channels[-1], groups, cfg.mid_block_attention)
        self.up_blocks = nn.ModuleList()
        c_in = channels[-1]
        for level in reversed(range(len(channels))):
            c_out = channels[level]
            resnets = [ResBlock(c_in if i == 0 else c_out, c_out, None, groups, _EPS)
                       for i in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(Stage(resnets, upsampler=Upsample(c_out) if level > 0 else None))
            c_in = c_out
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid_block, self.conv_in(z))
        for stage in self.up_blocks:
            for resnet in stage.resnets:
                h = resnet(h)
            if stage.upsamplers is not None:
                h = stage.upsamplers[0](h)
        return self.conv_out(group_norm(self.conv_norm_out, h, silu=True))


def _run_mid(stage: Stage, h: torch.Tensor) -> torch.Tensor:
    """Mid block: res, attention (if any), res."""
    h = stage.resnets[0](h)
    if len(stage.attentions):
        h = stage.attentions[0](h)
    return stage.resnets[1](h)


class AutoencoderKL(nn.Module):
    """SD's VAE: `encode` pixels in [-1, 1] to a DiagonalGaussian over latents, `decode` latents to pixels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.channels_last = False  # NHWC activations: oneDNN's native layout (set by sdgen.runtime.fast)
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if cfg.use_post_quant_conv else None

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussian:
        """Posterior over unscaled latents for images (b, in_channels, h, w); sizes are best multiples of the factor."""
        if pixels.ndim != 4 or pixels.shape[1] != self.cfg.in_channels:
            raise ValueError(f"pixels: expected (batch, {self.cfg.in_channels}, height, width), "
                             f"got {tuple(pixels.shape)}")
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        moments = self.encoder(pixels).contiguous()
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] for unscaled latents (b, latent_channels, h, w)."""
        if latents.ndim != 4 or latents.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"latents: expected (batch, {self.cfg.latent_channels}, height, width), "
                             f"got {tuple(latents.shape)}")
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents).contiguous()

    def forward(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction: decode a posterior sample of the encoded pixels."""
        return self.decode(self.encode(pixels).sample(generator))
