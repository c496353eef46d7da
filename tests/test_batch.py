"""`sdgen batch`: request lines and their keys, outputs and results, resuming after SIGKILL, and the
same batch on a local Ray instance (2 CPU workers) giving the same images as the local run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdgen.batch.requests import parse_line, read_batch
from sdgen.batch.runner import RESULTS, run_batch


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from reference_pipelines import make_reference_pipeline, save_folder

    root = tmp_path_factory.mktemp("batch-model")
    return save_folder(make_reference_pipeline("sd1", root), root / "model")


def _write_batch(path: Path, model: Path, count: int, bad: bool = True) -> Path:
    lines = [{"prompt": f"a red square {i}", "seed": 100 + i, "steps": 3, "sampler": "Euler a", "cfg": 4.0,
              "width": 64, "height": 64, "model": str(model)} for i in range(count)]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if bad:
        text += '{"prompt": "x", "steps": 0}\n'
    path.write_text(text)
    return path


def _images(out: Path) -> dict[str, tuple[np.ndarray, str]]:
    found = {}
    for path in sorted(out.glob("*.png")):
        with Image.open(path) as image:
            found[path.name] = (np.asarray(image.convert("RGB")), image.text["parameters"])
    return found


def _results(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    return {row["key"]: {k: v for k, v in row.items() if k != "seconds"} for row in rows}


def test_lines_keys_and_errors():
    plain = parse_line('{"prompt": "a cat", "seed": 5}', 1)
    spelled_out = parse_line('{"prompt": "a cat", "seed": 5, "steps": 20, "negative": "", "cfg": 7.0}', 2)
    assert plain.key == spelled_out.key and plain.request.seed == 5 and len(plain.key) == 16
    assert parse_line('{"prompt": "a cat", "seed": 6}', 3).key != plain.key
    assert parse_line('{"prompt": "a cat", "seed": 5, "model": "other.safetensors"}', 4).key != plain.key
    assert "unknown field(s) colour" in parse_line('{"prompt": "a", "colour": 1}', 5).error
    assert "steps must be between" in parse_line('{"steps": 0}', 6).error
    assert "not JSON" in parse_line("{oops", 7).error
    assert "expected a JSON object" in parse_line("[1, 2]", 8).error


def test_local_batch_writes_images_results_and_skips_done(tiny_model, tmp_path):
    batch = _write_batch(tmp_path / "prompts.jsonl", tiny_model, 2)
    with batch.open("a") as handle:  # the same request again: one key, generated once
        handle.write(json.dumps({"prompt": "a red square 0", "seed": 100, "steps": 3, "cfg_scale": 4.0,
                                 "width": 64, "height": 64, "model": str(tiny_model)}) + "\n")
    assert len(read_batch(batch)) == 3
    counts = run_batch(batch, tmp_path / "out", threads=1, report=lambda row: None)
    assert counts == {"total": 3, "skipped": 0, "ok": 2, "error": 1}
    results = _results(tmp_path / "out")
    ok = [r for r in results.values() if r["status"] == "ok"]
    assert sorted(r["seeds"][0] for r in ok) == [100, 101]
    for row in ok:
        (name,) = row["images"]
        with Image.open(tmp_path / "out" / name) as image:
            assert f"Seed: {row['seeds'][0]}" in image.text["parameters"] and image.size == (64, 64)
    assert [r["line"] for r in results.values() if r["status"] == "error"] == [3]
    again = run_batch(batch, tmp_path / "out", threads=1, report=lambda row: None)
    assert again == {"total": 3, "skipped": 3, "ok": 0, "error": 0}


def test_killed_batch_resumes_to_the_same_result(tiny_model, tmp_path):
    batch = _write_batch(tmp_path / "prompts.jsonl", tiny_model, 8)
    command = [sys.executable, "-m", "sdgen.cli", "batch", str(batch), "--threads", "1", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command + [str(tmp_path / "straight")], check=False, env=env, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command + [str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        results = killed / RESULTS
        if results.exists() and results.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the batch finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = (killed / RESULTS).read_text().count("\n")
    assert 3 <= done_before < 9
    resumed = subprocess.run(command + [str(killed)], env=env, capture_output=True, text=True, timeout=300)
    assert f"{done_before} already done of 9 requests" in resumed.stdout
    assert _results(killed) == _results(tmp_path / "straight")
    straight, after = _images(tmp_path / "straight"), _images(killed)
    assert straight.keys() == after.keys() and len(straight) == 8
    for name, (pixels, infotext) in straight.items():
        assert np.array_equal(after[name][0], pixels) and after[name][1] == infotext


def test_ray_batch_equals_local(tiny_model, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'sdgen[ray]')")
    batch = _write_batch(tmp_path / "prompts.jsonl", tiny_model, 4)
    run_batch(batch, tmp_path / "local", threads=1, report=lambda row: None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        counts = run_batch(batch, tmp_path / "ray", ray_address="auto", workers=2, report=lambda row: None)
    finally:
        ray.shutdown()
    assert counts == {"total": 5, "skipped": 0, "ok": 4, "error": 1}
    assert _results(tmp_path / "ray") == _results(tmp_path / "local")
    local, remote = _images(tmp_path / "local"), _images(tmp_path / "ray")
    assert local.keys() == remote.keys() and len(local) == 4
    for name, (pixels, infotext) in local.items():
        assert np.array_equal(remote[name][0], pixels) and remote[name][1] == infotext
