"""`sdgen eval`: generate for a prompt set, check each image's claims, report accuracy and PSNR."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdgen.errors import UserError
from sdgen.models.tiny_decoder import folder_tiny_decoder, load_tiny_decoder
from sdgen.train.scenes.checker import accuracy_by_category, check_caption
from sdgen.train.scenes.dataset import SceneDataset, heldout_prompts
from sdgen.train.scenes.parse import CaptionError, parse_caption


@dataclass
class EvalReport:
    """Claim accuracy per category over the prompts, autoencoder PSNR and timing."""

    accuracy: dict[str, tuple[int, int]]
    prompt_accuracy: float  # fraction of prompts whose claims all hold
    psnr_db: float
    seconds_per_image: float
    skipped: list[str] = field(default_factory=list)
    tiny_decoder: dict[str, float] | None = None  # the model's preview decoder against its VAE, if it has one

    def lines(self) -> list[str]:
        rows = [f"{'category':<12} {'accuracy':>8}  claims"]
        for category, (passed, total) in self.accuracy.items():
            rows.append(f"{category:<12} {passed / total:>8.3f}  {passed}/{total}")
        rows.append(f"{'prompts':<12} {self.prompt_accuracy:>8.3f}  (all claims of a prompt hold)")
        rows.append(f"autoencoder PSNR {self.psnr_db:.2f} dB; {self.seconds_per_image:.2f} s per image")
        if self.tiny_decoder:
            t = self.tiny_decoder
            rows.append(f"tiny preview decoder against the VAE: {t['scenes_psnr_db']:.2f} dB on held-out scenes, "
                        f"{t['final_psnr_db']:.2f} dB on the final latents, {t['preview_psnr_db']:.2f} dB on "
                        f"the mid-run previews; {t['time_ratio']:.2f}x the VAE decode's time")
        if self.skipped:
            rows.append(f"skipped {len(self.skipped)} prompt(s) outside the scene grammar, e.g. {self.skipped[0]!r}")
        return rows


def read_prompts(path: str | Path | None, count: int) -> list[str]:
    """One caption per line from `path` (blank lines and `#` comments skipped), or the held-out set."""
    if path is None:
        return heldout_prompts(count)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such prompt file (one caption per line)")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


def psnr_db(images: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per-image PSNR in dB of pixels in [-1, 1] (batch first)."""
    mse = ((images.float().clamp(-1, 1) - reference.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-12))).tolist()


def heldout_scene_batches(pipe, scenes: int, seed: int = 7):
    """Rendered held-out scenes at the model's native size, 32 at a time, as pixels in [-1, 1]."""
    dataset = SceneDataset(seed=seed, size=pipe.native_size, split="heldout", batch_size=32)
    for index in range(math.ceil(scenes / 32)):
        yield dataset.batch(index).images[:scenes - 32 * index]


def autoencoder_psnr(pipe, scenes: int = 128, seed: int = 7) -> float:
    """Mean PSNR of VAE reconstructions (posterior mean, decoded) on rendered held-out scenes."""
    values = []
    vae_dtype = next(pipe.vae.parameters()).dtype
    for images in heldout_scene_batches(pipe, scenes, seed):
        with torch.inference_mode():
            latents = pipe.vae.encode(images.to(pipe.device, vae_dtype)).mean
            decoded = pipe.vae.decode(latents).float().cpu()
        values += psnr_db(decoded, images)
    return float(np.mean(values))


def tiny_decoder_quality(pipe, decoder, final: list[torch.Tensor], previews: list[torch.Tensor],
                         scenes: int = 128) -> dict[str, float]:
    """The preview decoder's pictures against the full VAE decode of the same U-Net-scale latents:
    mean PSNR on held-out scenes' latents, on the final latents of the generations and on their
    mid-run denoised latents (what a live preview shows), and the time it takes against the VAE."""
    cfg, vae_dtype = pipe.vae.cfg, next(pipe.vae.parameters()).dtype
    times = {"tiny": 0.0, "vae": 0.0}

    def compare(latents: torch.Tensor) -> list[float]:
        with torch.inference_mode():
            started = time.perf_counter()
            full = pipe.decode(latents, tiled=False)
            times["vae"] += time.perf_counter() - started
            started = time.perf_counter()
            tiny = decoder(latents.to(next(decoder.parameters()).dtype))
            times["tiny"] += time.perf_counter() - started
        return psnr_db(tiny.cpu(), full.cpu())

    scene_values = []
    for images in heldout_scene_batches(pipe, scenes):
        with torch.inference_mode():
            latents = pipe.vae.encode(images.to(pipe.device, vae_dtype)).mean
        scene_values += compare((latents - (cfg.shift_factor or 0.0)) * cfg.scaling_factor)
    def mean(values: list[float]) -> float:  # NaN when there were none (runs under 3 steps have no previews)
        return float(np.mean(values)) if values else math.nan

    return {"scenes_psnr_db": mean(scene_values),
            "final_psnr_db": mean([v for latent in final for v in compare(latent)]),
            "preview_psnr_db": mean([v for latent in previews for v in compare(latent)]),
            "time_ratio": times["tiny"] / times["vae"]}


def contact_sheet(images: list[Image.Image], captions: list[str], columns: int = 8, cell: int = 128) -> Image.Image:
    """Images with their captions underneath, in a grid."""
    rows = math.ceil(len(images) / columns)
    text_height = 40
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        words, line, lines = caption.split(), "", []
        for word in words:
            if len(line) + len(word) + 1 > 22:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines[:3]), fill="black", spacing=1)
    return sheet


def evaluate(model: str | None = None, prompts_file: str | None = None, *, count: int = 150, steps: int = 20,
             cfg_scale: float = 7.5, sampler: str = "Euler a", seed: int = 1000, out: str | Path = "outputs/eval",
             progress: bool = True) -> EvalReport:
    import sdgen

    pipe = sdgen.load(model)
    decoder_path = folder_tiny_decoder(model)
    decoder = load_tiny_decoder(decoder_path, device=pipe.device) if decoder_path else None
    denoised: dict[str, list[torch.Tensor]] = {"final": [], "previews": []}

    def keep_denoised(image_index: int, step: int, total: int, latents: torch.Tensor) -> None:
        if decoder is not None and step + 1 == total:
            denoised["final"].append(latents.detach().float().clone())
        elif decoder is not None and step % 3 == 2:  # the server's default preview interval
            denoised["previews"].append(latents.detach().float().clone())

    prompts = read_prompts(prompts_file, count)
    results, images, captions, skipped, complete = [], [], [], [], []
    started = time.time()
    for index, prompt in enumerate(prompts):
        try:
            parse_caption(prompt)
        except CaptionError:
            skipped.append(prompt)
            continue
        image = pipe.generate(prompt=prompt, seed=seed + index, steps=steps, cfg_scale=cfg_scale,
                              sampler=sampler, callback=keep_denoised).images[0]
        checked = check_caption(image, prompt)
        results += checked
        complete.append(all(r.holds for r in checked))
        images.append(image)
        captions.append(prompt)
        if progress:
            print(f"[{index + 1}/{len(prompts)}] {'ok ' if complete[-1] else 'BAD'} {prompt}", flush=True)
    if not results:
        raise UserError("no prompt could be evaluated: none is in the scene grammar (see docs/SCENES.md)")
    elapsed = (time.time() - started) / len(images)
    quality = tiny_decoder_quality(pipe, decoder, **denoised) if decoder is not None else None
    report = EvalReport(accuracy_by_category(results), float(np.mean(complete)), autoencoder_psnr(pipe),
                        elapsed, skipped, quality)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    contact_sheet(images[:64], captions[:64]).save(out / "contact-sheet.png")
    (out / "report.json").write_text(json.dumps({
        "accuracy": {k: v[0] / v[1] for k, v in report.accuracy.items()},
        "claims": report.accuracy, "prompt_accuracy": report.prompt_accuracy, "psnr_db": report.psnr_db,
        "seconds_per_image": report.seconds_per_image, "prompts": len(images), "skipped": skipped,
        "tiny_decoder": report.tiny_decoder,
        "settings": {"steps": steps, "cfg_scale": cfg_scale, "sampler": sampler, "seed": seed},
    }, indent=2))
    return report
