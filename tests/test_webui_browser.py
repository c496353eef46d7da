"""The web UI in Debian's headless chromium, driven by playwright-core (tests/browser/ui.test.mjs).

Types a prompt and generates, finds the image in the gallery and by search, interrupts a long
job, reads parameters back from a dropped PNG, and paints an inpainting mask on the canvas.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from server_harness import ARTIFACTS, ServerProcess

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None or not Path(CHROMIUM).exists() or not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(),
    reason="needs node, Debian's chromium and tests/browser/node_modules (scripts/setup-test.sh installs them)")


def test_webui_in_chromium(tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    init = tmp_path / "init.png"
    Image.radial_gradient("L").resize((64, 64)).convert("RGB").save(init)
    with ServerProcess(tmp_path / "data") as server:
        run = subprocess.run([NODE, str(BROWSER_DIR / "ui.test.mjs"), server.url, str(ARTIFACTS), str(init)],
                             capture_output=True, text=True, timeout=300, cwd=BROWSER_DIR,
                             env={**os.environ, "CHROMIUM": CHROMIUM, "SDGEN_IMG2IMG": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("webui-generated.png", "webui-progress.png", "webui-mask.png"):
        assert (ARTIFACTS / name).stat().st_size > 1000
