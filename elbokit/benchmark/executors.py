"""Where the cells of a grid run: local processes, or tasks on a Ray cluster.

Either way a cell is the same child process, `python -m elbokit.benchmark.cell GRID NAME`
(cell.py), so its numbers do not depend on the executor or on `--jobs`: its torch thread count
is a setting of the cell (`train.threads`, default 1) and its peak memory is its own process's.

- `LocalExecutor`: at most `jobs` cell processes at a time, started from the driver's main
  thread and in the driver's process group (Ctrl-C in a terminal reaches them all); each asks
  the kernel for SIGTERM when the driver dies (cell.py), and a cell's lock makes a re-invoked
  grid wait for a cell process that outlived its driver.
- `RayExecutor`: each cell is a Ray task (`@ray.remote(num_cpus=threads, max_retries=...)`)
  that runs the same child process on whichever node Ray picks, and a `ray.wait` loop records
  each result as it lands. Ray schedules and retries (a task whose node dies is run again and
  the cell resumes from its checkpoint); there is no scheduler here. The grid directory and the
  data files must be on a filesystem every node sees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ..errors import ElbokitError

OnDone = Callable[[str, int], None]
RAY_MAX_RETRIES = 3
RAY_INSTALL_HINT = 'pip install "elbokit[ray]"'


class GridInterrupted(Exception):
    """SIGINT/SIGTERM reached the driver; the running cells were stopped at a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def cell_command(grid_path: Path, name: str, parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "elbokit.benchmark.cell", str(grid_path), name, str(parent_pid)]


def _child_env() -> dict[str, str]:
    """The driver's environment, with this elbokit importable in the child (a source checkout
    that is not installed stays importable)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class _Signals:
    """While running cells, SIGINT and SIGTERM raise GridInterrupted in the main thread."""

    def __enter__(self) -> "_Signals":
        import threading

        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: object) -> None:
        raise GridInterrupted(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class LocalExecutor:
    name = "local"

    def __init__(self, jobs: int):
        if jobs < 1:
            raise ElbokitError(f"--jobs must be at least 1, got {jobs}.")
        self.jobs = jobs

    def run(self, grid_path: Path, names: list[str], threads: dict[str, int], on_done: OnDone) -> None:
        pending = list(names)
        running: dict[str, subprocess.Popen] = {}
        logs = {}
        env = _child_env()
        try:
            with _Signals():
                while pending or running:
                    while pending and len(running) < self.jobs:
                        name = pending.pop(0)
                        log = open(Path(grid_path) / "cells" / f"{name}.log", "ab")
                        logs[name] = log
                        running[name] = subprocess.Popen(cell_command(grid_path, name, os.getpid()),
                                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                         stderr=log, env=env)
                    for name, proc in list(running.items()):
                        code = proc.poll()
                        if code is not None:
                            del running[name]
                            logs.pop(name).close()
                            on_done(name, code)
                    time.sleep(0.05)
        except GridInterrupted:
            _stop(running)
            raise
        except BaseException:
            _stop(running)
            raise
        finally:
            for log in logs.values():
                log.close()


def _stop(running: dict[str, subprocess.Popen]) -> None:
    """Stop the cells at a checkpoint: a Ctrl-C in a terminal has reached them already (same
    process group); after a moment, the ones still running get SIGTERM."""
    deadline = time.monotonic() + 1.0
    while running and time.monotonic() < deadline and any(p.poll() is None for p in running.values()):
        time.sleep(0.05)
    for proc in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in running.values():
        try:
            proc.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, the cells stop on their own
            proc.kill()


# -- Ray -----------------------------------------------------------------------------------
def _ray_cell(grid_path: str, name: str) -> int:
    """The body of a cell's Ray task: the same child process as the local executor."""
    with open(Path(grid_path) / "cells" / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cell_command(Path(grid_path), name, os.getpid()), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log, env=_child_env())
        try:
            return proc.wait()
        except BaseException:  # the task was cancelled: let the cell save its checkpoint
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise


def import_ray():
    try:
        import ray
    except ImportError:
        raise ElbokitError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL_HINT} (or pip install ray).") from None
    return ray


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = RAY_MAX_RETRIES):
        self.address = address
        self.max_retries = max_retries
        self.ray = import_ray()

    def run(self, grid_path: Path, names: list[str], threads: dict[str, int], on_done: OnDone) -> None:
        ray = self.ray
        started_here = False
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": _child_env()["PYTHONPATH"]}})
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = self.address or "a local Ray instance"
                raise ElbokitError(f"Cannot connect to Ray at {where}: {str(exc).splitlines()[0]}") from None
            started_here = True
        task = ray.remote(_ray_cell)
        refs = {}
        for name in names:
            options = task.options(num_cpus=max(1, threads[name]), max_retries=self.max_retries)
            refs[options.remote(str(grid_path), name)] = name
        try:
            with _Signals():
                while refs:
                    done, _ = ray.wait(list(refs), num_returns=1)
                    for ref in done:
                        name = refs.pop(ref)
                        try:
                            code = ray.get(ref)
                        except ray.exceptions.RayError as exc:  # retries used up, or the task raised
                            print(f"{name}: Ray task failed: {str(exc).splitlines()[0]}", file=sys.stderr)
                            code = 1
                        on_done(name, code)
        except BaseException:
            for ref in refs:
                ray.cancel(ref)
            if refs:  # let the cancelled tasks stop their cells at a checkpoint
                ray.wait(list(refs), num_returns=len(refs), timeout=30)
            raise
        finally:
            if started_here:
                ray.shutdown()
