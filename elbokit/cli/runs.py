"""`elbokit runs [list [DIR]]` and `elbokit runs compare RUN...`: find and compare run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .common import console, handle_errors, print_json, print_table

runs_app = typer.Typer(help="List the run directories under a directory (./runs by default) and compare runs.")

DEFAULT_ROOT = Path("runs")


def _num(value: Any, se: Any = None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.{digits}f}"
        return f"{text} ± {se:.{digits}f}" if isinstance(se, float) else text
    return str(value)


def _list(root: Path, json_output: bool) -> None:
    from elbokit.runs import list_runs

    rows = list_runs(root)
    if json_output:
        print_json(rows)
        return
    if not rows:
        console().print(f"No runs under {root}.", highlight=False)
        return
    print_table(f"Runs under {root}", ["name", "status", "terms", "prior", "data", "epochs", "best val",
                                       "test ELBO", "test IWAE", "tags"],
                [[r["name"], r["status"], r["terms"], r["prior"], r["data"],
                  f"{r['epochs']}/{r['max_epochs']}", _num(r["best_val"]),
                  _num(r.get("test_elbo"), r.get("test_elbo_se")), _num(r.get("test_iwae"), r.get("test_iwae_se")),
                  ",".join(r["tags"])] for r in rows],
                caption="best val: the selection metric (val -ELBO or val loss) in the model's space; "
                        "test ELBO and IWAE: nats per example in data units, ± SE.")


@runs_app.callback(invoke_without_command=True)
def runs(ctx: typer.Context,
         json_output: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table.")) -> None:
    """List the run directories under ./runs (or DIR with `runs list DIR`) and compare runs."""
    if ctx.invoked_subcommand is None:
        handle_errors(_list)(DEFAULT_ROOT, json_output)


@runs_app.command("list")
@handle_errors
def list_command(
    root: Optional[Path] = typer.Argument(None, help="The directory to search for run directories [runs]."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List every run directory under DIR (benchmark cells too): name, status, terms, prior, data, epochs, validation and test metrics."""
    _list(root or DEFAULT_ROOT, json_output)


@runs_app.command("compare")
@handle_errors
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Two or more run directories."),
    json_output: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object."),
) -> None:
    """Put runs side by side: the config keys where they differ, then their metrics."""
    from elbokit.runs import compare_runs

    result = compare_runs(run_dirs)
    if json_output:
        print_json(result)
        return
    names = result["names"]
    rows = [[key, *("-" if v is None else str(v) for v in values)]
            for key, values in result["config_differences"].items()]
    if rows:
        print_table("Config differences", ["key", *names], rows)
    else:
        console().print("The configs are the same (apart from the output directory).", highlight=False)
    print_table("Metrics (names from docs/metrics.md)", ["metric", *names],
                [[key, *(_num(v, digits=3) for v in values)] for key, values in result["metrics"].items()])


@runs_app.command("mlflow")
@handle_errors
def mlflow_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories to log."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="The MLflow store [sqlite:///<each run's parent>/mlflow.db]."),
    experiment: str = typer.Option("elbokit", "--experiment", help="The MLflow experiment."),
    json_output: bool = typer.Option(False, "--json", help="Print the MLflow run ids as JSON."),
) -> None:
    """Log run directories to MLflow (needs the mlflow extra): config as parameters, metrics per epoch, summary and figures."""
    from elbokit.errors import ElbokitError
    from elbokit.runs import is_run_dir
    from elbokit.tracking import _mlflow, default_tracking_uri, log_run

    _mlflow()  # one clear line, before anything, when mlflow is not installed
    for path in run_dirs:
        if not is_run_dir(path):
            raise ElbokitError(f"{path} is not an elbokit run directory (no config.toml).")
    logged = []
    for path in run_dirs:
        uri = tracking_uri or default_tracking_uri(path.resolve().parent)
        logged.append({"run_dir": str(path), "tracking_uri": uri,
                       "run_id": log_run(path, uri, experiment=experiment)})
    if json_output:
        print_json(logged)
    else:
        for item in logged:
            console().print(f"Logged {item['run_dir']} to {item['tracking_uri']} (run {item['run_id']})",
                            highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
