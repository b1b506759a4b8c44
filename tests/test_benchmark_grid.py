"""`elbokit benchmark grid`: cells are ordinary run directories; the summary is the per-cell
numbers aggregated; a re-invoked grid redoes nothing; extending runs only the new cells; a cell
that fails or diverges is a row; Ray gives the local executor's numbers; a driver SIGKILLed at
random moments and re-invoked ends with the uninterrupted run's results."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from elbokit.benchmark.grid import METRICS, parse_seeds
from elbokit.errors import ElbokitError

# 12 tiny cells: 3 term lists x 4 seeds on dataset 1 (240 training rows, 3 steps per epoch).
TERMS = ["--terms", "classic", "--terms", "ed", "--terms", "recon,kl:0.5"]
FIXED = ["--data", "gaussian", "--n", "300", "--hidden", "16,16", "--batch-size", "64", "--max-epochs", "3",
         "--checkpoint-seconds", "0"]
METRIC_COLUMNS = [m for m, _, _ in METRICS]


def grid_args(out: Path, *extra: str, terms=TERMS, seeds="0-3") -> list[str]:
    return ["benchmark", "grid", *terms, *FIXED, "--seeds", seeds, "--out", str(out), *extra]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def cli(*args: str) -> int:
    from elbokit.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The 12-cell grid, run once without interruption with two local processes."""
    out = tmp_path_factory.mktemp("grid") / "reference"
    assert cli(*grid_args(out, "--jobs", "2", "--quiet")) == 0
    return out


def fingerprint(grid: Path) -> dict[str, tuple[int, str]]:
    """mtime and sha256 of every file a cell writes (results, checkpoints, metrics, summaries)."""
    files = [*grid.glob("cells/*.result.json"), *grid.glob("runs/*/checkpoints/*.safetensors"),
             *grid.glob("runs/*/metrics.jsonl"), *grid.glob("runs/*/summary.json")]
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def test_seeds_syntax():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3,1,1-2") == [1, 2, 3]
    assert parse_seeds([5, 2]) == [2, 5]
    for bad in ("4-0", "a", "", "1.5"):
        with pytest.raises(ElbokitError):
            parse_seeds(bad)


def test_a_tiny_grid_runs_end_to_end_and_the_summary_is_the_cells_aggregated(reference, run_cli):
    rows = read_csv(reference / "results.csv")
    assert len(rows) == 12 and len({r["cell"] for r in rows}) == 12
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows), rows
    assert {r["terms"] for r in rows} == {"classic", "ed", "recon+kl0.5"}

    # Every cell is an ordinary run directory: `elbokit evaluate` on it gives the row's numbers.
    cell = reference / "runs" / rows[5]["cell"]
    report = json.loads(run_cli("evaluate", cell, "--json").stdout)
    for key in ("elbo", "iwae", "kl", "marginal_kl", "exact_loglik"):
        assert math.isclose(report[key], float(rows[5][key]), rel_tol=1e-12), key

    # summary.csv: mean, sd (n - 1) and count over seeds, from the per-cell result files.
    per_cell = {p.name.removesuffix(".result.json"): json.loads(p.read_text())
                for p in (reference / "cells").glob("*.result.json")}
    summary = {r["configuration"]: r for r in read_csv(reference / "summary.csv")}
    assert len(summary) == 3
    for configuration, srow in summary.items():
        members = [r for name, r in per_cell.items() if name.startswith(configuration + "-s")]
        assert len(members) == 4 and srow["ok"] == "4"
        for key in ("elbo", "iwae", "recon", "kl", "mi", "marginal_kl", "latent_r2", "paper_elbo"):
            values = np.array([m["metrics"][key] for m in members])
            assert float(srow[f"{key}_mean"]) == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
            assert float(srow[f"{key}_std"]) == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-12)
            assert srow[f"{key}_count"] == "4"
        epochs = [m["cost"]["epochs"] for m in members]
        assert float(srow["epochs_mean"]) == np.mean(epochs) == 3
        assert all(m["cost"]["peak_rss_mb"] > 50 for m in members)
    data = json.loads((reference / "summary.json").read_text())
    assert data["ok"] == 12 and data["failed"] == 0 and data["unfinished"] == 0
    md = (reference / "summary.md").read_text()
    assert all(c in md for c in summary)
    for png in ("metrics.png", "speed_vs_iwae.png"):
        assert (reference / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The thread count is a setting of the cell, recorded in its run's config.
    assert {r["threads"] for r in rows} == {"1"}


def test_a_second_invocation_redoes_no_cell(reference, run_cli):
    before = fingerprint(reference)
    csv_before = (reference / "results.csv").read_text()
    assert len(before) == 12 * 5
    res = run_cli(*grid_args(reference, "--jobs", "2", "--json"))
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["ran"] == []
    assert fingerprint(reference) == before
    assert (reference / "results.csv").read_text() == csv_before


def test_changing_a_shared_setting_is_refused_naming_it(reference, run_cli):
    index = (reference / "grid.json").read_bytes()
    res = run_cli(*grid_args(reference, "--max-epochs", "4"))
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: train.max_epochs is 3 in the existing grid"), res.stderr
    assert (reference / "grid.json").read_bytes() == index
    assert not list(reference.glob("runs/*-s4"))


def test_print_grid_shows_the_cells_and_writes_nothing(tmp_path, run_cli):
    res = run_cli(*grid_args(tmp_path / "g", "--print-grid", "--json"))
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)
    assert len(plan["cells"]) == 12 and plan["estimate"]["cells_to_run"] == 12
    assert plan["estimate"]["upper_bound_seconds"] > 0
    assert not (tmp_path / "g").exists()


def test_extending_by_a_seed_runs_only_the_new_cell(tmp_path, reference, run_cli):
    out = tmp_path / "grid"
    assert run_cli(*grid_args(out, "--quiet", terms=["--terms", "classic"], seeds="0")).exit_code == 0
    before = fingerprint(out)
    res = run_cli(*grid_args(out, "--json", terms=["--terms", "classic"], seeds="0-1"))
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["ran"] == ["gaussian-classic-standard-normal-s1"]
    after = fingerprint(out)
    assert {k: v for k, v in after.items() if k in before} == before
    rows = {r["cell"]: r for r in read_csv(out / "results.csv")}
    assert list(rows) == ["gaussian-classic-standard-normal-s0", "gaussian-classic-standard-normal-s1"]
    # The same cell gives the same numbers in another grid (the cell's process is all that counts).
    ref = {r["cell"]: r for r in read_csv(reference / "results.csv")}
    for name, row in rows.items():
        assert [row[c] for c in METRIC_COLUMNS] == [ref[name][c] for c in METRIC_COLUMNS]


def test_a_cell_that_raises_or_diverges_is_a_row_and_the_others_finish(tmp_path, run_cli):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text("""
terms = "classic"
data = "gaussian"
seeds = "0"

[fixed.data]
n = 300
[fixed.model]
hidden = [16]
[fixed.train]
batch_size = 64
max_epochs = 2

[[variant]]
label = "fine"

[[variant]]
label = "raises"
terms = {kl = {estimator = "no-such-estimator"}}

[[variant]]
label = "diverges"
train = {lr = 1e5}
""")
    res = run_cli("benchmark", "grid", grid_file, "--out", tmp_path / "out", "--jobs", "2", "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["cells"] == 3 and summary["ok"] == 1 and summary["failed"] == 2
    rows = {r["variant"]: r for r in read_csv(tmp_path / "out" / "results.csv")}
    assert rows["fine"]["status"] == "ok" and float(rows["fine"]["iwae"]) < 0
    assert rows["raises"]["status"] == "failed" and "no-such-estimator" in rows["raises"]["error"]
    assert rows["raises"]["elbo"] == ""
    assert rows["diverges"]["status"] == "diverged"
    assert rows["diverges"]["error"].startswith("Training diverged: ")
    assert "raises-gaussian-classic-standard-normal-s0" in (tmp_path / "out" / "summary.md").read_text()
    # The cells' run directories read the same in `elbokit runs list` (the one that raised
    # was refused before its run directory was created).
    listed = json.loads(run_cli("runs", "list", tmp_path / "out", "--json").stdout)
    status = {r["path"].split("/")[-1].split("-")[0]: r for r in listed}
    assert set(status) == {"fine", "diverges"}
    assert status["fine"]["status"] == "finished"
    assert status["diverges"]["status"] == "diverged"
    assert status["diverges"]["status_detail"] == rows["diverges"]["error"]


def test_ray_executor_gives_the_local_numbers(tmp_path, reference, run_cli):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = run_cli(*grid_args(tmp_path / "ray", "--executor", "ray", "--json",
                                 terms=["--terms", "classic", "--terms", "ed"], seeds="0-1"))
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.stderr
    assert len(json.loads(res.stdout)["ran"]) == 4
    local = {r["cell"]: r for r in read_csv(reference / "results.csv")}
    rows = read_csv(tmp_path / "ray" / "results.csv")
    assert len(rows) == 4
    for row in rows:
        assert row["status"] == "ok"
        assert [row[c] for c in METRIC_COLUMNS] == [local[row["cell"]][c] for c in METRIC_COLUMNS], row["cell"]


def test_ray_missing_says_how_to_install_it(tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    res = run_cli(*grid_args(tmp_path / "g", "--executor", "ray"))
    assert res.exit_code == 2
    assert res.stderr.strip() == ('Error: --executor ray needs Ray, which is not installed: pip install "elbokit[ray]" '
                                  "(or pip install ray).")
    assert not (tmp_path / "g").exists()


def test_a_driver_killed_at_random_moments_ends_with_the_uninterrupted_results(tmp_path, reference):
    """SIGKILL the driver three times at random moments, re-invoke it until it reports done:
    results.csv equals the uninterrupted run's cell by cell, every epoch is recorded once, and
    no cell process outlives its driver (they get SIGTERM when it dies and save a checkpoint;
    a re-invoked driver would wait for a cell's lock)."""
    out = tmp_path / "chaos"
    cmd = [sys.executable, "-m", "elbokit.cli", *grid_args(out, "--jobs", "2", "--quiet")]
    rng = random.Random(20240513)
    kills = 0
    while kills < 3:
        driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while driver.poll() is None and not (out / "grid.json").is_file():
            time.sleep(0.05)  # the driver is importing; the moments that count come after
        time.sleep(rng.uniform(0.5, 4.0))
        if driver.poll() is not None:
            break  # it finished first (a fast machine): the kills so far are the test
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        kills += 1
    assert kills >= 1
    for _ in range(4):
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stderr.decode()

    rows, ref = read_csv(out / "results.csv"), read_csv(reference / "results.csv")
    assert [r["cell"] for r in rows] == [r["cell"] for r in ref]
    for row, expected in zip(rows, ref):
        assert row["status"] == "ok", row
        assert [row[c] for c in METRIC_COLUMNS] == [expected[c] for c in METRIC_COLUMNS], row["cell"]
        run = out / "runs" / row["cell"]
        epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2, 3]
        assert json.loads((run / "summary.json").read_text())["steps"] == 3 * (240 // 64)
    for lock in (out / "cells").glob("*.lock"):  # no cell process left holding its lock
        with open(lock) as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_presets_resolve_to_the_papers_settings(tmp_path, run_cli):
    res = run_cli("benchmark", "grid", "--preset", "table2", "--print-grid", "--json", "--out", tmp_path / "t")
    plan = json.loads(res.stdout)
    assert len(plan["cells"]) == 2 * 2 * 2 * 5
    cfg = plan["cells"][0]["config"]
    assert (cfg["data"]["n"], cfg["data"]["data_dim"], cfg["model"]["latent_dim"], cfg["model"]["options"]["hidden"]) == (10000, 20, 5, [400, 400])
    assert (cfg["train"]["max_epochs"], cfg["train"]["batch_size"], cfg["train"]["lr"]) == (1000, 512, 0.001)
    quick = json.loads(run_cli("benchmark", "grid", "--preset", "choices", "--quick", "--print-grid", "--json",
                               "--out", tmp_path / "c").stdout)
    full = json.loads(run_cli("benchmark", "grid", "--preset", "choices", "--print-grid", "--json",
                              "--out", tmp_path / "c").stdout)
    assert len(full["cells"]) == 8 * 3 and len(quick["cells"]) == 8 * 2
    assert {c["variant"] for c in quick["cells"]} == {c["variant"] for c in full["cells"]}
    assert quick["cells"][0]["config"]["data"]["n"] == 2000 and quick["cells"][0]["config"]["train"]["max_epochs"] == 30
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()


def test_the_grid_file_of_the_docs_resolves_as_documented(tmp_path, run_cli):
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "grids.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.DOTALL).group(1)
    (tmp_path / "grid.toml").write_text(block)
    res = run_cli("benchmark", "grid", tmp_path / "grid.toml", "--out", tmp_path / "out", "--print-grid", "--json")
    assert res.exit_code == 0, res.stderr
    cells = json.loads(res.stdout)["cells"]
    assert len(cells) == 2 * 2 * 2 * 5  # variants x data x priors x seeds
    by_name = {c["name"]: c["config"] for c in cells}
    mss = by_name["mss-mixture-ed-gmm5-s4"]
    assert mss["terms"]["entropy"]["estimator"] == "mss"
    assert mss["prior"] == {**mss["prior"], "name": "gmm", "options": {"n_components": 5}}
    assert mss["train"]["max_epochs"] == 200 and mss["train"]["seed"] == 4
    assert "entropy" not in by_name["mws-my_data-ed-standard-normal-s0"]["terms"]
    assert by_name["mws-my_data-ed-standard-normal-s0"]["data"]["dataset"] == "data/my_data.npz"
