"""A tiny latent decoder for live previews: the architecture of TAESD (diffusers' AutoencoderTiny
decoder), plain 3x3 convolutions and ReLUs with about 1.2 M weights.

It decodes the U-Net's latents (already multiplied by the VAE's scaling factor) to an image in
[-1, 1] in a few percent of the full VAE decoder's time (bench/RESULTS.md), at a visible cost in
detail: it is for previews, never for the saved image. Its weights must be trained against one
VAE's latent space: the embedded model ships its own (`tiny_decoder.safetensors` in the model
folder, distilled by `sdgen train tiny_decoder`); `load_tiny_decoder` reads the user's:
- a diffusers AutoencoderTiny folder (config.json and diffusion_pytorch_model.safetensors), or
- a single TAESD decoder file (.safetensors, or a pickled .pth read without running its code),
  in TAESD's own key names (an nn.Sequential whose first entry is the clamp) or diffusers' names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdgen.checkpoints.diffusers_folder import allowed_roots, load_component_weights, read_json
from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.formats import load_state_dict


@dataclass(frozen=True)
class TinyDecoderConfig:
    latent_channels: int = 4
    out_channels: int = 3
    channels: tuple[int, ...] = (64, 64, 64, 64)
    blocks: tuple[int, ...] = (3, 3, 3, 1)  # residual blocks per stage; stages but the last end with a 2x upsampling


FOLDER_FILE = "tiny_decoder.safetensors"  # a model folder's own preview decoder, if it has one
LATENT_CLAMP = 3.0  # latents are soft-clamped to +-3 (tanh) before the first convolution, whatever the config says


class TinyBlock(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + x)


class TinyDecoder(nn.Module):
    """`layers` holds the same entries at the same indices as diffusers' DecoderTiny, so its weight
    names are diffusers' without the `decoder.` prefix."""

    def __init__(self, cfg: TinyDecoderConfig = TinyDecoderConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, cfg.channels[0], 3, padding=1), nn.ReLU()]
        for stage, (channels, blocks) in enumerate(zip(cfg.channels, cfg.blocks)):
            final = stage == len(cfg.blocks) - 1
            layers += [TinyBlock(channels) for _ in range(blocks)]
            if not final:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(nn.Conv2d(channels, cfg.out_channels if final else channels, 3, padding=1, bias=final))
        self.layers = nn.Sequential(*layers)

    @property
    def upscale(self) -> int:
        return 2 ** (len(self.cfg.blocks) - 1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """U-Net-scale latents (batch, latent_channels, h, w) -> images in about [-1, 1] (not clamped)."""
        x = torch.tanh(latents / LATENT_CLAMP) * LATENT_CLAMP
        return self.layers(x) * 2 - 1


_BLOCK_WEIGHT = re.compile(r"layers\.(\d+)\.conv\.0\.weight")
_CONV_WEIGHT = re.compile(r"layers\.(\d+)\.weight")


def _diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as TinyDecoder's: diffusers' `decoder.layers.N...` or TAESD's `N...` (N one higher: its
    Sequential starts with the clamp). Encoder weights, if the file has them, are left out."""
    if any(key.startswith("decoder.layers.") for key in state):
        return {key[len("decoder."):]: value for key, value in state.items() if key.startswith("decoder.layers.")}
    if any(key.startswith("layers.") for key in state):
        return state
    renamed = {}
    for key, value in state.items():
        index, dot, rest = key.partition(".")
        if not (index.isdigit() and dot and int(index) > 0):
            return {}
        renamed[f"layers.{int(index) - 1}.{rest}"] = value
    return renamed


def config_from_state(state: dict[str, torch.Tensor]) -> TinyDecoderConfig:
    """The decoder's shape read from its weights: the stages are the runs of residual blocks between
    convolutions after the first; ValueError when the weights do not have that layout."""
    convs = sorted(int(m.group(1)) for key in state if (m := _CONV_WEIGHT.fullmatch(key)))
    blocks = sorted(int(m.group(1)) for key in state if (m := _BLOCK_WEIGHT.fullmatch(key)))
    if len(convs) < 2 or convs[0] != 0 or not blocks:
        raise ValueError("no tiny decoder weights (layers.0.weight and residual blocks)")
    first, last = state["layers.0.weight"], state[f"layers.{convs[-1]}.weight"]
    if first.ndim != 4 or last.ndim != 4:
        raise ValueError("the first and last convolution weights are not 4-D")
    stage_blocks, channels = [], []
    for start, end in zip(convs, convs[1:]):
        inside = [index for index in blocks if start < index < end]
        if not inside:
            raise ValueError(f"no residual block between convolutions {start} and {end}")
        stage_blocks.append(len(inside))
        channels.append(int(state[f"layers.{inside[0]}.conv.0.weight"].shape[0]))
    return TinyDecoderConfig(latent_channels=int(first.shape[1]), out_channels=int(last.shape[0]),
                             channels=tuple(channels), blocks=tuple(stage_blocks))


def load_tiny_decoder(path: str | Path, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> TinyDecoder:
    """A tiny decoder from a diffusers AutoencoderTiny folder or a single TAESD decoder file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder", "pass a TAESD decoder file or an AutoencoderTiny folder")
    if path.is_dir():
        config = read_json(path / "config.json")
        if config.get("_class_name") != "AutoencoderTiny":
            raise CheckpointError(path / "config.json", f"not an AutoencoderTiny config "
                                  f"({str(config.get('_class_name'))[:60]})", "pass a TAESD (AutoencoderTiny) folder")
        if config.get("upsampling_scaling_factor", 2) != 2 or config.get("act_fn", "relu") != "relu" or (
                config.get("upsample_fn", "nearest") != "nearest"):
            raise CheckpointError(path / "config.json", "an AutoencoderTiny variant other than TAESD's "
                                  "(2x nearest upsampling, ReLU)", "pass a TAESD folder")
        weights = load_component_weights(path, "diffusers", allowed_roots(path))[0]
    else:
        weights, _ = load_state_dict(path)
    state = _diffusers_names(weights)
    try:
        cfg = config_from_state(state)
        with torch.device("meta"):
            decoder = TinyDecoder(cfg)
        decoder.load_state_dict(state, strict=True, assign=True)
    except (ValueError, RuntimeError, KeyError) as error:
        problem = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise CheckpointError(path, f"not a tiny (TAESD) decoder: {problem}",
                              "pass a TAESD decoder file or an AutoencoderTiny folder") from None
    return decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def folder_tiny_decoder(model_path: str | Path | None) -> Path | None:
    """The preview decoder a model folder ships beside its VAE (None: the embedded model), if any;
    None for a single-file model."""
    if model_path is None:
        from sdgen.pipelines.loading import embedded_model_path

        model_path = embedded_model_path()
    path = Path(model_path) / FOLDER_FILE
    return path if path.is_file() else None
