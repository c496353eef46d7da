"""Replay the committed fuzz corpus (tests/fuzz/corpus/, made by make_corpus.py) against every loader:
each file either loads or gives a UserError with a one-line message, within a time limit, memory flat."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from fuzz_oracle import LOADERS, check_file

CORPUS = Path(__file__).resolve().parent / "corpus"
REGRESSIONS = Path(__file__).resolve().parent / "regressions"  # inputs the atheris targets found, kept by hand
FILES = sorted(CORPUS.rglob("*.*"))
REPLAYED = FILES + sorted(REGRESSIONS.glob("*.*"))
SECONDS_PER_FILE = 5.0  # all loaders together; about 0.02 s is typical here
MB = 1 << 20
# make_corpus.py's seeds: safetensors model, LoRA, embedding; zip checkpoint, embedding, LoRA, legacy ones; PNGs
OWN_LOADER = {
    "safetensors": {"seed-0": "load_state_dict", "seed-1": "read_lora", "seed-2": "read_embedding"},
    "ckpt": {"seed-0": "load_state_dict", "seed-1": "read_embedding", "seed-2": "read_lora", "seed-3": "load_state_dict",
             "seed-4": "read_embedding"},
    "png": {f"seed-{i}": "read_image" for i in range(4)},
}


def test_corpus_is_present_and_small():
    kinds = {path.parent.name for path in FILES}
    assert kinds == {"safetensors", "ckpt", "png"} and len(FILES) >= 300
    assert sum(path.stat().st_size for path in FILES) < 2 * MB


@pytest.mark.parametrize("path", REPLAYED, ids=[f"{p.parent.name}/{p.name}" for p in REPLAYED])
def test_every_loader_fails_cleanly(path):
    process = psutil.Process()
    before = process.memory_info().rss
    start = time.perf_counter()
    outcomes = check_file(path)
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS_PER_FILE, f"{path.name}: {elapsed:.1f} s"
    assert process.memory_info().rss - before < 128 * MB
    assert set(outcomes) == set(LOADERS)
    if path.stem in OWN_LOADER.get(path.parent.name, {}):  # the unmutated files load in their own loader
        assert outcomes[OWN_LOADER[path.parent.name][path.stem]] == "ok", outcomes
