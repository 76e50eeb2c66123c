"""User-facing errors: one line naming the file and the key, never a traceback."""
from __future__ import annotations

from pathlib import Path


class SpecError(Exception):
    """A spec (or something it points at) is unusable; message names file and key."""

    def __init__(self, source: str | Path | None, key: str | None, message: str):
        self.source = str(source) if source is not None else None
        self.key = key
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = self.source or "<spec>"
        if self.key:
            where += f": {self.key}"
        return f"{where}: {' '.join(self.message.split())}"


class WorkerError(Exception):
    """A backend worker crashed, timed out or answered with an error."""

    def __init__(self, message: str, stderr_tail: str = ""):
        self.stderr_tail = stderr_tail
        super().__init__(message)
