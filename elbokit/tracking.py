"""Log runs to MLflow (optional: `pip install "elbokit[mlflow]"`).

    from elbokit.tracking import log_run
    log_run("runs/ed-gmm")                 # into sqlite:///runs/mlflow.db; then: mlflow ui --backend-store-uri sqlite:///runs/mlflow.db

A run directory becomes one MLflow run: the resolved config as parameters (`section.key`), every
per-epoch record of metrics.jsonl as metrics at step = epoch (names from `elbokit.metrics`:
train_loss, train_loss_<term>, val_neg_elbo, ...), the summary's flat columns (best_val,
test_elbo, test_iwae, ...) as metrics, and summary.json, config.toml, run.json, metrics.jsonl
and the figures of `elbokit plot` as artifacts. The default store is a local SQLite file beside
the runs, `sqlite:///<runs dir>/mlflow.db` (artifacts in `<runs dir>/mlartifacts`), so `mlflow ui`
shows them with no server.

`MlflowLogger` does the same while a run trains: `start(cfg)` when the run directory is
created, `log_metrics(record, step)` after each epoch's record, `finish(run_dir)` at the end.
It talks to the store through `mlflow.MlflowClient` (no global active run), so one process may
log several runs, one after the other or side by side.
"""

from __future__ import annotations

import math
import tempfile
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ElbokitError
from .metrics import flat_record, flat_summary

DEFAULT_EXPERIMENT = "elbokit"
STORE_NAME = "mlflow.db"
PARAM_MAX = 6000  # MLflow refuses longer parameter values (mlflow.utils.validation)
RUN_FILES = ("config.toml", "summary.json", "run.json", "metrics.jsonl")


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise ElbokitError('MLflow logging needs the optional mlflow package: pip install "elbokit[mlflow]" '
                           "(or pip install mlflow).") from None
    return mlflow


def default_tracking_uri(runs_dir: str | Path = "runs") -> str:
    """`sqlite:///<absolute runs dir>/mlflow.db`: a local store `mlflow ui` reads directly."""
    return f"sqlite:///{(Path(runs_dir).resolve() / STORE_NAME).as_posix()}"


def config_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The config flattened to `section.key` -> string (MLflow parameters are strings)."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(config_params(value, name + "."))
        else:
            out[name] = str(value)[:PARAM_MAX]
    return out


def _numeric(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a flat record (flags, names and missing values are not metrics)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class MlflowLogger:
    """Log one training run to MLflow as it goes. The training loop calls `start(cfg)` once
    (after the run directory exists), `log_metrics(record, step)` with each per-epoch record
    (the loop's nested record or a flat one; names become those of `elbokit.metrics`) and
    `finish(run_dir, status)` at the end, also after a divergence or an interruption."""

    def __init__(self, tracking_uri: str | None = None, *, runs_dir: str | Path = "runs",
                 experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None):
        mlflow = _mlflow()
        self.tracking_uri = tracking_uri or default_tracking_uri(runs_dir)
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self.run_id: str | None = None

    def start(self, cfg: Mapping[str, Any]) -> str:
        """Create the MLflow run and log the resolved config as its parameters; its run id."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            experiment_id = exp.experiment_id
        else:
            # A local SQLite store keeps its artifacts beside it (RUNS/mlartifacts), not in
            # ./mlruns under whatever directory the process was started from.
            location = None
            if self.tracking_uri.startswith("sqlite:///"):
                location = (Path(self.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in config_params(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        return self.run_id

    def log_metrics(self, record: Mapping[str, Any], step: int | None = None) -> None:
        """Every number of one per-epoch record, at `step` (default: its epoch)."""
        from mlflow.entities import Metric

        self._check_started()
        flat = flat_record(record)
        step = int(step if step is not None else flat.get("epoch", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in _numeric(flat).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, run_dir: str | Path, status: str = "FINISHED", *, plots: bool = True) -> None:
        """Log the summary's columns as metrics and the run's files and figures as artifacts,
        then end the MLflow run with `status` (FINISHED, FAILED or KILLED)."""
        import json

        from mlflow.entities import Metric

        self._check_started()
        run_dir = Path(run_dir)
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            row = _numeric(flat_summary(json.loads(summary_path.read_text(encoding="utf-8"))))
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in row.items()])
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if plots:
            self._log_plots(run_dir)
        self.client.set_terminated(self.run_id, status)

    def _log_plots(self, run_dir: Path) -> None:
        """The run's figures under artifacts/plots: RUN_DIR/plots when it has them, else drawn
        now into a temporary directory (the run directory is not written)."""
        existing = run_dir / "plots"
        if existing.is_dir() and any(existing.iterdir()):
            self.client.log_artifacts(self.run_id, str(existing), artifact_path="plots")
            return
        if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").stat().st_size:
            return  # nothing trained yet: no figure to draw
        from .plot import plot_run

        with tempfile.TemporaryDirectory() as tmp:
            plot_run(run_dir, "best" if (run_dir / "checkpoints" / "best.safetensors").is_file() else "last",
                     out=Path(tmp) / "plots")
            self.client.log_artifacts(self.run_id, str(Path(tmp) / "plots"), artifact_path="plots")

    def _check_started(self) -> None:
        if self.run_id is None:
            raise RuntimeError("MlflowLogger.start(cfg) must be called first")


_STATUS = {"finished": "FINISHED", "running": "RUNNING", "diverged": "FAILED", "interrupted": "KILLED",
           "stopped": "KILLED"}


def log_run(run_dir: str | Path, tracking_uri: str | None = None, *, experiment: str = DEFAULT_EXPERIMENT,
            plots: bool = True) -> str:
    """Log a run directory (finished or not) to MLflow; return the MLflow run id. The store is
    `tracking_uri`, by default `sqlite:///<the run directory's parent>/mlflow.db`."""
    from .runs import run_info

    run_dir = Path(run_dir)
    info = run_info(run_dir)  # one clear line when it is not a run directory
    cfg = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    from .run import read_metrics

    tags = {"elbokit.run_dir": str(run_dir.resolve()), "elbokit.status": info["status"]}
    tags.update({f"elbokit.tag.{t}": "1" for t in info["tags"]})
    logger = MlflowLogger(tracking_uri, runs_dir=run_dir.resolve().parent, experiment=experiment,
                          run_name=str(info["name"]), tags=tags)
    logger.start(cfg)
    for record in read_metrics(run_dir / "metrics.jsonl"):
        logger.log_metrics(record)
    logger.finish(run_dir, _STATUS.get(info["status"], "FINISHED"), plots=plots)
    return logger.run_id
