"""Latents of the training images encoded once and kept on disk (kohya's `cache_latents_to_disk`),
so no epoch runs the VAE encoder again and a second run on the same images starts at once.

Each entry is a safetensors file named by the sha256 of (image bytes, bucket, VAE weights): an
edited image, another bucket or another VAE gets its own entry, never a stale one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from sdgen.models.vae import AutoencoderKL
from sdgen.runtime.files import write_bytes_atomically
from sdgen.train.finetune.data import load_bucketed


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """sha256 of the VAE's config and weights (its identity for the cache)."""
    digest = hashlib.sha256(repr(vae.cfg).encode())
    for name, tensor in vae.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_latents(paths: list[Path], buckets: list[tuple[int, int]], vae: AutoencoderKL,
                  folder: Path) -> list[torch.Tensor]:
    """Posterior means (c, h, w) in float32 of each image at its bucket, read from or written to `folder`.

    The VAE's scaling factor is not applied: the cache stays valid whatever the model says it is.
    """
    folder.mkdir(parents=True, exist_ok=True)
    identity = vae_fingerprint(vae)
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    latents = []
    for path, bucket in zip(paths, buckets):
        key = hashlib.sha256(f"{_file_sha256(path)} {bucket[0]}x{bucket[1]} {identity}".encode()).hexdigest()
        entry = folder / f"{key[:32]}.safetensors"
        if entry.is_file():
            latents.append(load_file(str(entry))["latent"])
            continue
        pixels = load_bucketed(path, bucket).unsqueeze(0).to(device, dtype)
        with torch.no_grad():
            latent = vae.encode(pixels).mean[0].float().cpu().contiguous()
        write_bytes_atomically(entry, save({"latent": latent}, metadata={"image": path.name}))
        latents.append(latent)
    return latents
