"""Test side: a disk that fills up after the first bytes of every file opened through `os.fdopen`
(the atomic writers write through it), raising ENOSPC as a real full disk does."""

from __future__ import annotations

import errno
import os


class FullDisk:
    """A file handle whose writes fail with ENOSPC once more than `room` bytes were written."""

    def __init__(self, handle, room: int):
        self.handle, self.room, self.written = handle, room, 0

    def write(self, data):
        self.written += len(data)
        if self.written > self.room:  # the first bytes land, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fill_the_disk(monkeypatch, room: int = 200) -> None:
    """Make every `os.fdopen` handle a FullDisk until the monkeypatch is undone."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k), room))
