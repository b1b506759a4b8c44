"""`elbokit plot RUN_DIR`: figures of a run, by default as PNG in RUN_DIR/plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, handle_errors, print_json


def plot(
    run_dir: Path = typer.Argument(..., help="A run directory written by elbokit train."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
    split: str = typer.Option("test", "--split", help="The split whose aggregate posterior and images are shown: train, val or test."),
    figure: list[str] = typer.Option([], "--figure", help="loss, terms, latents or reconstructions (repeatable) [all]."),
    out: Optional[Path] = typer.Option(None, "--out", help="A directory for the figures, or one .png/.svg/.pdf file with one --figure [RUN_DIR/plots]."),
    fmt: Optional[str] = typer.Option(None, "--format", help="png, svg or pdf [png, or the suffix of --out]."),
    force: bool = typer.Option(False, "--force", help="Overwrite files that exist at --out."),
    json_output: bool = typer.Option(False, "--json", help="Print the written paths as JSON."),
) -> None:
    """Plot the training and validation loss, each term, the aggregate posterior over the prior, and reconstructions of image data."""
    import sys

    from elbokit.plot import plot_run
    from elbokit.plugins import get_registry
    from elbokit.run import RunDir, check_metadata

    if run_dir.is_dir():
        for warning in check_metadata(RunDir(run_dir), get_registry()):
            print(f"Warning: {warning}", file=sys.stderr)
    paths = [str(p) for p in plot_run(run_dir, checkpoint, split, out=out, fmt=fmt, figures=figure or None,
                                       force=force)]
    if json_output:
        print_json({"run_dir": str(run_dir), "plots": paths})
    else:
        for p in paths:
            console().print(f"Wrote {p}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="plot")(handle_errors(plot))
