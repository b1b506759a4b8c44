"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

Write to a temporary file in the same directory, flush and fsync it, `os.replace` it over the
target (atomic on POSIX and Windows), then fsync the directory so that the rename itself
survives a power cut. A process killed at any moment leaves at most a stray `.tmp` file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import ElbokitError

# Test-only crash points. ELBOKIT_TEST_CRASH_AT="POINT:NAME:N[:SIGNAL]" sends this process
# SIGNAL (default KILL) the N-th time it reaches POINT for NAME, so that tests can stop a run at
# an exact moment (half-way through a checkpoint write, between the fsync and the rename, after
# a metrics line, at a training step) and check that nothing is lost. Points: "mid-write",
# "before-replace" and "after-replace" (NAME: the file's name, e.g. last.safetensors),
# "mid-line" and "after-line" (NAME: metrics.jsonl), "step" (NAME: train; N counts the steps
# of this process). Unset, it costs one environment lookup per call.
CRASH_ENV = "ELBOKIT_TEST_CRASH_AT"
_crash_counts: dict[tuple[str, str], int] = {}


def crash_point(point: str, name: str) -> None:
    """Test-only: signal this process here if ELBOKIT_TEST_CRASH_AT asks for it (see above)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    want_point, want_name, count, *sig = spec.split(":")
    if (point, name) != (want_point, want_name):
        return
    seen = _crash_counts[(point, name)] = _crash_counts.get((point, name), 0) + 1
    if seen == int(count):
        import signal

        os.kill(os.getpid(), getattr(signal, f"SIG{sig[0] if sig else 'KILL'}"))


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# mkstemp/mkdtemp create files 0600 and directories 0700; give them the modes that a plain
# open() or mkdir() would.
_UMASK = _umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """`with atomic_write(path, "wb") as fh: ...`: the file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        crash_point("before-replace", path.name)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    crash_point("after-replace", path.name)
    fsync_dir(path.parent)


def is_temporary(path: Path) -> bool:
    """A temporary file that `atomic_write` leaves behind when the process is killed."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def remove_temporaries(directory: str | Path) -> None:
    """Delete the temporary files a killed `atomic_write` left in `directory`."""
    for path in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()


def make_temporary_dir(final: str | Path) -> Path:
    """An empty hidden directory beside `final`, with the mode mkdir would give it, to be
    filled and then renamed to `final` (a directory that appears complete or not at all)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, _DIR_MODE)
    return tmp


def check_can_create(path: str | Path, what: str, hint: str) -> None:
    """Refuse, before anything is written, a path whose nearest existing ancestor is not a
    writable directory (e.g. --out under a file, or in a read-only directory)."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ElbokitError(f"Cannot create {what} {path}: {parent} is a file, not a directory; {hint}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ElbokitError(f"Cannot create {what} {path}: {parent} is not writable; {hint}.")


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename in it is durable (a no-op where directories can't be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        view, half = memoryview(data), len(data) // 2
        fh.write(view[:half])
        if os.environ.get(CRASH_ENV):
            fh.flush()
            crash_point("mid-write", Path(path).name)
        fh.write(view[half:])


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    """JSON for numpy scalars/arrays and paths."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
