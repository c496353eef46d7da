"""One resumable training loop shared by every stage (autoencoder, CLIP, U-Net, fine-tuning)."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from sdgen.train.checkpoint import load_checkpoint, save_checkpoint
from sdgen.train.curves import draw_loss_curve


@dataclass(frozen=True)
class StageSettings:
    """How long and how a stage trains; everything else comes from the stage itself."""

    name: str
    steps: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float | None = None  # keep an exponential moving average of the weights
    bf16: bool = True  # autocast on the CPU
    checkpoint_every: int = 250
    log_every: int = 10
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)


def lr_at(step: int, settings: StageSettings) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if row.get("step", 0) <= up_to_step:
            rows.append(row)
    return rows


def train_stage(
    settings: StageSettings,
    run_dir: str | Path,
    model: torch.nn.Module,
    loss_fn: Callable[[object, int], tuple[torch.Tensor, dict[str, float]]],
    batch_at: Callable[[int], object],
    parameters: list[torch.nn.Parameter] | None = None,
    on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """Train `model` for `settings.steps`, resuming from `run_dir/<name>/checkpoint.pt` if present.

    `batch_at(step)` must be deterministic in `step`, so a resumed run sees the same data. With
    `accumulate` = k, optimizer step s sums the gradients of micro-batches `batch_at(s * k + i)`.
    Returns the EMA model when `ema_decay` is set, the trained model otherwise.
    """
    stage_dir = Path(run_dir) / settings.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = stage_dir / "checkpoint.pt"
    metrics_path = stage_dir / "metrics.jsonl"
    params = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if settings.ema_decay else None

    start = 0
    state = load_checkpoint(checkpoint_path)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        start = int(state["step"])
    history = _read_metrics(metrics_path, start)

    def checkpoint(step: int) -> None:
        save_checkpoint(checkpoint_path, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            **({"ema": ema.state_dict()} if ema is not None else {}),
        })
        metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
        draw_loss_curve([r["step"] for r in history], [r["loss"] for r in history],
                        stage_dir / "loss.png", f"{settings.name} loss")
        if on_checkpoint is not None:
            on_checkpoint(step, ema if ema is not None else model)

    model.train()
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if settings.bf16
                else contextlib.nullcontext())
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps,
               desc=settings.name, disable=not sys.stderr.isatty(), dynamic_ncols=True)
    began, step = time.time(), start
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings)
            optimizer.zero_grad(set_to_none=True)
            total, k = 0.0, settings.accumulate
            for micro in range(k):
                index = step * k + micro
                with autocast:
                    loss, extra = loss_fn(batch_at(index), index)
                (loss / k if k > 1 else loss).backward()
                total += float(loss.detach()) / k
            loss = torch.tensor(total) if k > 1 else loss
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), model.parameters()):
                        e.lerp_(p.detach(), 1 - settings.ema_decay)
            if step % settings.log_every == 0 or step == settings.steps - 1:
                loss = loss.detach()
                row = {"step": step + 1, "loss": float(loss), "lr": lr_at(step, settings),
                       "seconds": round(time.time() - began, 2), **extra}
                history.append(row)
                bar.set_postfix(loss=f"{float(loss):.4f}")
                if not sys.stderr.isatty() and step % (settings.log_every * 10) == 0:
                    print(f"{settings.name} step {step + 1}/{settings.steps} loss {float(loss):.4f}", flush=True)
            if (step + 1) % settings.checkpoint_every == 0:
                checkpoint(step + 1)
    except KeyboardInterrupt:
        checkpoint(step)
        raise
    if start < settings.steps:
        checkpoint(settings.steps)
    bar.close()
    result = ema if ema is not None else model
    result.eval()
    return result
