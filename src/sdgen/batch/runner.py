"""`sdgen batch`: generate every request of a JSON-lines file, resumably.

Output folder: `<key>-<i>.png` per image (infotext in the PNG) and `results.jsonl`, one line per
request with its outcome, appended and fsynced as each request finishes, after its images. A
rerun reads `results.jsonl` and skips the keys already there, so a crash loses at most the
request in flight (a line cut short by a kill is ignored). Local by default, one worker using the
whole machine; `ray_address` runs the same work on a Ray cluster (ray_runner.py).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from sdgen.batch.requests import BatchEntry, read_batch
from sdgen.errors import UserError
from sdgen.pipelines.output import png_with_parameters
from sdgen.runtime.files import write_bytes_atomically

RESULTS = "results.jsonl"


class Worker:
    """Generates entries with the models they name; keeps the last model loaded, so a worker loads
    each model once when requests come grouped by model."""

    def __init__(self, device: str = "auto", dtype: str = "fp32", threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.device, self.dtype = device, dtype
        self._loaded: tuple[tuple, object] | None = None
        self.loads = 0

    def pipeline(self, model: str | None, vae: str | None):
        import sdgen

        if self._loaded is None or self._loaded[0] != (model, vae):
            self._loaded = None  # free the previous model first
            self._loaded = ((model, vae), sdgen.load(model, vae=vae, device=self.device, dtype=self.dtype))
            self.loads += 1
        return self._loaded[1]

    def __call__(self, entry: BatchEntry) -> dict:
        """The outcome of one entry: a result row plus `pngs`, the encoded images."""
        began = time.time()
        row = {"key": entry.key, "line": entry.line, "model": entry.model}
        if entry.request is None:
            return {**row, "status": "error", "error": entry.error, "pngs": []}
        try:
            result = self.pipeline(entry.model, entry.vae).generate(entry.request)
        except (UserError, ValueError) as error:
            return {**row, "status": "error", "error": " ".join(str(error).split()), "pngs": []}
        pngs = []
        for image, infotext in zip(result.images, result.infotexts):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", pnginfo=png_with_parameters(image, infotext))
            pngs.append(buffer.getvalue())
        return {**row, "status": "ok", "prompt": result.request.prompt, "seeds": result.seeds,
                "seconds": round(time.time() - began, 3), "pngs": pngs}


def done_keys(out: Path, retry_failed: bool = False) -> set[str]:
    """Keys recorded in `results.jsonl` (only the successful ones with `retry_failed`)."""
    path = out / RESULTS
    if not path.exists():
        return set()
    keys = set()
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue  # the last line of a run killed mid-write
        if isinstance(row, dict) and "key" in row and (row.get("status") == "ok" or not retry_failed):
            keys.add(row["key"])
    return keys


class ResultWriter:
    """Writes an outcome: its images (atomically), then its result line (appended, fsynced)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        path = out / RESULTS
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with path.open("ab") as handle:  # end a line cut short by a kill before appending
                handle.write(b"\n")

    def write(self, outcome: dict) -> dict:
        pngs = outcome.pop("pngs", [])
        names = []
        for index, data in enumerate(pngs):
            name = f"{outcome['key']}-{index}.png"
            write_bytes_atomically(self.out / name, data)
            names.append(name)
        row = {**outcome, "images": names} if outcome.get("status") == "ok" else outcome
        with (self.out / RESULTS).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return row


def pending_entries(batch_file: str | Path, out: Path, retry_failed: bool = False) -> tuple[list[BatchEntry], int]:
    """Entries not yet done, grouped by model (first appearance order) so each model loads once;
    and how many entries the file has."""
    entries = read_batch(batch_file)
    done = done_keys(out, retry_failed)
    pending = [e for e in entries if e.key not in done]
    order = {model: i for i, model in reversed(list(enumerate((e.model, e.vae) for e in pending)))}
    return sorted(pending, key=lambda e: (order[(e.model, e.vae)], e.line)), len(entries)


def run_batch(batch_file: str | Path, out: str | Path, *, ray_address: str | None = None, workers: int | None = None,
              gpus_per_worker: float | None = None, device: str = "auto", dtype: str = "fp32",
              threads: int | None = None, retry_failed: bool = False,
              report: Callable[[dict], None] | None = None) -> dict:
    """Generate the pending requests of `batch_file` into `out`; returns counts {total, skipped, ok, error}."""
    out = Path(out)
    pending, total = pending_entries(batch_file, out, retry_failed)
    writer = ResultWriter(out)
    counts = {"total": total, "skipped": total - len(pending), "ok": 0, "error": 0}
    if ray_address is not None:
        from sdgen.batch.ray_runner import run_on_ray

        outcomes = run_on_ray(pending, ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                              device=device, dtype=dtype)
    else:
        worker = Worker(device, dtype, threads)
        outcomes = (worker(entry) for entry in pending)
    for outcome in outcomes:
        row = writer.write(outcome)
        counts[row["status"]] += 1
        (report or _print_row)(row)
    return counts


def _print_row(row: dict) -> None:
    detail = ", ".join(row["images"]) if row["status"] == "ok" else row["error"]
    print(f"line {row['line']}: {row['status']}: {detail}", file=sys.stderr, flush=True)
