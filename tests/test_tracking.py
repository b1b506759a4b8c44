"""Runs logged to a real local MLflow store, read back with MLflow's own client."""

from __future__ import annotations

import json
import tomllib

import pytest

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from elbokit.cli import main

    out = tmp_path_factory.mktemp("runs") / "ed"
    assert main(["train", "--terms", "ed", "--data", "mixture", "--n", "300", "--hidden", "16", "--batch-size", "64",
                 "--max-epochs", "3", "--prior", "gmm", "--out", str(out), "-q"]) == 0
    return out


def _artifacts(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out


def test_log_run_writes_params_metric_history_and_artifacts(run_dir):
    from elbokit.metrics import flat_record, flat_summary
    from elbokit.run import read_metrics
    from elbokit.tracking import config_params, default_tracking_uri, log_run

    run_id = log_run(run_dir)
    uri = default_tracking_uri(run_dir.parent)
    assert (run_dir.parent / "mlflow.db").is_file() and uri.endswith("/mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ed"
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    assert run.data.params == config_params(cfg)
    assert run.data.params["objective.terms"] == "ed" and run.data.params["prior.name"] == "gmm"

    records = [flat_record(r) for r in read_metrics(run_dir / "metrics.jsonl")]
    for name in ("train_loss", "train_loss_entropy", "val_neg_elbo", "val_loss"):
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == [r["epoch"] for r in records] == [1, 2, 3]
        assert [m.value for m in history] == pytest.approx([r[name] for r in records], rel=1e-12)
    summary = flat_summary(json.loads((run_dir / "summary.json").read_text()))
    assert run.data.metrics["test_elbo"] == pytest.approx(summary["test_elbo"], rel=1e-12)
    assert run.data.metrics["test_iwae"] == pytest.approx(summary["test_iwae"], rel=1e-12)
    assert run.data.metrics["best_val"] == pytest.approx(summary["best_val"], rel=1e-12)

    artifacts = set(_artifacts(client, run_id))
    assert {"config.toml", "summary.json", "metrics.jsonl", "plots/loss.png", "plots/latents.png"} <= artifacts
    local = client.download_artifacts(run_id, "summary.json", str(run_dir.parent / "downloaded"))
    assert json.loads(open(local).read()) == json.loads((run_dir / "summary.json").read_text())
    assert not (run_dir / "plots").exists()  # figures drawn for the store, the run directory untouched


def test_the_logger_the_training_loop_calls(run_dir, tmp_path):
    """start(cfg), log_metrics(record, step) per epoch, finish(run_dir, status): into a store
    named by URI, one run per logger, two loggers side by side in one process."""
    from elbokit.run import read_metrics
    from elbokit.tracking import MlflowLogger

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    first, second = MlflowLogger(uri, run_name="a"), MlflowLogger(uri, run_name="b")
    first.start(cfg)
    second.start(cfg)
    for record in read_metrics(run_dir / "metrics.jsonl"):
        first.log_metrics(record, step=record["step"])
    first.finish(run_dir, plots=False)
    second.finish(run_dir, "FAILED", plots=False)
    client = mlflow.MlflowClient(tracking_uri=uri)
    a, b = client.get_run(first.run_id), client.get_run(second.run_id)
    assert a.info.status == "FINISHED" and b.info.status == "FAILED"
    steps = [m.step for m in client.get_metric_history(first.run_id, "train_loss")]
    assert sorted(steps) == [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert client.get_metric_history(second.run_id, "train_loss") == []
    with pytest.raises(RuntimeError, match="start"):
        MlflowLogger(uri).log_metrics({"epoch": 1})


def test_runs_mlflow_command_logs_to_the_named_store(run_dir, run_cli, tmp_path):
    uri = f"sqlite:///{tmp_path / 'cli.db'}"
    res = run_cli("runs", "mlflow", run_dir, "--tracking-uri", uri, "--json")
    assert res.exit_code == 0, res.stderr
    (logged,) = json.loads(res.stdout)
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(logged["run_id"])
    assert run.data.params["objective.terms"] == "ed" and "test_elbo" in run.data.metrics
    res = run_cli("runs", "mlflow", tmp_path, "--tracking-uri", uri)
    assert res.exit_code == 2 and "not an elbokit run directory" in res.stderr
