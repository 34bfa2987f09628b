"""The one error type a user sees.

Every failure a user can cause (a bad path, a broken shard, an unsupported model) is raised as a
`MoeLocalError` whose message is a single line naming the file and what is wrong. The CLI prints
that line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

from pathlib import Path


class MoeLocalError(Exception):
    """A user-facing failure with a one-line message."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = None if path is None else Path(path)


class CheckpointError(MoeLocalError):
    """A checkpoint or pack on disk is missing, malformed or inconsistent."""


class ConfigError(MoeLocalError):
    """A config.json we cannot run (unsupported family, missing keys)."""


class GenerationError(MoeLocalError):
    """A request the runtime cannot serve (prompt longer than the context, bad sampling option)."""
