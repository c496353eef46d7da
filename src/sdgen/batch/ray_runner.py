"""The batch on a Ray cluster: Ray Data `map_batches` over the pending requests with a fixed pool of
actors, each loading its model once and generating one request per call; the images come back
to the driver as PNG bytes, so workers need the model files but no shared output folder.

`pip install sdgen[ray]`. The address is Ray's: `auto` joins the cluster this machine belongs to,
`ray://host:10001` a remote one, `local` starts a private instance on this machine.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import numpy as np

from sdgen.batch.requests import BatchEntry
from sdgen.batch.runner import Worker
from sdgen.errors import UserError


class RayGenerator:
    """The actor behind `map_batches`: one Worker (one model load) per actor."""

    def __init__(self, device: str, dtype: str, threads: int | None) -> None:
        self.worker = Worker(device, dtype, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = []
        for text in batch["entry"]:  # JSON text: Arrow would turn a missing path (None) into NaN
            outcome = self.worker(BatchEntry.from_row(json.loads(text)))
            outcome["pngs"] = [base64.b64encode(data).decode() for data in outcome["pngs"]]
            outcomes.append(json.dumps(outcome))
        return {"outcome": np.array(outcomes, dtype=object)}


def connect(address: str) -> None:
    """Join (or, for `local`, start) a Ray cluster unless this process already has one."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'sdgen[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)


def run_on_ray(entries: list[BatchEntry], address: str, *, workers: int | None = None,
               gpus_per_worker: float | None = None, device: str = "auto", dtype: str = "fp32") -> Iterator[dict]:
    """Outcomes of `entries` (as `Worker` gives them) as the cluster finishes them."""
    if not entries:
        return iter(())
    connect(address)
    import ray

    resources = ray.cluster_resources()
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if workers is None:
        workers = int(resources.get("GPU", 0) // gpus_per_worker) if gpus_per_worker else int(resources.get("CPU", 1))
    workers = max(1, min(workers, len(entries)))
    cpus = 1 if gpus_per_worker else max(1, int(resources.get("CPU", 1) // workers))
    threads = None if gpus_per_worker else cpus
    rows = [{"entry": json.dumps(entry.to_row())} for entry in entries]
    dataset = ray.data.from_items(rows, override_num_blocks=len(entries))
    results = dataset.map_batches(
        RayGenerator, fn_constructor_kwargs={"device": device, "dtype": dtype, "threads": threads},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
        num_gpus=gpus_per_worker or None)

    def outcomes() -> Iterator[dict]:
        for row in results.iter_rows():
            outcome = json.loads(row["outcome"])
            outcome["pngs"] = [base64.b64decode(data) for data in outcome["pngs"]]
            yield outcome

    return outcomes()
