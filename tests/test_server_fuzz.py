"""schemathesis fuzzes every operation of the server's OpenAPI schema: no answer may be a 5xx.

Bounded: 50 examples per operation, no stateful phase, low server limits so that the few
generated requests that are valid generate 64x64 images in at most 3 steps (about a minute).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server_harness import ARTIFACTS, ServerProcess

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
LIMITS = ("--max-steps", "3", "--max-side", "64", "--max-pixels", "4096", "--max-images", "2",
          "--max-batch-size", "2", "--queue-size", "1000", "--max-prompt-chars", "500")


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is installed by scripts/setup-test.sh")
def test_openapi_fuzz_finds_no_server_error(tmp_path):
    with ServerProcess(tmp_path / "data", *LIMITS) as server:
        run = subprocess.run(
            [SCHEMATHESIS, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "50", "--phases", "examples,coverage,fuzzing", "--request-timeout", "60",
             "--seed", "1", "--workers", "1", "--generation-database", "none"],
            capture_output=True, text=True, timeout=600)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "schemathesis.txt").write_text(run.stdout + run.stderr)
        assert run.returncode == 0, run.stdout[-3000:] + server.output()[-3000:]
        assert "Traceback" not in server.output()
