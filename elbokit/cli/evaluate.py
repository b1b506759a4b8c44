"""`elbokit evaluate RUN_DIR`: held-out ELBO, IWAE, exact log-likelihood and the ELBO surgery."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .common import console, handle_errors, print_json

# The order the table shows them; labels, kinds and units come from `elbokit.metrics`.
ROWS = ["elbo", "iwae", "exact_loglik", "recon", "kl", "mi", "marginal_kl", "aggregate_entropy",
        "aggregate_cross_entropy", "identity_gap", "mse", "active_units", "latent_r2", "paper_mse", "paper_kld",
        "paper_elbo"]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def print_report(report: dict[str, Any], title: str) -> None:
    """The report as a rich table; the `kind` column says which numbers are bounds."""
    from rich.markup import escape
    from rich.table import Table

    from elbokit.metrics import EVALUATION, normalize_report

    report = normalize_report(report)
    table = Table(title=title, caption="Nats per example (data: original data units; latent: latent space). ELBO <= IWAE <= log p(x); the paper's "
                  "'ELBO' = -MSE - KLD is not a bound and does not rank models.")
    # Columns wrap between words; names and numbers are never broken.
    table.add_column("name", no_wrap=True)
    table.add_column("what it is", min_width=11)
    table.add_column("value ± SE", no_wrap=True, justify="right")
    table.add_column("kind; units", min_width=11)
    for key in ROWS:
        m = EVALUATION[key]
        label, kind = m.label, ("NOT a bound" if m.kind == "not a bound" else m.kind)
        if key == "iwae":
            label = f"IWAE (K={report['iw_samples']})"
        if key == "active_units":
            value = f"{report['active_units']} of {report['latent_dim']}"
        else:
            value = _fmt(report.get(key), 3)
        se = _fmt(report.get(f"{key}_se"), 3)
        if se != "n/a":
            value = f"{value} ± {se}"
        if key == "kl" and report.get("kl_estimator"):
            kind = "exact (analytic)" if report["kl_estimator"] == "analytic" else f"estimate ({report['kl_estimator']})"
        if key == "aggregate_cross_entropy" and report.get("aggregate_cross_entropy_estimator"):
            kind = f"estimate ({report['aggregate_cross_entropy_estimator']})"
        if key == "mi" and report.get("mi_max") is not None:
            kind = f"<= log N = {report['mi_max']:.2f}"
        if key in report.get("notes", {}):
            kind += " (see note)"
        style = "bold" if key in ("elbo", "iwae", "exact_loglik") else ("dim" if key.startswith("paper_") else None)
        table.add_row(*(escape(str(c)) for c in (key, label, value, f"{kind}; {m.short_units}")),
                      style=style)
    out = console()
    out.print(table)
    for key, note in report.get("notes", {}).items():
        out.print(f"Note: {escape(note)}", highlight=False)
    for key, reason in report.get("unavailable", {}).items():
        out.print(f"{key}: n/a ({escape(reason)})", highlight=False)


def _load_data(spec: str, data_seed: int, data_option: list[str]):
    from elbokit import config as config_mod
    from elbokit.data import load_dataset

    options = dict(config_mod.parse_assignment(t, "--data-option") for t in data_option)
    return load_dataset(spec, options, seed=data_seed)


def _scored_rows(run: Any, split: str, data: str | None, dataset: Any) -> dict[str, Any]:
    """Which rows are scored: the run's split (with its row indices into the run's data), or a
    --data set; and how many of them the model was trained on (the training split, or, for
    --data, the run's own data file: identical sha256)."""
    if data is None:
        indices = run.indices.get(split)
        if indices is None:  # an unknown split: evaluate_run says so in one line
            return {"source": "split", "split": split, "n": 0, "training_rows": 0}
        return {"source": "split", "split": split, "n": int(len(indices)),
                "training_rows": int(len(indices)) if split == "train" else 0}
    n = len(dataset)
    same_file = False
    sha = run.data_info.get("sha256")
    if sha and dataset.meta.get("source"):
        from elbokit.run import sha256_file

        same_file = sha256_file(dataset.meta["source"]) == sha
    return {"source": "data", "data": data, "n": int(n),
            "training_rows": int(len(run.indices["train"])) if same_file else 0}


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


class _IwProgress:
    """The up-front estimate of the IWAE pass (refused above --max-minutes, announced on stderr
    above a few seconds) and a rich progress bar on stderr while it runs."""

    ANNOUNCE_SECONDS = 5.0

    def __init__(self, iw_samples: int, max_minutes: float):
        self.iw_samples, self.max_minutes = iw_samples, max_minutes
        self.bar = self.task = None

    def check_cost(self, seconds: float, pairs: int) -> None:
        from elbokit.errors import ElbokitError

        what = (f"--iw-samples {self.iw_samples} means {pairs:.3g} decoder evaluations (N x K), estimated at "
                f"{_duration(seconds)} here (memory stays bounded: the pass works in blocks)")
        if seconds > self.max_minutes * 60:
            raise ElbokitError(f"{what}, more than --max-minutes {self.max_minutes:g}; lower --iw-samples "
                               f"(the IWAE bound tightens slowly in K) or raise --max-minutes.")
        if seconds > self.ANNOUNCE_SECONDS:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            print(f"Note: {what}.", file=sys.stderr)
            self.bar = Progress(TextColumn("IWAE samples"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("iwae", total=pairs)

    def progress(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)

    def __enter__(self) -> "_IwProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by `elbokit train`."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluate this dataset (a name such as gaussian, or a .npz/.npy/.csv file) instead of the run's split; every row is used."),
    data_seed: int = typer.Option(0, "--data-seed", help="Seed of a generated --data."),
    data_option: list[str] = typer.Option([], "--data-option", help="KEY=VALUE for a generated --data, e.g. n=2000 (repeatable)."),
    split: Optional[str] = typer.Option(None, "--split", help="The run's split to evaluate: test (default), val or train."),
    iw_samples: int = typer.Option(1000, "--iw-samples", "-k", help="Importance samples K per example for the IWAE bound."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the Monte-Carlo samples."),
    device: str = typer.Option("cpu", "--device", help="cpu (default), cuda, cuda:N or auto."),
    max_minutes: float = typer.Option(60.0, "--max-minutes", help="Refuse, before starting, an IWAE pass estimated (by timing one block here) to take longer than this."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Evaluate a trained run on held-out data against its own prior: ELBO, IWAE, exact log p(x), ELBO surgery."""
    from elbokit.errors import ElbokitError

    if iw_samples <= 0:
        raise ElbokitError(f"--iw-samples must be a positive integer, got {iw_samples}.")
    if not max_minutes > 0:
        raise ElbokitError(f"--max-minutes must be a positive number, got {max_minutes}.")
    if data is not None and split is not None:
        raise ElbokitError("--split picks one of the run's own splits; with --data the whole given dataset is evaluated.")
    if data is None and (data_option or data_seed):
        raise ElbokitError("--data-seed and --data-option apply to a dataset given with --data.")
    from elbokit.config import device_check

    device = device_check("--device", device)
    if not run_dir.is_dir():
        raise ElbokitError(f"Run directory not found: {run_dir}.")
    from elbokit.evaluate import evaluate_run
    from elbokit.run import load_run

    run = load_run(run_dir, checkpoint, device=device)
    for warning in run.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    dataset = _load_data(data, data_seed, data_option) if data is not None else None
    scored = _scored_rows(run, split or "test", data, dataset)
    if scored["training_rows"]:
        print(f"Warning: {scored['training_rows']} of the {scored['n']} rows evaluated are rows the model was trained on "
              "(the training split); their bounds are optimistic. Evaluate --split test for held-out numbers.",
              file=sys.stderr)
    with _IwProgress(iw_samples, max_minutes) as watch:
        report = evaluate_run(run, split=split or "test", data=dataset, iw_samples=iw_samples, seed=seed,
                              progress=watch.progress, check_cost=watch.check_cost)
    report["run_dir"] = str(run_dir)
    report["checkpoint"] = checkpoint
    report["rows"] = scored
    if json_output:
        print_json(report)
        return
    where = f"--data {data}" if data is not None else f"{report['split']} split"
    print_report(report, f"{run_dir} ({checkpoint}), {where}: N={report['n']}, K={report['iw_samples']}, "
                         f"{report['seconds']:.1f} s")


def register(app: typer.Typer) -> None:
    app.command(name="evaluate")(handle_errors(evaluate))


__all__ = ["register", "evaluate", "print_report"]
