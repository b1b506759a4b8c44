"""Shared fixtures. Entry-point plugins are off for the whole suite (tests see the built-ins
only), except in the tests that check entry-point discovery and turn it back on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("ELBOKIT_DISABLE_PLUGINS", "1")
# train.threads defaults to OMP_NUM_THREADS when set, else every CPU the process may use: the
# suite pins one thread so its runs do not oversubscribe a shared machine (tests/test_run_dir.py
# checks the default policy itself).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """Run the `elbokit` command line in-process: run_cli("terms", "--json")."""
    from elbokit.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


@pytest.fixture
def fresh_registry():
    """A registry of the built-ins only, installed as the process registry for the test."""
    from elbokit.plugins import Registry, set_registry

    registry = Registry.build(load_entry_points=False, strict=True)
    set_registry(registry)
    yield registry
    set_registry(None)


@pytest.fixture
def interrupting_reporter():
    """A training reporter class that raises KeyboardInterrupt at training step `at` (counted
    from 1 in this process), as user code or a second Ctrl-C does: `interrupting_reporter(at)`."""
    from elbokit.train import SilentReporter

    class InterruptAtStep(SilentReporter):
        def __init__(self, at: int):
            self.at, self.steps = at, 0

        def step(self):
            self.steps += 1
            if self.steps == self.at:
                raise KeyboardInterrupt

    return InterruptAtStep
