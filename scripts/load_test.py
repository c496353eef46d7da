"""Load test of a real `sdgen serve` on loopback: many queued jobs, and progress polling while generating.

    .venv/bin/python scripts/load_test.py                      # the embedded model, 100 jobs, 5 rounds
    .venv/bin/python scripts/load_test.py --model MODEL --jobs 20 --rounds 3 --steps 20

(a) queues `--jobs` small txt2img jobs at once through the native API, waits for all of them, checks
that they finished in the order queued, and samples the server's resident memory (VmRSS, and VmHWM
for the peak) before, during and after; (b) times `--rounds` generations without and with a client
polling `/sdapi/v1/progress` 50 times a second, alternating, and reports the slowdown. Prints a
markdown table. Loopback only; every wait is bounded by `--timeout`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

POLL_HZ = 50
MAX_JOBS = 400  # GET /api/v1/jobs returns at most 500 rows; the queue phase reads every job in one list


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in KiB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def start_server(model: str | None, data_dir: Path, threads: int, timeout: float,
                 serve_args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "sdgen.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
               "--queue-size", "1000", *(["--model", model] if model else []), *serve_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"load_test: the server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"load_test: the server did not answer within {timeout} s")


def queued_jobs(client: httpx.Client, pid: int, request: dict, count: int, timeout: float) -> dict:
    """Queue `count` jobs at once; wait for all; order of completion and memory along the way."""
    before = memory_kib(pid)
    ids = []
    for index in range(count):
        response = client.post("/api/v1/jobs", json={**request, "seed": index})
        response.raise_for_status()
        ids.append(response.json()["id"])
    samples, deadline, start = [before["VmRSS"]], time.monotonic() + timeout, time.monotonic()
    while True:
        listed = client.get("/api/v1/jobs", params={"limit": 500})
        listed.raise_for_status()
        jobs = {job["id"]: job for job in listed.json()}
        samples.append(memory_kib(pid)["VmRSS"])
        if all(jobs[i]["state"] not in ("queued", "running") for i in ids):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"load_test: {count} jobs not finished within {timeout} s")
        time.sleep(0.5)
    seconds = time.monotonic() - start
    finished = [jobs[i]["finished"] for i in ids]
    after = memory_kib(pid)
    return {"jobs": count, "done": sum(jobs[i]["state"] == "done" for i in ids), "seconds": seconds,
            "in_order": finished == sorted(finished), "rss_before": before["VmRSS"],
            "rss_after": after["VmRSS"], "rss_max_sampled": max(samples), "peak": after["VmHWM"],
            "rss_after_first_quarter": samples[len(samples) // 4]}


def read_more(sock: socket.socket, buffer: bytes) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise SystemExit("load_test: the server closed the polling connection")
    return buffer + data


def read_response(sock: socket.socket, buffer: bytes) -> tuple[int, bytes, bytes]:
    """(status, body, bytes left over) of one Content-Length framed response read from `sock`."""
    while b"\r\n\r\n" not in buffer:
        buffer = read_more(sock, buffer)
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
    while len(buffer) < length:
        buffer = read_more(sock, buffer)
    return int(status_line.split()[1]), buffer[:length], buffer[length:]


def poll_progress(base_url: str, stop: threading.Event, latencies: list[float]) -> None:
    """GET /sdapi/v1/progress every 1/POLL_HZ s (start to start, as a timer-driven page does) on one
    keep-alive connection until `stop`; records each answer's latency.

    The poller runs on the same two cores as the server, so it is as lean as an HTTP client can
    be: one prebuilt request written to a socket, the answer read by its Content-Length (about
    0.25 ms of CPU per poll during a generation, http.client 0.45 ms, httpx more): what is
    measured is the server's cost of being polled, not this client's. A slow answer delays the
    next poll (one request in flight, as in a browser), so the achieved rate is reported too.
    """
    parts = urlsplit(base_url)
    request = f"GET /sdapi/v1/progress HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    next_poll, buffer, body = time.perf_counter(), b"", b""
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        while not stop.is_set():
            start = time.perf_counter()
            sock.sendall(request)
            status, body, buffer = read_response(sock, buffer)
            if status != 200:
                raise SystemExit(f"load_test: progress answered {status}")
            latencies.append(time.perf_counter() - start)
            next_poll = max(next_poll + 1 / POLL_HZ, time.perf_counter())
            stop.wait(next_poll - time.perf_counter())
    if body and "progress" not in json.loads(body):
        raise SystemExit("load_test: progress answered without a progress field")


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """CPU time a thread of another process has run, from /proc (schedstat: nanoseconds on a CPU)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9


def timed_generation(client: httpx.Client, pid: int, request: dict, poll: bool,
                     latencies: list[float]) -> tuple[float, float]:
    """Seconds for one /sdapi/v1/txt2img, optionally with another client polling progress at 50 Hz,
    and the CPU seconds the server's event loop (its main thread) used meanwhile."""
    loop_cpu = thread_cpu_seconds(pid, pid)
    stop = threading.Event()
    thread = threading.Thread(target=poll_progress, args=(str(client.base_url), stop, latencies), daemon=True)
    if poll:
        thread.start()
    start = time.perf_counter()
    client.post("/sdapi/v1/txt2img", json=request).raise_for_status()
    seconds = time.perf_counter() - start
    stop.set()
    if poll:
        thread.join()
    return seconds, thread_cpu_seconds(pid, pid) - loop_cpu


def report(queue: dict, plain: list[float], polled: list[float], latencies: list[float], loop_cpu: float) -> str:
    rate = (len(latencies) - len(polled)) / sum(polled)  # intervals: each round's first poll is at 0 s
    mib = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
    # each round times a plain and a polled generation back to back; the median of their ratios
    # cancels the machine's slow drifts, which on a shared VM are as large as the effect measured
    slowdown = (statistics.median(b / a for a, b in zip(plain, polled)) - 1) * 100
    rows = [
        ("queued jobs finished", f"{queue['done']} of {queue['jobs']} in {queue['seconds']:.0f} s"),
        ("finished in the order queued", "yes" if queue["in_order"] else "NO"),
        ("server RSS before / after a quarter / after", f"{mib(queue['rss_before'])} / "
         f"{mib(queue['rss_after_first_quarter'])} / {mib(queue['rss_after'])}"),
        ("server RSS max sampled / peak (VmHWM)", f"{mib(queue['rss_max_sampled'])} / {mib(queue['peak'])}"),
        ("generation, median of rounds", f"{statistics.median(plain):.2f} s"),
        (f"same, progress polled {POLL_HZ}/s", f"{statistics.median(polled):.2f} s"),
        ("polls answered per second while generating", f"{rate:.1f}"),
        ("progress answer while generating: median / 95th percentile / max",
         " / ".join(f"{statistics.quantiles(latencies, n=100)[q] * 1000:.1f} ms" for q in (49, 94))
         + f" / {max(latencies) * 1000:.1f} ms"),
        ("server event-loop CPU per poll while generating", f"{loop_cpu / len(latencies) * 1000:.2f} ms"),
        ("slowdown from polling (median of the rounds' ratios)", f"{slowdown:+.1f}%"),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: the embedded model)")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="generations timed with and without polling")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="width and height (default: the model's)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each phase")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra `sdgen serve` argument (repeat; e.g. --serve-arg=--request-nice=0)")
    args = parser.parse_args(argv)
    if not 1 <= args.jobs <= MAX_JOBS or args.rounds < 1:
        parser.error(f"--jobs must be 1 to {MAX_JOBS} and --rounds at least 1")
    request = {"prompt": "a red circle above a blue square", "steps": args.steps, "sampler_name": "Euler a"}
    if args.size:
        request.update(width=args.size, height=args.size)
    with tempfile.TemporaryDirectory(prefix="sdgen-load-") as data:
        process, url = start_server(args.model, Path(data), args.threads, args.timeout, args.serve_arg)
        try:
            with httpx.Client(base_url=url, timeout=args.timeout) as client:
                timed_generation(client, process.pid, request, poll=False, latencies=[])  # loads the model
                queue = queued_jobs(client, process.pid, {**request, "steps": max(1, args.steps // 4)},
                                    args.jobs, args.timeout)
                plain, polled, latencies, loop_cpu = [], [], [], 0.0
                for _ in range(args.rounds):
                    seconds, cpu = timed_generation(client, process.pid, request, poll=False, latencies=latencies)
                    plain.append(seconds)
                    loop_cpu -= cpu  # what the event loop does anyway (the txt2img request itself)
                    seconds, cpu = timed_generation(client, process.pid, request, poll=True, latencies=latencies)
                    polled.append(seconds)
                    loop_cpu += cpu
        finally:
            process.terminate()
            process.wait(timeout=60)
    print(report(queue, plain, polled, latencies, loop_cpu))
    return 0 if queue["in_order"] and queue["done"] == queue["jobs"] else 1


if __name__ == "__main__":
    sys.exit(main())
