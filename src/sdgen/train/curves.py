"""Loss curves as PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_loss_curve(steps: list[int], losses: list[float], path: str | Path, title: str) -> None:
    """Log-scale loss against step, raw in light grey and smoothed in blue."""
    width, height, margin = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 12), title, fill="black")
    finite = [(s, l) for s, l in zip(steps, losses) if l > 0 and math.isfinite(l)]
    if len(finite) >= 2:
        xs = [s for s, _ in finite]
        ys = [math.log10(l) for _, l in finite]
        x0, x1 = min(xs), max(xs) or 1
        y0, y1 = min(ys), max(ys)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5

        def point(x: float, y: float) -> tuple[float, float]:
            px = margin + (x - x0) / max(x1 - x0, 1) * (width - 2 * margin)
            py = height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin)
            return px, py

        draw.line([point(x, y) for x, y in zip(xs, ys)], fill=(200, 200, 200))
        draw.line([point(x, y) for x, y in zip(xs, smooth(ys, max(1, len(ys) // 50)))], fill=(30, 80, 200), width=2)
        draw.text((4, margin - 6), f"{10 ** y1:.3g}", fill="black")
        draw.text((4, height - margin - 6), f"{10 ** y0:.3g}", fill="black")
        draw.text((margin, height - margin + 8), f"step {x0}", fill="black")
        draw.text((width - margin - 80, height - margin + 8), f"step {x1}", fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    image.save(path)
