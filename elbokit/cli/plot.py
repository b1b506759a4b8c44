"""`elbokit plot RUN_DIR`: PNG figures of a run in RUN_DIR/plots."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, handle_errors, print_json


def plot(
    run_dir: Path = typer.Argument(..., help="A run directory written by elbokit train."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
    split: str = typer.Option("test", "--split", help="The split whose codes and images are shown: train, val or test."),
    json_output: bool = typer.Option(False, "--json", help="Print the written paths as JSON."),
) -> None:
    """Plot each term over epochs, latent codes beside prior samples, and reconstructions of image data."""
    import sys

    from elbokit.plot import plot_run
    from elbokit.plugins import get_registry
    from elbokit.run import RunDir, check_metadata

    if run_dir.is_dir():
        for warning in check_metadata(RunDir(run_dir), get_registry()):
            print(f"Warning: {warning}", file=sys.stderr)
    paths = [str(p) for p in plot_run(run_dir, checkpoint, split)]
    if json_output:
        print_json({"run_dir": str(run_dir), "plots": paths})
    else:
        for p in paths:
            console().print(f"Wrote {p}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="plot")(handle_errors(plot))
