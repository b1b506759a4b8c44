"""`elbokit benchmark estimators`: every registered estimator against ground truth."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import console, fail, handle_errors, print_json, registry


def _ints(text: Optional[str], what: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{what} takes comma-separated integers (e.g. 32,128,512), got {text!r}.")


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{what} takes comma-separated numbers (e.g. 0.05,0.3,1), got {text!r}.")


def _split(items: Optional[List[str]]) -> Optional[list[str]]:
    if not items:
        return None
    return [v.strip() for item in items for v in item.split(",") if v.strip()]


def estimators(
    quantity: Optional[List[str]] = typer.Option(None, "--quantity", "-q",
                                                 help="Only these quantities: kl, entropy, cross_entropy, mi (repeat or comma-separate)."),
    estimator: Optional[List[str]] = typer.Option(None, "--estimator", "-e",
                                                  help="Only these estimators, as QUANTITY/NAME or NAME (repeat or comma-separate)."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-o",
                                               help="KEY=V1,V2: sweep an estimator option (e.g. k=1,3,10; temperature=0.05,0.1)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-size", "-m", help="Batch sizes M (default 32,128,512; with --from-run the run's batch size, a quarter and twice it)."),
    dataset_sizes: Optional[str] = typer.Option(None, "--dataset-size", "-n", help="Dataset sizes N of the synthetic families (default 1000)."),
    latent_dims: Optional[str] = typer.Option(None, "--latent-dim", "-l", help="Latent dimensions L (default 5)."),
    overlaps: Optional[str] = typer.Option(None, "--overlap", help="Posterior scales s in (0, 1]: 1 = identical posteriors, small = well separated (default 0.05,0.3,1)."),
    repeats: int = typer.Option(20, "--repeats", help="Batches per measurement."),
    truth_samples: int = typer.Option(5000, "--truth-samples", help="float64 Monte-Carlo draws for each truth without a closed form."),
    seed: int = typer.Option(0, "--seed"),
    from_run: Optional[Path] = typer.Option(None, "--from-run", help="Measure on a trained run's posteriors over its training split instead."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="With --from-run: best or last."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write results.json, results.csv, results.md and PNG figures here."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory (torch.profiler; adds a call per row)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's)."),
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Bias (with SE), spread, RMSE, time and peak memory of every estimator against ground truth."""
    from elbokit.benchmark import estimators as bench

    options = bench.parse_options(option or [])
    m_list = _ints(batch_sizes, "--batch-size")
    n_list = _ints(dataset_sizes, "--dataset-size")
    l_list = _ints(latent_dims, "--latent-dim")
    s_list = _floats(overlaps, "--overlap")
    if from_run is not None and any(v is not None for v in (n_list, l_list, s_list)):
        fail("--dataset-size, --latent-dim and --overlap describe synthetic families; --from-run uses the run's own.")
    if threads is not None:
        if threads < 1:
            fail(f"--threads must be a positive integer, got {threads}.")
        import torch

        torch.set_num_threads(threads)
    if out is not None:
        bench.check_out_dir(out)
    specs = bench.select_specs(registry(), _split(quantity), _split(estimator), options)

    progress = None
    if not json_output and sys.stderr.isatty():
        def progress(row):  # noqa: E306 - a one-line note per measured row
            console_err.print(f"{row['estimator']} {row['prior']} s={row['overlap']} M={row['M']}: "
                              f"bias {row['bias']:.3f}", highlight=False)
        from rich.console import Console

        console_err = Console(stderr=True)
    if from_run is not None:
        result = bench.run_from_run(specs, from_run, m_list, repeats, truth_samples, seed, checkpoint, memory, progress)
    else:
        result = bench.run_synthetic(specs, m_list, n_list, l_list, s_list, repeats, truth_samples, seed, memory,
                                     progress)
    result = {"command": "elbokit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None,
              "commit": bench.commit(), "machine": bench.machine(), **result}
    paths = bench.write_outputs(result, out) if out is not None else []
    if json_output:
        return print_json({**result, "written": [str(p) for p in paths]})
    _print_table(result)
    for p in paths[:3]:
        console().print(f"Wrote {p}", highlight=False)
    if len(paths) > 3:
        console().print(f"Wrote {len(paths) - 3} figures in {out}", highlight=False)


def _print_table(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from elbokit.benchmark.estimators import _fmt

    table = Table(title=f"Estimators against ground truth ({result['settings']['source']}; nats)")
    for col in ("estimator", "prior", "truth of", "s", "M", "truth", "bias +- SE", "std", "RMSE", "ms", "MB"):
        table.add_column(col, overflow="fold")
    for r in result["rows"]:
        table.add_row(escape(r["estimator"]), r["prior"] if r["quantity"] in ("kl", "cross_entropy") else "-",
                      escape(r["truth_of"]), _fmt(r["overlap"], 2), str(r["M"]), _fmt(r["truth"]),
                      f"{_fmt(r['bias'])} +- {_fmt(r['bias_se'])}", _fmt(r["std"]), _fmt(r["rmse"]),
                      _fmt(r["ms_per_call"], 2), _fmt(r["peak_mb"], 1))
    console().print(table)
    for s in result["skipped"]:
        console().print(escape(f"Skipped {s['estimator']} ({s['prior']}{', M=' + str(s['M']) if 'M' in s else ''}): "
                               f"{s['reason']}"), highlight=False)


def register(benchmark_app: typer.Typer) -> None:
    benchmark_app.command(name="estimators")(handle_errors(estimators))
