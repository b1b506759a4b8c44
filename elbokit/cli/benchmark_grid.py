"""`elbokit benchmark grid`: term lists x priors x datasets x seeds, one run directory per cell,
resumable, in local processes or on a Ray cluster (docs/grids.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .common import EXIT_INTERRUPTED, console, handle_errors, print_json

TERMINAL_COLUMNS = ["elbo", "iwae", "recon", "kl", "marginal_kl", "active_units", "epochs", "train_seconds"]


class RichProgress:
    """A bar of finished cells on stderr, and one line per cell as it lands."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.progress = None

    def start(self, total: int, done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=self.console)
        self.progress.start()
        self.task = self.progress.add_task("cells", total=total, completed=done)

    def cell_done(self, name: str, status: str, seconds: float | None) -> None:
        from rich.markup import escape

        took = f" ({seconds:.1f} s)" if seconds else ""
        style = {"ok": "green", "interrupted": "yellow"}.get(status, "red")
        self.console.print(f"[{style}]{escape(status)}[/{style}] {escape(name)}{took}", highlight=False)
        if status != "interrupted":
            self.progress.advance(self.task)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _print_table(summary: dict[str, Any], title: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    from elbokit.benchmark.grid import mean_sd

    table = Table(title=title, caption="Held-out test split, nats per example; mean ± sd over seeds. "
                  "All columns: summary.csv; per cell: results.csv.")
    table.add_column("configuration", overflow="fold")
    table.add_column("n")
    for key in TERMINAL_COLUMNS:
        table.add_column(key, justify="right")
    for g in summary["configurations"]:
        n = str(g["ok"]) + (f" (+{g['failed']} failed)" if g["failed"] else "")
        table.add_row(escape(g["configuration"]), n, *(mean_sd(g["metrics"][k]) for k in TERMINAL_COLUMNS))
    console().print(table)


def _print_plan(cells: list, grid: Any, estimate: dict[str, Any], executor: str, jobs: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(cells)} cells in {grid.path}")
    for col in ("cell", "data", "terms", "prior", "seed", "status"):
        table.add_column(col, overflow="fold")
    known = grid.read_index() is not None
    for c in cells:
        status = grid.status(c.name) if known else "new"
        table.add_row(*(escape(str(v)) for v in (c.name, c.labels["data"], c.config["objective"]["terms"],
                                                  c.config["prior"]["name"], c.labels["seed"], status)))
    out = console()
    out.print(table)
    minutes = estimate["upper_bound_seconds"] / 60
    out.print(f"{estimate['cells_to_run']} cells to run with --executor {executor} --jobs {jobs}: at most about "
              f"{minutes:.1f} min (every cell to max_epochs; early stopping usually ends sooner; speed from "
              f"{estimate['source']}).", highlight=False)


def grid(
    grid_file: Optional[Path] = typer.Argument(None, help="A grid file (TOML, docs/grids.md); options given here override it."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A named grid: table2 (the paper's Table II) or choices (estimator choices around ed)."),
    quick: bool = typer.Option(False, "--quick", help="Shrink the preset to the same shape: 2 seeds, at most 30 epochs, 2000 rows."),
    terms: list[str] = typer.Option([], "--terms", help="An axis entry: a preset (classic, ed) or name[:weight] items (repeatable)."),
    prior: list[str] = typer.Option([], "--prior", help="An axis entry: a prior name (repeatable)."),
    data: list[str] = typer.Option([], "--data", help="An axis entry: a dataset name or a data file (repeatable)."),
    seeds: list[str] = typer.Option([], "--seeds", help="Training seeds: 0-4, 0,2,5 (repeatable) [0]."),
    data_seed: Optional[int] = typer.Option(None, "--data-seed", help="Held fixed: seed of the data generator and the split [0]."),
    n: Optional[int] = typer.Option(None, "--n", help="Held fixed: rows to generate [10000]."),
    data_dim: Optional[int] = typer.Option(None, "--data-dim", help="Held fixed: data dimension of generated data [20]."),
    data_latent_dim: Optional[int] = typer.Option(None, "--data-latent-dim", help="Held fixed: true latent dimension of generated data."),
    noise_std: Optional[float] = typer.Option(None, "--noise-std", help="Held fixed: observation noise std [0.5]."),
    radius: Optional[float] = typer.Option(None, "--radius", help="Held fixed: std of the positives' noise [0.1]."),
    data_option: list[str] = typer.Option([], "--data-option", help="Held fixed: KEY=VALUE for a plugin dataset (repeatable)."),
    positives: Optional[str] = typer.Option(None, "--positives", help="Held fixed: positives by augmentation, e.g. gaussian:0.1 or shift:1+flip."),
    latent_dim: Optional[int] = typer.Option(None, "--latent-dim", help="Held fixed: latent dimension [5]."),
    hidden: Optional[str] = typer.Option(None, "--hidden", help="Held fixed: hidden layer sizes [400,400]."),
    option: list[str] = typer.Option([], "--option", "-o", help="Held fixed: per-term option TERM.KEY=VALUE (repeatable)."),
    prior_samples: Optional[str] = typer.Option(None, "--prior-samples", help="Held fixed: a .npy/.npz of prior samples."),
    prior_option: list[str] = typer.Option([], "--prior-option", help="Held fixed: prior option KEY=VALUE (repeatable)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Held fixed: Adam learning rate [0.001]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Held fixed: minibatch size [512]."),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="Held fixed: most epochs [300]."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Held fixed: early-stopping patience [20]."),
    select: Optional[str] = typer.Option(None, "--select", help="Held fixed: validation metric, elbo or loss."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Held fixed: gradient-norm clip (0: off)."),
    device: Optional[str] = typer.Option(None, "--device", help="Held fixed: cpu (default), cuda, cuda:N or auto."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads of each cell [1]; recorded in the cell."),
    checkpoint_seconds: Optional[float] = typer.Option(None, "--checkpoint-seconds", help="Held fixed: checkpoint spacing in seconds [10]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Grid directory [runs/<preset>[-quick] for a preset]; re-use it to resume or extend."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Cells at a time (local executor) [the usable cores]."),
    executor: str = typer.Option("local", "--executor", help="local (processes on this machine) or ray."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address HOST:PORT or auto [start a local Ray]."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run the cells that failed or diverged again."),
    print_grid: bool = typer.Option(False, "--print-grid", help="Show the resolved cells and a time estimate; run nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or table."),
    json_output: bool = typer.Option(False, "--json", help="Print summary.json on stdout."),
) -> None:
    """Train and evaluate every cell of a grid (term lists x priors x data x seeds), e.g.
    --terms classic --terms ed --prior standard-normal --prior gmm --seeds 0-4 --out results/grid1."""
    from elbokit.benchmark import executors, presets
    from elbokit.benchmark.grid import (AxisEntry, GridDir, deep_merge, estimate_seconds, load_grid_file,
                                        parse_seeds, resolve_cells, run_grid, spec_from_dict, axis_entry)
    from elbokit.errors import ElbokitError

    from .train import config_overrides

    if preset is not None and grid_file is not None:
        raise ElbokitError("Give a grid file or --preset, not both.")
    if executor not in ("local", "ray"):
        raise ElbokitError(f"--executor must be local or ray, got '{executor}'.")
    if address is not None and executor != "ray":
        raise ElbokitError("--address is for --executor ray.")
    if preset is not None:
        spec = spec_from_dict(presets.preset(preset, quick=quick), f"preset {preset}")
        spec.preset = preset
    elif quick:
        raise ElbokitError("--quick shrinks a preset (--preset table2 or choices); for your own grid give fewer "
                           "--seeds, --max-epochs and --n.")
    elif grid_file is not None:
        spec = load_grid_file(grid_file)
    else:
        spec = spec_from_dict({}, "the command line")
    for axis, values in (("terms", terms), ("prior", prior), ("data", data)):
        if values:
            spec.axes[axis] = [axis_entry(axis, v, "the command line") for v in values]
    if seeds:
        spec.axes["seed"] = [AxisEntry(None, {"train": {"seed": s}}) for s in parse_seeds(",".join(seeds))]
    fixed = config_overrides(
        data_seed=data_seed, n=n, data_dim=data_dim, data_latent_dim=data_latent_dim, noise_std=noise_std,
        radius=radius, data_option=data_option, positives=positives, latent_dim=latent_dim, hidden=hidden, option=option,
        prior_samples=prior_samples, prior_option=prior_option, lr=lr, batch_size=batch_size, max_epochs=max_epochs,
        patience=patience, select=select, grad_clip=grad_clip, device=device, threads=threads,
        checkpoint_seconds=checkpoint_seconds)
    spec.fixed = deep_merge(spec.fixed, fixed)
    if out is None:
        if preset is None:
            raise ElbokitError("Give the grid directory with --out DIR (the same DIR resumes or extends the grid).")
        out = Path("runs") / (preset + ("-quick" if quick else ""))
    jobs = jobs if jobs is not None else executors.usable_cores()

    grid_dir = GridDir(out)
    if print_grid:
        cells = resolve_cells(spec, grid_dir.path)
        if grid_dir.read_index() is not None:
            grid_dir.plan(spec, cells)  # a refused extension is refused here too
        estimate = estimate_seconds(cells, grid_dir, jobs if executor == "local" else 1)
        if json_output:
            print_json({"grid": str(grid_dir.path), "estimate": estimate,
                        "cells": [{"name": c.name, **c.labels, "config": c.config} for c in cells]})
        else:
            _print_plan(cells, grid_dir, estimate, executor, jobs)
        return
    runner = executors.LocalExecutor(jobs) if executor == "local" else executors.RayExecutor(address)
    progress = None if quiet or json_output else RichProgress()
    header = f"# {spec.title}" if spec.title else ""
    extra = presets.EXTRA_MARKDOWN.get(preset) if preset else None
    try:
        summary = run_grid(spec, grid_dir.path, runner, retry_failed=retry_failed, progress=progress,
                           header=header, extra_markdown=extra)
    except executors.GridInterrupted as exc:
        index = grid_dir.read_index() or {"cells": []}
        done = sum(grid_dir.read_result(n) is not None for n in index["cells"])
        print(f"Interrupted: {done} of {len(index['cells'])} cells are finished in {grid_dir.path} (the others keep "
              "their checkpoints); run the same command again to continue.", file=sys.stderr)
        raise typer.Exit(128 + exc.signum if exc.signum else EXIT_INTERRUPTED) from None
    if json_output:
        print_json(summary)
        return
    if not quiet:
        _print_table(summary, f"{grid_dir.path}: {summary['ok']} of {summary['cells']} cells ok")
        note = f"{summary['failed']} cells failed or diverged (rows with their error in results.csv). " if summary["failed"] else ""
        print(f"{note}Ran {len(summary['ran'])} cells in {summary['wall_seconds']:.0f} s. Outputs: results.csv, summary.csv, summary.json, summary.md, "
              f"figures/ in {grid_dir.path}")


def register(benchmark_app: typer.Typer) -> None:
    benchmark_app.command(name="grid")(handle_errors(grid))


__all__ = ["register", "grid"]
