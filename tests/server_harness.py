"""Test side: a real `sdgen serve` in a subprocess on a loopback port, with a tiny model.

The model is the embedded one when it exists (`src/sdgen/data/embedded/model_index.json`),
otherwise a tiny random-weight SD 1.x folder built once per test process with
`reference_pipelines`. Every server gets its own data folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "src" / "sdgen" / "data" / "embedded" / "model_index.json"
ARTIFACTS = ROOT / "test-artifacts"


@cache
def model_folder() -> str | None:
    """None (the embedded model) when it is packaged, else a tiny random SD 1.x diffusers folder."""
    if EMBEDDED.is_file():
        return None
    from reference_pipelines import make_reference_pipeline, save_folder

    workdir = Path(tempfile.mkdtemp(prefix="sdgen-server-model-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    save_folder(make_reference_pipeline("sd1", workdir), workdir / "tiny-sd1")
    return str(workdir / "tiny-sd1")


def fastapi_app(asgi):
    """The FastAPI app inside `create_app`'s wrappers (the Guard, the progress shortcut)."""
    while not hasattr(asgi, "routes"):
        asgi = asgi.app
    return asgi


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m sdgen.cli serve ...` started in its own process group, stopped by its pid only."""

    def __init__(self, data_dir: Path, *extra: str, model: str | None = "auto", port: int | None = None,
                 env: dict | None = None):
        self.data_dir, self.port = Path(data_dir), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model = model_folder() if model == "auto" else model
        self.args = [sys.executable, "-m", "sdgen.cli", "serve", "--port", str(self.port), "--data-dir",
                     str(self.data_dir), *(["--model", model] if model else []), *extra]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.log = self.data_dir.parent / f"server-{self.port}.log"

    def start(self, wait: bool = True, auth: tuple[str, str] | None = None) -> "ServerProcess":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=ROOT, start_new_session=True)
        if wait:
            self.wait_ready(auth=auth)
        return self

    def wait_ready(self, timeout: float = 90.0, auth: tuple[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2, auth=auth).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown code runs."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "ServerProcess":
        # `with server.start(auth=...)` has started it already: a second start would orphan the first
        return self if self.process is not None else self.start()

    def __exit__(self, *_) -> None:
        self.stop()


def wait_for_state(client: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s")
