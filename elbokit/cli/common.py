"""Shared CLI plumbing: one-line errors with exit code 2, JSON output, the rich console."""

from __future__ import annotations

import functools
import traceback
import json
import os
import sys
from typing import Any, Callable, NoReturn

import click
import typer

EXIT_BUG = 1  # an unexpected failure: elbokit's bug, or a plugin's when its code raised
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # training stopped on a NaN/Inf loss: not bad input, the run is kept and resumable
EXIT_OS_ERROR = 4  # the OS refused a write (disk full, permissions, read-only): not bad input, not a bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143
TRACEBACK_ENV = "ELBOKIT_TRACEBACK"

_traceback_option = False  # set by `elbokit --traceback`


def set_traceback(on: bool) -> None:
    global _traceback_option
    _traceback_option = bool(on)


def traceback_wanted() -> bool:
    """`elbokit --traceback ...` or ELBOKIT_TRACEBACK=1: print the full traceback of a plugin's exception."""
    return _traceback_option or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


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
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except ElbokitError as exc:
            fail(str(exc))
        except Exception as exc:
            message = plugin_failure(exc)
            if message is not None:
                if traceback_wanted():
                    traceback.print_exc(file=sys.stderr)
                fail(message, EXIT_BUG)
            if not isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                                    PermissionError)):
                raise
            # A path elbokit was given (or derived from one) that cannot be used as such.
            if getattr(exc, "filename", None):
                fail(f"{exc.strerror or exc}: {exc.filename}; check the path and its permissions.")
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except OSError as exc:
            # Disk full, a read-only filesystem, an I/O error: the machine, not the input.
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            fail(f"{exc.strerror or exc}{where}.", EXIT_OS_ERROR)

    return wrapper


def plugin_failure(exc: BaseException) -> str | None:
    """One line for an exception raised inside a plugin's code (found by walking the
    traceback), naming the plugin, the component and the message; None if no plugin's code
    raised it (then it is elbokit's bug and the traceback is printed as usual)."""
    from elbokit.plugins import get_registry

    try:
        blamed = get_registry().blame(exc)
    except Exception:  # noqa: BLE001 - never hide the original exception
        return None
    if blamed is None:
        return None
    plugin, entry = blamed
    who = entry.label if entry is not None else f"plugin '{plugin}'"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"{who} raised {type(exc).__name__}{': ' + text if text else ''}. This is a bug in the plugin, not in "
            f"your input: report it to its author (the full traceback: elbokit --traceback ..., or {TRACEBACK_ENV}=1).")


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


PROSE_MIN = 12
"""A column of prose (a cell of more than two words) is at least this wide, or its longest word."""


def column_widths(columns: list[str], cells: list[list[str]], avail: int) -> list[int | None]:
    """Widths for the `avail` characters a table's cells have (its width less borders and
    padding), or None each where the cells fit as they are. Rich's own fitting shrinks the
    widest columns first and so breaks words everywhere. Here a column of names (cells of
    one or two words) gets its longest word (up to 24 characters), a column of prose at least
    PROSE_MIN, the rest of the width goes to the columns with longer text in proportion to
    what they lack, and when even that does not fit, the widest columns give way first."""
    n = len(columns)
    natural = [max([len(columns[i])] + [len(row[i]) for row in cells] + [1]) for i in range(n)]
    if sum(natural) <= avail:
        return [None] * n
    widths = []
    for i in range(n):
        longest_word = max([len(w) for row in cells for w in row[i].split()] + [len(w) for w in columns[i].split()])
        prose = any(len(row[i].split()) > 2 for row in cells)
        widths.append(min(natural[i], longest_word, PROSE_MIN if prose else 24))
    while sum(widths) > avail and max(widths) > 4:
        widths[widths.index(max(widths))] -= 1
    spare = avail - sum(widths)
    lacking = [natural[i] - widths[i] for i in range(n)]
    if spare > 0 and sum(lacking) > 0:
        widths = [w + min(lack, spare * lack // sum(lacking)) for w, lack in zip(widths, lacking)]
    return widths


def print_table(title: str | None, columns: list[str], rows: list[list[Any]], *, caption: str | None = None,
                stderr: bool = False) -> None:
    """A rich table that wraps by column: every column is at least as wide as its longest word
    (up to 24 characters), so names are not broken and prose wraps between words, and the
    longer columns take more of the remaining width (a word longer than its column is folded,
    never cut with an ellipsis). Cells are plain text: a "[default]" in them is printed as is."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from rich import box

    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    # Rules under the title and the header only, no vertical borders: more of a narrow
    # terminal for the text.
    table = Table(title=escape(title) if title else None, caption=escape(caption) if caption else None,
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for header in columns:
        table.add_column(escape(header), overflow="fold")
    out = Console(stderr=True) if stderr else console()
    # The width the cells have: the console's, less the table's borders and padding.
    avail = out.width - table._extra_width - sum(table._get_padding_width(i) for i in range(len(columns)))
    for column, width in zip(table.columns, column_widths(columns, cells, avail)):
        column.width = width
    for row in cells:
        table.add_row(*(escape(c) for c in row))
    out.print(table)


def registry():
    """The process registry; plugin failures are reported as one warning line each."""
    from elbokit.plugins import get_registry

    reg = get_registry()
    if not getattr(reg, "_warned", False):
        reg.warn_failures()
        reg._warned = True
    return reg
