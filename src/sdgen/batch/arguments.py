"""`sdgen batch` flags and the command behind them."""

from __future__ import annotations

import argparse


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("requests", help="JSON-lines file: one generation request per line")
    parser.add_argument("--out", required=True, help="output folder: images and results.jsonl (a rerun resumes)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster: auto, ray://host:10001, or local (needs sdgen[ray])")
    parser.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, else per CPU)")
    parser.add_argument("--gpus-per-worker", type=float, default=None, help="Ray: GPUs per actor (default 1 if any)")
    parser.add_argument("--retry-failed", action="store_true", help="run again the requests that failed before")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the local worker (default: all)")


def run_batch_command(args: argparse.Namespace) -> int:
    from sdgen.batch.runner import run_batch

    counts = run_batch(args.requests, args.out, ray_address=args.ray, workers=args.workers,
                       gpus_per_worker=args.gpus_per_worker, device=args.device, dtype=args.dtype,
                       threads=args.threads, retry_failed=args.retry_failed)
    print(f"{counts['ok']} done, {counts['error']} failed, {counts['skipped']} already done "
          f"of {counts['total']} requests")
    return 1 if counts["error"] else 0
