"""Atomic files and folders: a reader sees the old content or the new, never a mix or a leftover."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from sdgen.runtime.files import folder_written_atomically, write_atomically, write_bytes_atomically, write_json


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}


def test_completed_folder_replaces_the_old_one_and_leaves_nothing_else(tmp_path):
    out = tmp_path / "model"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "stale.txt").write_text("old")
    with folder_written_atomically(out) as staging:
        assert staging.parent == tmp_path and not any(staging.iterdir())
        write_json(staging / "unet" / "config.json", {"b": 1, "a": 2})
    assert _tree(out) == {"unet/config.json": json.dumps({"a": 2, "b": 1}, indent=2) + "\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_folder_keeps_the_old_one_untouched(tmp_path, fault):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights.bin").write_text("previous")
    with pytest.raises(type(fault)):
        with folder_written_atomically(out) as staging:
            (staging / "weights.bin").write_text("half")
            raise fault
    assert _tree(out) == {"weights.bin": "previous"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_file_written_atomically_survives_a_failing_writer(tmp_path):
    path = write_bytes_atomically(tmp_path / "a.bin", b"first")

    def fail(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(path, fail)
    assert path.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
