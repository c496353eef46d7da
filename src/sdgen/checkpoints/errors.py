"""The one error this package raises for a file it cannot or will not read."""

from __future__ import annotations

from pathlib import Path

from sdgen.errors import UserError


class CheckpointError(UserError):
    """A checkpoint file or folder that is broken, hostile or unsupported: `path: problem; what to do`."""

    def __init__(self, path: str | Path, problem: str, fix: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        message = f"{self.path}: {problem}" + (f"; {fix}" if fix else "")
        # The CLI prints the message as one line, whatever the file put in the names we quote.
        super().__init__(" ".join(message.split()))
