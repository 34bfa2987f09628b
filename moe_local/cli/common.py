"""What every command shares: one-line errors with a non-zero exit, and the consoles."""

from __future__ import annotations

import functools
import signal
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from moe_local.errors import MoeLocalError

F = TypeVar("F", bound=Callable)

# Results go to stdout; progress, timings and errors to stderr, so `--json` output stays clean.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print one red line on stderr and return the Exit to raise."""
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    return typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn MoeLocalError (and OS errors: read-only folder, full disk, permissions) into one line + exit 1,
    never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoeLocalError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:  # read-only folder, full disk, permissions: what the OS said, about which file
            where = f"{exc.filename}: " if exc.filename else ""
            raise fail(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP turned into one (convert.quantize.Terminated)
            signum = getattr(exc, "signum", signal.SIGINT)
            err.print("interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})")
            sys.exit(128 + signum)

    return wrapper  # type: ignore[return-value]
