"""LoRA training (Hu et al. 2021) on the U-Net's attention blocks and optionally the text encoder,
saved with kohya-ss sd-scripts' key names (networks/lora.py), which AUTOMATIC1111, ComfyUI and
`sdgen.lora` read:

    lora_unet_<module path, dots as underscores>.lora_down.weight   (rank, in)  or (rank, in, 1, 1)
    lora_unet_<...>.lora_up.weight                                  (out, rank) or (out, rank, 1, 1)
    lora_unet_<...>.alpha                                           scalar; the update is alpha / rank * up @ down
    lora_te_text_model_encoder_layers_<i>_self_attn_q_proj...       text encoder layers, same parts

Targets as kohya's defaults: every Linear and 1x1 Conv2d inside the U-Net's transformer blocks
(`attentions.*`: proj_in, attn1/attn2 to_q/to_k/to_v/to_out.0, ff, proj_out) and, with the text
encoder, every Linear of its attention and MLP layers. With a conv rank (kohya's `conv_dim`, the
LoCon layout) also the ResNet blocks, down- and upsamplers: their 3x3 convolutions get a 3x3
`lora_down` and 1x1 `lora_up` of that rank, their Linear and 1x1 layers the ordinary rank.
The base weights stay frozen: a forward hook adds `multiplier * alpha / rank * up(down(x))` to
each target's output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from sdgen.runtime.files import write_bytes_atomically

UNET_PREFIX, TEXT_PREFIX = "lora_unet_", "lora_te_"


class Shared:
    """Frozen base-model parts a trainable module works on; its copies (the loop's EMA) share
    them instead of copying a whole model."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> "Shared":
        return self


class _Hooks(list):
    """Hook handles of an attached network; a copy starts detached."""

    def __deepcopy__(self, memo: dict) -> "_Hooks":
        return _Hooks()


CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")  # kohya's ResnetBlock2D, Downsample2D, Upsample2D


def lora_targets(unet: nn.Module, text_encoder: nn.Module | None = None,
                 convolutions: bool = False) -> dict[str, nn.Module]:
    """kohya name -> layer, for the U-Net's transformer blocks (with `convolutions`, its ResNet
    blocks and samplers too) and the text encoder's layers."""
    targets: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        dotted = f".{name}"
        in_block = ".attentions." in dotted or (convolutions and any(block in dotted for block in CONV_BLOCKS))
        is_conv = isinstance(module, nn.Conv2d)
        is_target = isinstance(module, nn.Linear) or (is_conv and (convolutions or module.kernel_size == (1, 1)))
        if in_block and is_target:
            targets[UNET_PREFIX + name.replace(".", "_")] = module
    if text_encoder is not None:
        for name, module in text_encoder.named_modules():
            if isinstance(module, nn.Linear) and (".self_attn." in name or ".mlp." in name):
                targets[TEXT_PREFIX + name.replace(".", "_")] = module
    return targets


class LoraLayer(nn.Module):
    """down (rank x in) then up (out x rank); up starts at zero so training starts from the base model."""

    def __init__(self, target: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(target, nn.Conv2d):  # a k x k down with the target's stride and padding, a 1x1 up
            self.down = nn.Conv2d(target.in_channels, rank, target.kernel_size, target.stride, target.padding,
                                  bias=False)
            self.up = nn.Conv2d(rank, target.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(target.in_features, rank, bias=False)
            self.up = nn.Linear(rank, target.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * (self.multiplier * float(self.alpha) / self.rank)


class LoraNetwork(nn.Module):
    """The LoRA layers of one model; `attach()` hooks them into the targets, `detach()` removes them.

    Only the LoRA layers are submodules (the base model is not), so checkpoints and the EMA copy
    the training loop keeps hold the adapter alone.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None, rank: int = 4,
                 alpha: float = 1.0, seed: int = 0, conv_rank: int | None = None,
                 conv_alpha: float | None = None) -> None:
        super().__init__()
        conv_alpha = conv_alpha if conv_alpha is not None else alpha
        for what, value in (("rank", rank), ("conv rank", conv_rank)):
            if value is not None and value < 1:
                raise ValueError(f"LoRA {what} must be >= 1, got {value}")
        for what, value in (("alpha", alpha), ("conv alpha", conv_alpha)):
            if value <= 0:
                raise ValueError(f"LoRA {what} must be > 0, got {value}")
        generator = torch.Generator().manual_seed(seed)  # the down projections' initialisation
        targets = lora_targets(unet, text_encoder, convolutions=conv_rank is not None)

        def layer_for(module: nn.Module) -> LoraLayer:
            spatial = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
            return LoraLayer(module, conv_rank if spatial else rank, conv_alpha if spatial else alpha, generator)

        self._targets = Shared(targets)
        self.layers = nn.ModuleDict({key: layer_for(m) for key, m in targets.items()})
        self.rank, self.alpha_value = rank, alpha
        self.conv_rank, self.conv_alpha = conv_rank, conv_alpha
        self._handles = _Hooks()

    def attach(self) -> "LoraNetwork":
        self.detach()
        for key, target in self._targets.value.items():
            layer = self.layers[key]
            self._handles.append(target.register_forward_hook(
                lambda module, args, output, layer=layer: output + layer(args[0]).to(output.dtype)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The adapter in kohya-ss / AUTOMATIC1111 key names (see the module docstring)."""
        state = {}
        for key, layer in self.layers.items():
            state[f"{key}.lora_down.weight"] = layer.down.weight.detach().to(dtype).contiguous()
            state[f"{key}.lora_up.weight"] = layer.up.weight.detach().to(dtype).contiguous()
            state[f"{key}.alpha"] = layer.alpha.detach().to(dtype)
        return state

    def save(self, path: str | Path, metadata: dict[str, str] | None = None,
             dtype: torch.dtype = torch.float32) -> Path:
        """Write a kohya-format `.safetensors` with kohya's `ss_` metadata (A1111 shows it)."""
        info = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.alpha_value), **(metadata or {})}
        if self.conv_rank is not None:  # as kohya records its network_args
            info["ss_network_args"] = json.dumps({"conv_dim": str(self.conv_rank), "conv_alpha": str(self.conv_alpha)})
        return write_bytes_atomically(path, save(self.kohya_state_dict(dtype), metadata=info))

