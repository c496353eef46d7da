"""The shared training loop: resuming gives the same weights as an uninterrupted run."""

import os
from pathlib import Path

import pytest
import torch

from sdgen.train.checkpoint import load_checkpoint, save_checkpoint
from sdgen.train.loop import StageSettings, train_stage


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    target = torch.nn.Linear(4, 1)

    def batch_at(step):
        g = torch.Generator().manual_seed(step)
        return torch.randn(16, 4, generator=g)

    def loss_fn(x, step):
        with torch.no_grad():
            y = target(x)
        return torch.nn.functional.mse_loss(model(x).float(), y), {}

    return model, batch_at, loss_fn


def _settings(steps):
    return StageSettings(name="toy", steps=steps, lr=1e-2, warmup=2, checkpoint_every=3, bf16=False, ema_decay=0.9)


def test_resume_equals_uninterrupted(tmp_path):
    model, batch_at, loss_fn = _problem()
    straight = train_stage(_settings(9), tmp_path / "a", model, loss_fn, batch_at)

    model2, batch_at2, loss_fn2 = _problem()

    def interrupted_at_5(step):
        if step == 5:
            raise KeyboardInterrupt
        return batch_at2(step)

    with pytest.raises(KeyboardInterrupt):
        train_stage(_settings(9), tmp_path / "b", model2, loss_fn2, interrupted_at_5)
    model3, batch_at3, loss_fn3 = _problem()
    resumed = train_stage(_settings(9), tmp_path / "b", model3, loss_fn3, batch_at3)

    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "b" / "toy" / "loss.png").exists()
    assert (tmp_path / "b" / "toy" / "metrics.jsonl").read_text().count("\n") >= 2


def test_killed_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in Path(tmp_path).iterdir()] == ["checkpoint.pt"]
