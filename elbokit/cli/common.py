"""Shared CLI plumbing: one-line errors with exit code 2, JSON output, the rich console."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, NoReturn

import typer

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # training stopped on a NaN/Inf loss: not bad input, the run is kept and resumable
EXIT_OS_ERROR = 4  # the OS refused a write (disk full, permissions, read-only): not bad input, not a bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print one line to stderr and exit (code 2: bad input)."""
    print(f"Error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn elbokit's own errors (and bad files) into one line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from elbokit.errors import ElbokitError

        try:
            return func(*args, **kwargs)
        except ElbokitError as exc:
            fail(str(exc))
        except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            # A path elbokit was given (or derived from one) that cannot be used as such.
            if getattr(exc, "filename", None):
                fail(f"{exc.strerror or exc}: {exc.filename}; check the path and its permissions.")
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except OSError as exc:
            # Disk full, a read-only filesystem, an I/O error: the machine, not the input.
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            fail(f"{exc.strerror or exc}{where}.", EXIT_OS_ERROR)

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def console():
    from rich.console import Console

    return Console()


def registry():
    """The process registry; plugin failures are reported as one warning line each."""
    from elbokit.plugins import get_registry

    reg = get_registry()
    if not getattr(reg, "_warned", False):
        reg.warn_failures()
        reg._warned = True
    return reg
