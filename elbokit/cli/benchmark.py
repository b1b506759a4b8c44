"""`elbokit benchmark`: the group of benchmark commands (`estimators`, `grid`)."""

from __future__ import annotations

import typer

from . import benchmark_estimators, benchmark_grid

benchmark_app = typer.Typer(
    name="benchmark",
    help="Measure elbokit's components: estimators against ground truth, grids of training runs.",
    no_args_is_help=True,
)

for _commands in (benchmark_estimators, benchmark_grid):
    _commands.register(benchmark_app)


def register(app: typer.Typer) -> None:
    app.add_typer(benchmark_app, name="benchmark")
