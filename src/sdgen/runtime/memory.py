"""Memory of a generation job, estimated before anything is allocated, against what the machine has free.

On a CPU an allocation that does not fit is not an exception: the kernel's OOM killer ends the
process. So a job is sized first and refused with a hint when it would not fit. The estimate
is the peak of the two heavy phases (the weights are already resident and not counted):
- one U-Net call on `batch_size` images (twice that with classifier-free guidance): the skip
  connections kept for the decoder, a working set of a few feature maps at the finest level,
  and one head's attention matrix there (PyTorch's fused attention never holds all heads);
- one VAE decode (images are decoded one at a time, in tiles above a size): a working set of
  feature maps at full resolution with the decoder's widest full-resolution channel count,
  plus the mid block's attention over the latent.
Free memory is Linux's MemAvailable, lowered to the cgroup's limit when a container sets one;
elsewhere the check is skipped. It is an estimate from the configs, not a measurement: its job is
to stop the requests that are far out of reach (a 4096x4096 image on a laptop), with a hint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sdgen.errors import UserError

GIB = 1 << 30
WORKING_MAPS_UNET = 6  # resnet input/output, norm, attention q/k/v/out and the 4x-wide feed-forward, at once
WORKING_MAPS_VAE = 4  # conv input, norm output, conv output, residual
HEADROOM = 0.9  # leave a tenth of the free memory to the rest of the system
DECODE_TILE_LATENT = 96  # the pipeline decodes latents larger than 128x128 in tiles of 96 (+ overlap)
DECODE_TILED_ABOVE = 128 * 128


class InsufficientMemoryError(UserError):
    """A job that would not fit in the free memory; the message says how much and what to change."""


@dataclass(frozen=True)
class JobEstimate:
    """Bytes of the heavy phases of one job."""

    unet_bytes: int
    vae_bytes: int
    output_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max(self.unet_bytes, self.vae_bytes) + self.output_bytes


def _cgroup_free() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), or None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Free bytes for a job on `device`, or None where we cannot tell (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    cgroup = _cgroup_free()
    return free if cgroup is None else min(free, cgroup)


def estimate_job(unet_cfg, vae_cfg, *, width: int, height: int, batch_size: int, n: int, guidance: bool,
                 dtype: torch.dtype, latent_factor: int) -> JobEstimate:
    """Peak bytes of a txt2img / img2img job with these model configs and sizes (see the module docstring)."""
    item = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    calls = batch_size * (2 if guidance else 1)
    latent_h, latent_w = height // latent_factor, width // latent_factor
    skips, finest = 0, 0
    for level, (channels, blocks) in enumerate(zip(unet_cfg.block_out_channels, unet_cfg.layers_per_block)):
        area = math.ceil(latent_h / 2**level) * math.ceil(latent_w / 2**level)
        skips += (blocks + 1) * channels * area
        finest = max(finest, channels * area)
    tokens = latent_h * latent_w
    attention = tokens * tokens * 4 if any(unet_cfg.attention) else 0  # scores in float32
    unet = calls * (item * (skips + WORKING_MAPS_UNET * finest * 4) + attention)

    vae_item = 4 if vae_cfg.force_upcast else item
    if latent_h * latent_w > DECODE_TILED_ABOVE:  # tiled decode: one tile's worth at a time
        latent_h = latent_w = min(DECODE_TILE_LATENT, max(latent_h, latent_w))
    pixels = latent_h * latent_w * latent_factor**2
    widest = max(vae_cfg.block_out_channels[:2])  # the decoder's last two levels run at full and half size
    mid_tokens = latent_h * latent_w
    vae = vae_item * WORKING_MAPS_VAE * widest * pixels + (mid_tokens * mid_tokens * 4 if vae_cfg.mid_block_attention else 0)
    outputs = n * (width * height * 3 * (4 + 1) + vae_cfg.latent_channels * (height // latent_factor)
                   * (width // latent_factor) * 4)
    return JobEstimate(unet, vae, outputs)


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def check_job_memory(pipeline, request, available: int | None = None) -> JobEstimate:
    """Refuse (InsufficientMemoryError) a request whose estimate exceeds the free memory, before allocating."""
    width, height = getattr(request, "hires_size", None) or (request.width, request.height)
    width, height = max(width, request.width), max(height, request.height)
    estimate = estimate_job(pipeline.unet.cfg, pipeline.vae.cfg, width=width, height=height,
                            batch_size=request.batch_size, n=request.n, guidance=request.cfg_scale != 1.0,
                            dtype=pipeline.dtype, latent_factor=pipeline.latent_factor)
    free = available_memory(pipeline.device) if available is None else available
    if free is not None and estimate.peak_bytes > free * HEADROOM:
        hints = ["a smaller width and height (generate smaller, then upscale)"]
        if request.batch_size > 1:
            hints.insert(0, "--batch-size 1")
        if pipeline.dtype == torch.float32:
            hints.append("--dtype bf16 (halves the activations)")
        hints.append("tiled VAE decoding is already used above 1024x1024")
        raise InsufficientMemoryError(
            f"a {width}x{height} job with batch size {request.batch_size} needs about {_gib(estimate.peak_bytes)} "
            f"of memory but {_gib(free)} is free; try {', '.join(hints)}")
    return estimate
