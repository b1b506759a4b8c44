"""`elbokit train --mlflow`: the run logged live to a real local MLflow store, read back with
MLflow's own client (params, metric history per epoch, summary metrics, artifacts)."""

from __future__ import annotations

import json
import tomllib

import pytest

mlflow = pytest.importorskip("mlflow")

TRAIN = ["train", "--data", "mixture", "--n", "300", "--hidden", "16", "--batch-size", "64", "--latent-dim", "2", "-q"]


def _artifacts(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out


def test_train_with_mlflow_logs_to_the_default_store_beside_the_runs(tmp_path):
    from elbokit.cli import main
    from elbokit.metrics import flat_summary
    from elbokit.run import read_metrics
    from elbokit.tracking import config_params, default_tracking_uri

    out = tmp_path / "runs" / "live"
    assert main([*TRAIN, "--max-epochs", "3", "--out", str(out), "--name", "first", "--tag", "demo", "--mlflow"]) == 0
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["output"]["mlflow"] is True
    uri = default_tracking_uri(out.parent)
    assert (out.parent / "mlflow.db").is_file() and (out.parent / "mlartifacts").is_dir()
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("elbokit").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.tags["elbokit.tag.demo"] == "1"
    assert run.data.params == config_params(cfg)
    records = read_metrics(out / "metrics.jsonl")
    for name in ("train_loss", "train_loss_kl", "val_neg_elbo"):
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3]
        assert [m.value for m in history] == pytest.approx([r[name] for r in records], rel=1e-12)
    summary = flat_summary(json.loads((out / "summary.json").read_text()))
    assert run.data.metrics["test_elbo"] == pytest.approx(summary["test_elbo"], rel=1e-12)
    artifacts = set(_artifacts(client, run.info.run_id))
    assert {"config.toml", "summary.json", "run.json", "metrics.jsonl", "plots/loss.png"} <= artifacts


def test_mlflow_uri_from_the_config_file_and_a_resume_logs_the_whole_history(tmp_path):
    from elbokit.cli import main
    from elbokit.run import read_metrics

    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'store.db'}"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[output]\nmlflow = "{uri}"\n')
    out = tmp_path / "runs" / "r"
    assert main([*TRAIN, "--config", str(cfg), "--max-epochs", "2", "--out", str(out), "--no-evaluate"]) == 0
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    assert main(["train", "--resume", str(out), "--max-epochs", "4", "-q"]) == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("elbokit").experiment_id], order_by=["start_time ASC"])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert runs[1].data.tags["elbokit.resumed_at_epoch"] == "2"
    records = read_metrics(out / "metrics.jsonl")
    history = sorted(client.get_metric_history(runs[1].info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([r["train_loss"] for r in records], rel=1e-12)


def test_a_bad_mlflow_value_in_the_config_is_one_line_and_nothing_is_written(tmp_path, capsys):
    from elbokit.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text("[output]\nmlflow = 3\n")
    out = tmp_path / "r"
    assert main([*TRAIN, "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "mlflow" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
