"""scripts/load_test.py runs end to end in a tiny mode (its figures are benchmarks: none is asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from server_harness import model_folder

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "load_test.py"


def test_load_test_script_reports_every_row():
    model = model_folder()
    command = [sys.executable, str(SCRIPT), "--jobs", "4", "--rounds", "1", "--steps", "2", "--threads", "1",
               "--timeout", "300", *(["--model", model] if model else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout
    assert "| queued jobs finished | 4 of 4 in" in table
    assert "| finished in the order queued | yes |" in table
    for row in ("server RSS before", "server RSS max sampled", "polls answered per second",
                "server event-loop CPU per poll", "slowdown from polling"):
        assert f"| {row}" in table
