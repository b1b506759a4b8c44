"""One grid cell, in a process of its own: `python -m elbokit.benchmark.cell GRID_DIR NAME`.

The process takes the cell's lock (GRID/cells/NAME.lock; it waits while another process, e.g.
one left by a killed driver, holds it), then trains the cell's run directory with
`elbokit.train.train` (or resumes it from its checkpoint), scores the best checkpoint on the
test split with `elbokit.evaluate.evaluate_run` (what `elbokit train` stores and `elbokit
evaluate` prints), and writes GRID/cells/NAME.result.json. A cell whose result exists is left
alone. Exit status: 0 when a result was written (also for a failed or diverged cell: that is
a result), 128 + signal when SIGINT/SIGTERM stopped it (its checkpoint is saved; the next
invocation resumes it), 75 when another process holds the run directory's lock (RUN_DIR/.lock,
e.g. `elbokit train --resume` on it): the cell is left for the next invocation.

On Linux the process asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG), so
a SIGKILLed driver does not leave cells training unsupervised: they save a checkpoint and stop.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EXIT_INTERRUPTED = 130


def die_with_parent(parent_pid: int | None) -> None:
    """SIGTERM this process when its parent exits (Linux); exit now if the parent is already gone."""
    import signal

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the lock still guards the cell
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        sys.exit(EXIT_INTERRUPTED)


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    return round(rss / (1 << 20) if sys.platform == "darwin" else rss / 1024, 1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def run_cell(grid_path: str | Path, name: str) -> int:
    import fcntl

    from .grid import GridDir

    grid = GridDir(grid_path)
    with open(grid.lock_file(name), "a+") as lock:
        # Blocks while another process runs this cell (an orphan of a killed driver finishing).
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if grid.read_result(name) is not None:
            return 0
        started = time.perf_counter()
        result = _train_and_score(grid, name)
        if result is None:
            if _INTERRUPT["busy"]:
                return EXIT_BUSY
            return EXIT_INTERRUPTED if _INTERRUPT["signum"] is None else 128 + _INTERRUPT["signum"]
        result["cost"]["cell_seconds"] = round(time.perf_counter() - started, 3)
        result["cost"]["peak_rss_mb"] = peak_rss_mb()
        from ..io import write_json

        write_json(grid.result_file(name), result)
    return 0


_INTERRUPT: dict[str, Any] = {"signum": None, "busy": False}
EXIT_BUSY = 75  # EX_TEMPFAIL: the cell's run directory is locked by another process


def _train_and_score(grid: Any, name: str) -> dict[str, Any] | None:
    from .. import config as config_mod
    from ..metrics import normalize_report
    from ..run import RunDirLocked
    from ..train import TrainingDiverged, TrainingInterrupted, train

    cell = grid.read_cell(name)
    run_dir = grid.run_dir(name)
    result: dict[str, Any] = {"name": name, "status": "ok", "error": None, "metrics": {}, "cost": {}}
    try:
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():  # trained (and scored) by a process killed before it wrote the result
            import json

            summary = json.loads(summary_path.read_text())
        elif run_dir.is_dir():
            summary = train(resume=run_dir)
        else:
            summary = train(config_mod.resolve(cell["config"], source=str(grid.cell_file(name))))
        test = summary.get("test")
        if test is None:
            from ..evaluate import evaluate_run
            from ..run import load_run

            test = evaluate_run(load_run(run_dir, "best"), split="test")
        test = normalize_report(test)
        result["metrics"] = {k: v for k, v in test.items() if isinstance(v, (int, float)) or v is None}
        seconds = summary["train_seconds"]
        # Over the whole run (summary.json's own figure covers only its last process).
        rate = round(summary["steps"] / seconds, 2) if seconds else None
        result["cost"] = {"epochs": summary["epochs"], "steps": summary["steps"], "train_seconds": seconds,
                          "steps_per_second": rate, "eval_seconds": test.get("seconds"),
                          "stopped_by": summary.get("stopped_by")}
    except RunDirLocked as exc:
        # Someone else writes the run directory (e.g. `elbokit train --resume` on it): not a
        # result; the next invocation of the grid runs the cell again.
        print(f"Error: {exc}", file=sys.stderr)
        _INTERRUPT["busy"] = True
        return None
    except TrainingInterrupted as exc:
        _INTERRUPT["signum"] = exc.signum
        return None
    except KeyboardInterrupt:
        return None
    except TrainingDiverged as exc:
        result.update(status="diverged", error=str(exc).splitlines()[0])
        _record_partial_cost(run_dir, result)
    except Exception as exc:  # a cell that raises is a row with its error, never a stopped grid
        traceback.print_exc(file=sys.stderr)
        result.update(status="failed", error=_first_line(exc))
        _record_partial_cost(run_dir, result)
    return result


def _record_partial_cost(run_dir: Path, result: dict[str, Any]) -> None:
    """Epochs done before a failure, from the run's metrics (when it got that far)."""
    from ..run import read_metrics

    try:
        records = read_metrics(run_dir / "metrics.jsonl")
    except Exception:  # noqa: BLE001 - the failure is already recorded; this is a detail
        return
    if records:
        result["cost"]["epochs"] = records[-1]["epoch"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (2, 3):
        print("usage: python -m elbokit.benchmark.cell GRID_DIR NAME [PARENT_PID]", file=sys.stderr)
        return 2
    die_with_parent(int(argv[2]) if len(argv) == 3 else None)
    return run_cell(argv[0], argv[1])


if __name__ == "__main__":
    sys.exit(main())
