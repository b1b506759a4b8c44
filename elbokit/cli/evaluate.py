"""`elbokit evaluate RUN_DIR`: held-out ELBO, IWAE, exact log-likelihood and the ELBO surgery."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .common import console, handle_errors, print_json

# (key, label, kind) in the order the table shows them. `kind` says what the number is.
ROWS = [
    ("elbo", "ELBO", "lower bound"),
    ("iwae", "IWAE (K samples)", "lower bound, >= ELBO"),
    ("exact_loglik", "exact log p(x)", "exact"),
    ("recon", "reconstruction -E log p(x|z)", "estimate"),
    ("kl", "KL(q(z|x) || p(z))", "estimate"),
    ("mi", "I_q(x; z)", "estimate"),
    ("marginal_kl", "KL(q(z) || p(z))", "estimate"),
    ("entropy", "H[q(z)]", "estimate"),
    ("cross_entropy", "H[q(z), p(z)]", "estimate"),
    ("identity_gap", "kl - (mi + marginal_kl)", "check: ~0"),
    ("mse", "MSE", "estimate"),
    ("active_units", "active units", "count"),
    ("latent_r2", "latent R^2 (cross-validated)", "estimate"),
    ("paper_mse", "paper MSE", "paper's metric"),
    ("paper_kld", "paper KLD", "paper's metric"),
    ("paper_elbo", "paper ELBO = -MSE - KLD", "NOT a bound"),
]

UNIT_OF = {
    "elbo": "nats, original units", "iwae": "nats, original units", "exact_loglik": "nats, original units",
    "recon": "nats, original units", "kl": "nats", "mi": "nats", "marginal_kl": "nats", "entropy": "nats",
    "cross_entropy": "nats", "identity_gap": "nats", "mse": "original units", "paper_mse": "model space",
    "paper_kld": "nats", "paper_elbo": "mixed",
}


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

    table = Table(title=title, caption="Per example. ELBO <= IWAE <= log p(x); the paper's "
                  "'ELBO' = -MSE - KLD is not a bound and does not rank models.")
    for col in ("metric", "value", "± SE", "kind", "units"):
        table.add_column(col, overflow="fold")
    for key, label, kind in ROWS:
        if key == "iwae":
            label = f"IWAE (K={report['iw_samples']})"
        if key == "active_units":
            value = f"{report['active_units']} of {report['latent_dim']}"
        else:
            value = _fmt(report.get(key))
        se = _fmt(report.get(f"{key}_se"))
        if key == "kl" and report.get("kl_estimator"):
            kind = f"{report['kl_estimator']}"
        if key == "cross_entropy" and report.get("cross_entropy_estimator"):
            kind = report["cross_entropy_estimator"]
        if key == "mi":
            kind = f"<= log N = {report['mi_max']:.2f}"
        style = "bold" if key in ("elbo", "iwae", "exact_loglik") else ("dim" if key.startswith("paper_") else None)
        table.add_row(*(escape(str(c)) for c in (label, value, se if se != "n/a" else "",
                                                 kind, UNIT_OF.get(key, ""))), style=style)
    out = console()
    out.print(table)
    for key, reason in report.get("unavailable", {}).items():
        out.print(f"{key}: n/a ({escape(reason)})", highlight=False)


def _load_data(spec: str, data_seed: int, data_option: list[str]):
    from elbokit import config as config_mod
    from elbokit.data import load_dataset

    options = dict(config_mod.parse_assignment(t, "--data-option") for t in data_option)
    return load_dataset(spec, options, seed=data_seed)


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
    json_output: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Evaluate a trained run on held-out data against its own prior: ELBO, IWAE, exact log p(x), ELBO surgery."""
    from elbokit.errors import ElbokitError

    if iw_samples <= 0:
        raise ElbokitError(f"--iw-samples must be a positive integer, got {iw_samples}.")
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
    dataset = _load_data(data, data_seed, data_option) if data is not None else None
    report = evaluate_run(run, split=split or "test", data=dataset, iw_samples=iw_samples, seed=seed)
    report["run_dir"] = str(run_dir)
    report["checkpoint"] = checkpoint
    if json_output:
        print_json(report)
        return
    where = f"--data {data}" if data is not None else f"{report['split']} split"
    print_report(report, f"{run_dir} ({checkpoint}), {where}: N={report['n']}, K={report['iw_samples']}, "
                         f"{report['seconds']:.1f} s")


def register(app: typer.Typer) -> None:
    app.command(name="evaluate")(handle_errors(evaluate))


__all__ = ["register", "evaluate", "print_report"]
