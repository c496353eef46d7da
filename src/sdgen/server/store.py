"""The persistent job queue and gallery: one SQLite file in the data folder, written before replies.

A job is committed before the server answers (`synchronous=FULL`), so an accepted job survives
a crash. On start `recover()` re-queues a job that was running when the process died, once;
a job found running a second time (it crashed the server twice) is failed instead. Images are
written to disk (atomically) before their gallery row, so the gallery never names a missing
file; rows whose file was deleted by hand are dropped at start.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sdgen.errors import UserError

DB_NAME = "sdgen.sqlite3"
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "interrupted", "cancelled")
MAX_ATTEMPTS = 2  # the first run plus one re-run after a crash

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    path TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    model TEXT,
    infotext TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_job ON images(job_id);
"""


class StoreError(UserError):
    """The data folder cannot be used (locked by another server, unwritable)."""


class QueueFull(Exception):
    """The bounded queue has no room; the client should retry later."""


@dataclass
class Job:
    id: str
    kind: str
    state: str
    params: dict
    created: float
    started: float | None
    finished: float | None
    attempts: int
    error: str | None
    result: dict

    def public(self) -> dict:
        """The job as the native API shows it (inputs' file paths left out)."""
        params = {k: v for k, v in self.params.items() if not k.startswith("_")}
        return {"id": self.id, "kind": self.kind, "state": self.state, "params": params,
                "created": self.created, "started": self.started, "finished": self.finished,
                "attempts": self.attempts, "error": self.error}


def _job(row: sqlite3.Row) -> Job:
    return Job(row["id"], row["kind"], row["state"], json.loads(row["params"]), row["created"], row["started"],
               row["finished"], row["attempts"], row["error"], json.loads(row["result"] or "{}"))


def _like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` literally anywhere (its % and _ escaped)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Store:
    """Jobs and gallery images in `data_dir/sdgen.sqlite3`; outputs under `data_dir/outputs`."""

    def __init__(self, data_dir: Path, max_queue: int = 32):
        self.data_dir = Path(data_dir).expanduser()
        self.outputs = self.data_dir / "outputs"
        self.inputs = self.data_dir / "inputs"
        self.max_queue = max_queue
        self.notices: list[str] = []
        self._lock = threading.Lock()
        try:
            for folder in (self.data_dir, self.outputs, self.inputs):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create the data folder {self.data_dir}: {error.strerror}; pass --data-dir") from None
        self._lock_file = self._take_folder_lock()
        self.db = self._open()

    def _take_folder_lock(self):
        """One server per data folder: an exclusive flock, released by the kernel even on kill -9."""
        handle = open(self.data_dir / "server.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise StoreError(f"another sdgen server (pid {owner}) is using {self.data_dir}; "
                             "stop it or pass another --data-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        db.row_factory = sqlite3.Row
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            db.close()
            raise sqlite3.DatabaseError("quick_check failed")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        return db

    def _open(self) -> sqlite3.Connection:
        """Open the database; a corrupt file is moved aside (never deleted) and a new one made."""
        path = self.data_dir / DB_NAME
        try:
            return self._connect(path)
        except sqlite3.DatabaseError as error:
            aside = path.with_name(f"{DB_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{path}{suffix}")
                if source.exists():
                    source.rename(f"{aside}{suffix}")
            self.notices.append(f"the job database was unreadable ({error}); moved it to {aside.name} and "
                                "started a new one (images in outputs/ are untouched)")
            return self._connect(path)

    def close(self) -> None:
        with self._lock:
            self.db.close()
        self._lock_file.close()

    # Jobs -----------------------------------------------------------------------------------

    def add_job(self, kind: str, params: dict) -> Job:
        """Queue a job (committed before returning); QueueFull when the queue is at its bound."""
        with self._lock:
            active = self.db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]
            if active >= self.max_queue:
                raise QueueFull(f"the queue holds {active} jobs, its limit")
            job_id = uuid.uuid4().hex
            self.db.execute("INSERT INTO jobs (id, kind, state, params, created) VALUES (?, ?, 'queued', ?, ?)",
                            (job_id, kind, json.dumps(params), time.time()))
        return self.job(job_id)

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, limit: int = 50) -> list[Job]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_job(row) for row in rows]

    def next_queued(self) -> Job | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
        return _job(row) if row else None

    def position(self, job_id: str) -> int:
        """How many active jobs were queued before this one (0: it runs next or is running)."""
        with self._lock:
            row = self.db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') "
                "AND seq < (SELECT seq FROM jobs WHERE id = ?)", (job_id,)).fetchone()
        return row[0]

    def active_count(self) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]

    def mark_running(self, job_id: str) -> None:
        with self._lock:
            self.db.execute("UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 WHERE id = ?",
                            (time.time(), job_id))

    def finish(self, job_id: str, state: str, *, error: str | None = None, result: dict | None = None) -> None:
        assert state in FINAL
        with self._lock:
            self.db.execute("UPDATE jobs SET state = ?, finished = ?, error = ?, result = ? WHERE id = ?",
                            (state, time.time(), error, json.dumps(result or {}), job_id))

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it is running or over."""
        with self._lock:
            changed = self.db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'queued'",
                                      (time.time(), job_id)).rowcount
        return changed == 1

    def recover(self) -> dict[str, int]:
        """After a crash: re-queue interrupted runs once, fail repeat offenders, tidy outputs."""
        with self._lock:
            failed = self.db.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE state = 'running' AND attempts >= ?",
                (time.time(), "the server stopped while running this job twice; not retried again",
                 MAX_ATTEMPTS)).rowcount
            requeued = self.db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount
            rows = self.db.execute("SELECT id, path FROM images").fetchall()
            missing = [row["id"] for row in rows if not (self.outputs / row["path"]).is_file()]
            self.db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in missing])
        # Temporary files of an atomic write cut short by the crash (see pipelines/output.py).
        for stray in self.outputs.rglob(".*.tmp"):
            stray.unlink(missing_ok=True)
        return {"requeued": requeued, "failed": failed, "missing_images": len(missing)}

    # Gallery --------------------------------------------------------------------------------

    def add_image(self, job_id: str, position: int, path: Path, *, prompt: str, negative_prompt: str, seed: int,
                  width: int, height: int, model: str | None, infotext: str) -> int:
        relative = Path(path).resolve().relative_to(self.outputs.resolve()).as_posix()
        with self._lock:
            cursor = self.db.execute(
                "INSERT INTO images (job_id, position, path, prompt, negative_prompt, seed, width, height, model, "
                "infotext, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, position, relative, prompt, negative_prompt, seed, width, height, model, infotext, time.time()))
        return cursor.lastrowid

    def images_for(self, job_id: str) -> list[dict]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM images WHERE job_id = ? ORDER BY position", (job_id,)).fetchall()
        return [dict(row) for row in rows]

    def keep_complete_iterations(self, job_id: str, batch_size: int) -> list[dict]:
        """A re-run job's images of whole batch iterations; rows (and files) of a partial one are removed."""
        rows = self.images_for(job_id)
        complete = len(rows) // batch_size * batch_size
        for row in rows[complete:]:
            (self.outputs / row["path"]).unlink(missing_ok=True)
            with self._lock:
                self.db.execute("DELETE FROM images WHERE id = ?", (row["id"],))
        return rows[:complete]

    def image(self, image_id: int) -> dict | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        return dict(row) if row else None

    def image_path(self, image_id: int) -> Path | None:
        """The file of a gallery image; only ids are taken from requests, never paths."""
        row = self.image(image_id)
        if row is None:
            return None
        path = (self.outputs / row["path"]).resolve()
        if not path.is_relative_to(self.outputs.resolve()) or not path.is_file():
            return None
        return path

    def gallery(self, query: str = "", limit: int = 60, before: int | None = None) -> list[dict]:
        """Newest first; `query` matches prompt or negative prompt text, case-insensitively."""
        sql, args = "SELECT * FROM images WHERE 1", []
        if query:
            sql += " AND (prompt LIKE ? ESCAPE '\\' OR negative_prompt LIKE ? ESCAPE '\\')"
            args += [_like_pattern(query)] * 2
        if before is not None:
            sql += " AND id < ?"
            args.append(before)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            return [dict(row) for row in self.db.execute(sql, args).fetchall()]
