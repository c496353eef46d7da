"""Building a pipeline from a checkpoint: modules made on the meta device, weights assigned from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.parts import CheckpointParts
from sdgen.checkpoints.reader import read_checkpoint, read_vae
from sdgen.diffusion.schedules import DiscreteSchedule
from sdgen.errors import UserError
from sdgen.models.clip_config import CLIPTextConfig
from sdgen.models.clip import CLIPTextModel
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.models.unet import UNet, UNetConfig
from sdgen.models.vae import AutoencoderKL, VAEConfig
from sdgen.runtime.device import pick_device, pick_dtype
from sdgen.runtime.mapped import cast_state

SD2_PAD_TOKEN = "!"  # SD 2.x (OpenCLIP) pads with "!" (id 0), SD 1.x with the end token


def embedded_model_path() -> Path:
    """The model trained by this project and shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "data" / "embedded"


def build_module(source: Path, what: str, factory: Callable[[], torch.nn.Module],
                 state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Make the module without allocating weights, then take the file's tensors as its parameters."""
    with torch.device("meta"):
        module = factory()
    # cast tensor by tensor, handing each one's mapped file pages back: fp16 -> bf16 no longer
    # holds the whole file resident next to the cast copy (sdgen/runtime/mapped.py)
    state = cast_state(state, device, dtype)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        missing = [k for k in module.state_dict() if k not in state]
        unexpected = [k for k in state if k not in module.state_dict()]
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "")
        if not detail:
            detail = str(error).splitlines()[-1].strip()
        raise CheckpointError(source, f"the {what} weights do not fit its architecture ({detail.strip()})",
                              "check that the file is a complete Stable Diffusion checkpoint") from None
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(folder: Path | None, family: str) -> CLIPTokenizer:
    if folder is not None:
        return CLIPTokenizer.from_folder(folder)
    return CLIPTokenizer.default(pad_token=SD2_PAD_TOKEN) if family == "sd2" else CLIPTokenizer.default()


def load_pipeline(path: str | Path | None = None, *, vae: str | Path | None = None, config: str | Path | None = None,
                  prediction: str | None = None, device: str = "auto", dtype: str = "fp32"):
    """Read a checkpoint (or the embedded model) and return a ready pipeline: `StableDiffusion` for
    SD 1.x / 2.x, `StableDiffusionXL` for SDXL base and refiner checkpoints."""
    from sdgen.pipelines.sdxl import StableDiffusionXL
    from sdgen.pipelines.stable_diffusion import StableDiffusion

    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    if path is None:
        path = embedded_model_path()
        if not (path / "model_index.json").exists():
            raise UserError(f"the embedded model is missing from {path}; reinstall sdgen or pass --model PATH")
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; pass a diffusers folder, .safetensors or .ckpt")
    try:
        parts = read_checkpoint(path, prediction=prediction, config_dir=config)
    except ValueError as error:
        raise CheckpointError(path, str(error), "check the options given with the model") from None
    if vae is not None:
        scaling = parts.vae_config["scaling_factor"] if parts.vae_config else None
        parts.vae_config, parts.vae_state = read_vae(vae, scaling_factor=scaling)
    if not parts.vae_state:
        raise CheckpointError(path, "the checkpoint has no VAE weights", "pass --vae PATH")
    pipeline = StableDiffusionXL if parts.family in ("sdxl", "sdxl_refiner") else StableDiffusion
    try:
        return pipeline.from_parts(parts, device=torch_device, dtype=torch_dtype, vae_source=vae)
    except ValueError as error:  # configs that do not fit together (e.g. text widths vs the U-Net)
        raise CheckpointError(path, str(error), "check that the file is a complete checkpoint") from None


def build_components(parts: CheckpointParts, device: torch.device, dtype: torch.dtype):
    """(unet, vae, text_encoder, tokenizer, schedule) for an SD 1.x / 2.x checkpoint."""
    unet_cfg = UNetConfig.from_diffusers(parts.unet_config)
    vae_cfg = VAEConfig.from_diffusers(parts.vae_config)
    text_config, text_state = parts.text_encoders[0]
    text_cfg = CLIPTextConfig.from_transformers(text_config)
    unet = build_module(parts.source, "U-Net", lambda: UNet(unet_cfg), parts.unet_state, device, dtype)
    vae = build_vae(parts, vae_cfg, device, dtype)
    text_encoder = build_module(parts.source, "text encoder", lambda: CLIPTextModel(text_cfg), text_state, device, dtype)
    tokenizer = load_tokenizer(parts.tokenizer_dirs[0], parts.family)
    schedule = DiscreteSchedule.from_diffusers_scheduler_config(parts.scheduler_config)
    return unet, vae, text_encoder, tokenizer, schedule


def build_vae(parts: CheckpointParts, vae_cfg: VAEConfig, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE, in float32 when the model says so and the compute dtype is fp16 (SD's and SDXL's VAEs overflow)."""
    vae_dtype = torch.float32 if vae_cfg.force_upcast and dtype == torch.float16 else dtype
    return build_module(parts.source, "VAE", lambda: AutoencoderKL(vae_cfg), parts.vae_state, device, vae_dtype)


def build_sdxl_components(parts: CheckpointParts, device: torch.device, dtype: torch.dtype):
    """(unet, vae, SDXLTextEncoder, schedule) for an SDXL base (CLIP-L + bigG) or refiner (bigG) checkpoint."""
    from sdgen.checkpoints.ldm_keys import TEXT_ENCODERS
    from sdgen.pipelines.sdxl_conditioning import SDXLTextEncoder

    unet_cfg = UNetConfig.from_diffusers(parts.unet_config)
    unet = build_module(parts.source, "U-Net", lambda: UNet(unet_cfg), parts.unet_state, device, dtype)
    vae = build_vae(parts, VAEConfig.from_diffusers(parts.vae_config), device, dtype)
    encoders, tokenizers = [], []
    kinds = [kind for kind, _ in TEXT_ENCODERS[parts.family]]
    for index, ((config, state), folder) in enumerate(zip(parts.text_encoders, parts.tokenizer_dirs)):
        cfg = CLIPTextConfig.from_transformers(config)
        what = f"text encoder {index + 1}"
        encoders.append(build_module(parts.source, what, lambda cfg=cfg: CLIPTextModel(cfg), state, device, dtype))
        # OpenCLIP's tokenizer pads with "!" (id 0) after the end token, OpenAI CLIP's with the end token.
        tokenizers.append(load_tokenizer(folder, "sd2" if kinds[index] == "openclip" else "sd1"))
    schedule = DiscreteSchedule.from_diffusers_scheduler_config(parts.scheduler_config)
    return unet, vae, SDXLTextEncoder(encoders, tokenizers), schedule
