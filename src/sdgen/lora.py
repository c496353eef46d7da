"""LoRA (Hu et al. 2021) files in the kohya-ss / AUTOMATIC1111 and diffusers / PEFT layouts, merged
into sdgen's U-Net and CLIP text encoders for one run and taken out again bit-exactly.

Key layouts read (per adapted layer, a `down` (rank, in[, k, k]) and an `up` (out, rank[, 1, 1])):
- kohya-ss sd-scripts (networks/lora.py), what webui's Lora extension loads:
  `lora_unet_<diffusers module path, dots as underscores>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; text encoders `lora_te_` (SDXL `lora_te1_`, `lora_te2_`) + `text_model_encoder_layers_0_self_attn_q_proj`.
  SDXL files name U-Net layers after the original (ldm/sgm) model, `lora_unet_input_blocks_4_1_proj_in`:
  those resolve through `sdgen.checkpoints.ldm_keys.unet_key_map`. LoCon / C3Lier convolutions:
  `lora_down` is a k x k convolution, `lora_up` 1 x 1.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.` and
  `text_encoder_2.` prefixes; older diffusers `<module>.lora.down.weight` / `.lora.up.weight`,
  `...lora_linear_layer.down.weight` and attention processors `attn1.processor.to_q_lora.down.weight`.
  PEFT's alpha comes from `.alpha` keys or the `lora_adapter_metadata` JSON diffusers stores in
  the safetensors header (`unet.lora_alpha`, `unet.alpha_pattern`, `unet.use_rslora`); without
  either, alpha = rank.

The merge: W' = W + multiplier * (alpha / rank) * up @ down. The original Parameter objects are kept
aside and put back by `restore()` (never subtracted), so the model returns bit-exactly. LyCORIS
kinds (LoHa `hada_`, LoKr `lokr_`, `lora_mid`, DoRA `dora_scale`, OFT) are not supported: their
keys are reported with the unmatched ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.formats import file_sha256, load_state_dict
from sdgen.checkpoints.ldm_keys import unet_key_map
from sdgen.errors import UserError

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
# <module><part>: kohya, PEFT (optionally with an adapter name), older diffusers, alpha.
_KEY = re.compile(
    r"(?P<module>.+?)(?:"
    r"\.lora_(?P<kohya>down|up)\.weight"
    r"|\.lora_(?P<peft>[AB])(?:\.[\w-]+)?\.weight"
    r"|(?:\.lora|\.lora_linear_layer|_lora)\.(?P<diffusers>down|up)\.weight"
    r"|\.(?P<alpha>alpha))"
)
_TEXT_PREFIXES = (("lora_te_", 0), ("lora_te1_", 0), ("lora_te2_", 1), ("text_encoder.", 0), ("text_encoder_2.", 1))
# Attention-processor names of older diffusers files -> module names.
_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class LoraError(UserError):
    """A LoRA name or file that cannot be used: the message says which and what to do."""


@dataclass
class LoraModule:
    """One adapted layer as the file names it: down (rank, in[, k, k]), up (out, rank[, 1, 1]), alpha."""

    key: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scale(self, use_rslora: bool = False) -> float:
        """alpha / rank (alpha / sqrt(rank) for rsLoRA); alpha defaults to the rank."""
        alpha = self.rank if self.alpha is None or self.alpha == 0 else self.alpha
        return alpha / (math.sqrt(self.rank) if use_rslora else self.rank)

    def delta(self) -> torch.Tensor:
        """up @ down in float32, shaped like the adapted weight ((out, in) or (out, in, k, k))."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)  # the 1x1 `up` makes the conv case a matmul too
        return product.reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else product


@dataclass
class LoraFile:
    """A LoRA's adapted layers by key, and the keys of kinds we do not read."""

    name: str
    modules: dict[str, LoraModule]
    path: Path | None = None
    unsupported: list[str] = field(default_factory=list)
    use_rslora: bool = False

    @property
    def shorthash(self) -> str | None:
        """First 12 hex digits of the file's sha256, as webui's "Lora hashes" infotext shows."""
        return file_sha256(self.path)[:12] if self.path is not None else None


def _alpha_from_metadata(metadata: dict[str, str], key: str) -> tuple[float | None, bool]:
    """PEFT alpha for a `unet.` / `text_encoder.` key from diffusers' lora_adapter_metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, False
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None, False
    component, _, module = key.partition(".")
    alpha = config.get(f"{component}.lora_alpha")
    for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            alpha = value
    return (float(alpha) if isinstance(alpha, (int, float)) else None), bool(config.get(f"{component}.use_rslora"))


def lora_from_state_dict(state: dict[str, torch.Tensor], name: str, metadata: dict[str, str] | None = None,
                         path: Path | None = None) -> LoraFile:
    """Group a flat LoRA state dict by adapted layer (see the module docstring for the layouts)."""
    modules: dict[str, LoraModule] = {}
    unsupported: list[str] = []
    use_rslora = False
    for key, tensor in state.items():
        match = _KEY.fullmatch(key)
        if match is None or not tensor.is_floating_point():
            unsupported.append(key)
            continue
        module = modules.setdefault(match["module"], LoraModule(match["module"]))
        if match["alpha"]:
            if tensor.numel() != 1:
                raise LoraError(f"{path or name}: {key} should hold one number, has shape {tuple(tensor.shape)}")
            module.alpha = float(tensor.float().reshape(()))
            continue
        part = match["kohya"] or match["diffusers"] or {"A": "down", "B": "up"}[match["peft"]]
        if tensor.ndim not in (2, 4):
            raise LoraError(f"{path or name}: {key} has shape {tuple(tensor.shape)}; expected a matrix or a convolution kernel")
        setattr(module, part, tensor)
    for key, module in list(modules.items()):
        if module.down is None or module.up is None:
            unsupported += [f"{key} (no {'up' if module.up is None else 'down'} weight)"]
            del modules[key]
        elif module.down.shape[0] != module.up.shape[1] or (module.up.ndim == 4 and module.up.shape[2:] != (1, 1)):
            raise LoraError(f"{path or name}: {key} has down {tuple(module.down.shape)} and up "
                            f"{tuple(module.up.shape)}, which do not multiply")
        elif module.alpha is None and metadata:
            module.alpha, rslora = _alpha_from_metadata(metadata, key)
            use_rslora = use_rslora or rslora
    return LoraFile(name, modules, path, unsupported, use_rslora)


def read_lora(path: str | Path, name: str | None = None) -> LoraFile:
    """Read a LoRA file (.safetensors, or a pickled .pt/.ckpt through the restricted unpickler)."""
    path = Path(path)
    try:
        state, metadata = load_state_dict(path)
    except CheckpointError as error:
        raise LoraError(str(error)) from None
    lora = lora_from_state_dict(state, name or path.stem, metadata, path)
    if not lora.modules:
        raise LoraError(f"{path}: no LoRA layers found (keys like lora_unet_...lora_down.weight or "
                        f"unet....lora_A.weight); is this a LoRA file?")
    return lora


# Finding LoRA files by name ----------------------------------------------------------------------


def available_loras(folder: str | Path) -> dict[str, Path]:
    """LoRA names (file stems) -> files under `folder`, subfolders included; a name found twice
    keeps the first in sorted order, .safetensors before the pickle formats."""
    root = Path(folder)
    found: dict[str, Path] = {}
    for directory, subdirectories, names in os.walk(root):  # symlinked folders are not entered
        subdirectories.sort()
        files = [Path(directory, n) for n in names if n.lower().endswith(LORA_SUFFIXES)]
        for file in sorted(files, key=lambda f: (LORA_SUFFIXES.index(f.suffix.lower()), f.name)):
            found.setdefault(file.stem, file)
    return found


def find_lora(folder: str | Path, name: str) -> Path:
    """The file of LoRA `name` in `folder`. The name is compared with file stems, never joined to
    the folder, so `../x`, absolute or encoded paths cannot leave it; a link out is refused."""
    root = Path(folder)
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise LoraError(f"LoRA name {name!r} is not a plain file name; use the name of a file in {root} without its extension")
    if not root.is_dir():
        raise LoraError(f"{root}: no such LoRA folder; create it or pass another --lora-dir")
    path = available_loras(root).get(name)
    if path is None:
        known = sorted(available_loras(root))
        listing = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
        raise LoraError(f"LoRA {name!r} not found in {root} (available: {listing})")
    if not path.resolve().is_relative_to(root.resolve()):
        raise LoraError(f"{path}: a link that leads outside {root}; refused")
    return path


# Merging ------------------------------------------------------------------------------------------


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _lookup_table(unet: nn.Module | None, text_encoders: Sequence[nn.Module]) -> dict[str, tuple[str, nn.Module]]:
    """Every name a LoRA file may use for a layer -> (our module path with component, module)."""
    table: dict[str, tuple[str, nn.Module]] = {}
    if unet is not None:
        try:
            original = unet_key_map(unet.cfg.to_diffusers()).to_original
        except (AttributeError, KeyError, ValueError):  # a layout with no single-file form
            original = None
        for name, module in _adaptable(unet).items():
            target = (f"unet.{name}", module)
            table[name] = table[f"unet.{name}"] = table["lora_unet_" + name.replace(".", "_")] = target
            ldm = original(name) if original else None
            if ldm is not None:
                table["lora_unet_" + ldm.replace(".", "_")] = target
    for prefix, index in _TEXT_PREFIXES:
        if index < len(text_encoders) and text_encoders[index] is not None:
            for name, module in _adaptable(text_encoders[index]).items():
                key = prefix + (name if prefix.endswith(".") else name.replace(".", "_"))
                table[key] = (f"text_encoder{'_2' if index else ''}.{name}", module)
    return table


def _normalise(key: str) -> str:
    """Older diffusers attention-processor names -> module names (`attn1.processor.to_q` -> `attn1.to_q`)."""
    if ".processor." not in key and not re.search(r"self_attn\.to_(q|k|v|out)$", key):
        return key
    head, _, last = key.replace(".processor.", ".").rpartition(".")
    names = _TEXT_PROCESSOR_NAMES if key.startswith("text_encoder") else _PROCESSOR_NAMES
    return f"{head}.{names.get(last, last)}"


@dataclass
class LoraHandle:
    """Merged LoRAs: `restore()` (or leaving the `with` block) puts the original weights back.
    `applied`: layers changed per LoRA; `unmatched`: keys of each LoRA that adapt nothing here
    (webui logs these too); `skipped`: layers whose shapes do not fit."""

    originals: list[tuple[nn.Module, nn.Parameter]] = field(default_factory=list)
    applied: dict[str, int] = field(default_factory=dict)
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def restore(self) -> None:
        """Put back the original Parameter objects (latest first), bit-exact; safe to call twice."""
        while self.originals:
            module, weight = self.originals.pop()
            module.weight = weight

    def __enter__(self) -> LoraHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _fit(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The delta shaped like the weight: 1x1 convolutions and linear layers are interchangeable
    (SD 1.x vs 2.x proj_in), and an inpainting conv_in (9 input channels) takes a 4-channel
    delta zero-padded, as webui does."""
    if delta.shape == weight.shape:
        return delta
    if delta.numel() == weight.numel() and delta.shape[:2] == weight.shape[:2]:
        return delta.reshape(weight.shape)
    if weight.ndim == 4 and delta.ndim == 4 and weight.shape[1] == 9 and delta.shape[1] == 4:
        return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, 5))
    return None


def apply_loras(unet: nn.Module | None, text_encoder: nn.Module | Sequence[nn.Module] | None,
                loras: Sequence[tuple[LoraFile, float | tuple[float, float]]]) -> LoraHandle:
    """Merge LoRAs into the models: W' = W + sum of multiplier * (alpha / rank) * up @ down.

    A multiplier is one number or (text encoder, U-Net) as in `<lora:name:te:unet>`;
    `text_encoder` may be a pair (SDXL). Use the result as a context manager or call restore()."""
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    table = _lookup_table(unet, encoders)
    handle = LoraHandle()
    pending: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    for lora, multiplier in loras:
        te_weight, unet_weight = multiplier if isinstance(multiplier, tuple) else (multiplier, multiplier)
        for key, module in lora.modules.items():
            found = table.get(_normalise(key))
            if found is None:
                handle.unmatched.setdefault(lora.name, []).append(key)
                continue
            target, layer = found
            weight = layer.weight
            delta = _fit(module.delta().to(weight.device), weight)
            if delta is None:
                handle.skipped.setdefault(lora.name, []).append(
                    f"{key}: delta {tuple(module.delta().shape)} does not fit {target} {tuple(weight.shape)}")
                continue
            strength = unet_weight if target.startswith("unet.") else te_weight
            total = pending.get(target, (layer, torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)))[1]
            pending[target] = (layer, total + (strength * module.scale(lora.use_rslora)) * delta)
            handle.applied[lora.name] = handle.applied.get(lora.name, 0) + 1
        for what in ("unmatched", "skipped"):
            keys = getattr(handle, what).get(lora.name, []) + (lora.unsupported if what == "unmatched" else [])
            if keys:
                log.warning("LoRA %s: %d %s key(s), e.g. %s", lora.name, len(keys), what, keys[0])
        if lora.unsupported:
            handle.unmatched.setdefault(lora.name, []).extend(lora.unsupported)
    with torch.no_grad():
        for layer, delta in pending.values():
            original = layer.weight
            merged = (original.float() + delta).to(original.dtype)
            handle.originals.append((layer, original))
            layer.weight = nn.Parameter(merged, requires_grad=original.requires_grad)
    return handle
