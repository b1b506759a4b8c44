"""Finding and comparing run directories: `elbokit runs list [DIR]` and `elbokit runs compare RUN...`.

A run directory is any directory holding a `config.toml` (those of `elbokit train`, and the
cells of a benchmark grid, which are run directories too). Everything here only reads: no
file is written, no lock is taken for longer than a non-blocking probe, and neither torch nor
a checkpoint's tensors are loaded, so listing a directory of many runs is quick.

Status of a run:

- `running`: a live process holds the run directory's lock (RUN_DIR/.lock, the flock the
  run directory takes while it writes; the kernel drops it when the process dies, so a killed
  run is never shown as running);
- `diverged`, `interrupted`, `stopped`: as recorded in run.json's `status` by the training
  loop (`elbokit.train.Trainer._record_status`, through `status_record`) when it stops on a
  divergence, on Ctrl-C/SIGTERM or on another error; it removes the record when the run is
  resumed and when it finishes;
- `finished`: summary.json exists (the loop wrote it at the end);
- `interrupted`: the last checkpoint was saved in the middle of an epoch (Ctrl-C or SIGTERM);
- `stopped`: none of these: the process ended without finishing and without saying why
  (killed, or diverged/interrupted in a version that did not record it).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import ElbokitError
from .metrics import flat_record, flat_summary, summary_columns

STATUSES = ("running", "finished", "stopped", "diverged", "interrupted")
RECORDED_STATUSES = ("finished", "stopped", "diverged", "interrupted")
LOCK_NAME = ".lock"  # elbokit.run.LOCK_NAME (not imported: that module imports torch)


def status_record(status: str, reason: str = "", **extra: Any) -> dict[str, Any]:
    """The `status` entry the training loop puts in run.json when it ends other than by
    finishing: {"status": "diverged", "reason": "<the one-line message>", "epoch": 12}."""
    if status not in RECORDED_STATUSES:
        raise ValueError(f"status must be one of {', '.join(RECORDED_STATUSES)}, got {status!r}")
    return {"status": status, "reason": reason, **extra}


def is_run_dir(path: Path) -> bool:
    return (path / "config.toml").is_file()


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory under `root` (itself included), depth first, sorted by path;
    hidden directories (a run being created is staged in one) are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ElbokitError(f"Runs directory not found: {root}.")
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        path = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("checkpoints", "plots",
                                                                                         "tensorboard"))
        if is_run_dir(path):
            found.append(path)
    return sorted(found)


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """The process writing `run_dir` ({"pid", "host", ...}, or {} if it has not recorded
    itself yet), or None when no live process holds its lock. Probed with a non-blocking
    shared flock on a read-only descriptor, released at once: it succeeds exactly when no
    writer holds the exclusive lock, and it never creates the lock file."""
    import fcntl

    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nothing ever wrote under a lock here
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            return holder if isinstance(holder, dict) else {}
        except OSError:
            return None  # a filesystem without locks: cannot tell, so not shown as running
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ElbokitError(f"Cannot read {path}: {exc}.") from None


def _read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's complete lines (a last line without its newline is being written)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.split("\n")[:-1]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(flat_record(record))
    return records


def _checkpoint_metadata(path: Path) -> dict[str, Any] | None:
    """The elbokit metadata of a checkpoint, read from its safetensors header (no tensors)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            meta = (fh.metadata() or {}).get("elbokit")
        return json.loads(meta) if meta else None
    except Exception:  # noqa: BLE001 - a damaged checkpoint is reported by the commands that load it
        return None


def run_status(run_dir: Path, metadata: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(status, detail) of a run directory; see the module's docstring."""
    holder = lock_holder(run_dir)
    if holder is not None:
        who = f"pid {holder['pid']} on {holder['host']}" if "pid" in holder and "host" in holder else ""
        return "running", who
    recorded = (metadata or {}).get("status")
    if isinstance(recorded, Mapping) and recorded.get("status") in RECORDED_STATUSES:
        return str(recorded["status"]), str(recorded.get("reason", ""))
    if (run_dir / "summary.json").is_file():
        return "finished", ""
    last = _checkpoint_metadata(run_dir / "checkpoints" / "last.safetensors")
    partial = (last or {}).get("partial_epoch")
    if partial:
        return "interrupted", f"at step {partial.get('steps_done')} of epoch {int(last.get('epoch', 0)) + 1}"
    return "stopped", "ended without a summary"


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def run_info(run_dir: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """One run as a flat dict: path, name, tags, status (+ status_detail), terms, prior, data,
    epochs (done) and max_epochs, select_metric and best_val, and every flat summary column
    (`elbokit.metrics.summary_columns`: test_elbo, test_iwae, ... with their _se)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ElbokitError(f"Run directory not found: {run_dir}.")
    if not is_run_dir(run_dir):
        raise ElbokitError(f"{run_dir} is not an elbokit run directory (no config.toml).")
    try:
        cfg = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ElbokitError(f"Cannot read {run_dir / 'config.toml'}: {exc}.") from None
    metadata = _read_json(run_dir / "run.json")
    metadata = metadata if isinstance(metadata, dict) else {}
    summary = _read_json(run_dir / "summary.json")
    records = _read_records(run_dir / "metrics.jsonl")
    status, detail = run_status(run_dir, metadata)
    output = cfg.get("output", {})
    name = output.get("name") or metadata.get("name")
    if not name:
        name = str(run_dir.relative_to(root)) if root is not None and run_dir != Path(root) else run_dir.name
    tags = output.get("tags") or metadata.get("tags") or []
    info: dict[str, Any] = {
        "path": str(run_dir), "name": name, "tags": list(tags), "status": status, "status_detail": detail,
        "terms": cfg.get("objective", {}).get("terms"), "prior": cfg.get("prior", {}).get("name"),
        "data": cfg.get("data", {}).get("dataset"), "latent_dim": cfg.get("model", {}).get("latent_dim"),
        "seed": cfg.get("train", {}).get("seed"), "max_epochs": cfg.get("train", {}).get("max_epochs"),
        "created": metadata.get("created"),
    }
    last = records[-1] if records else {}
    # Every column in every row (None where a run has no summary yet): one schema for --json.
    row = flat_summary(summary) if isinstance(summary, dict) else dict.fromkeys(summary_columns())
    info["epochs"] = row.get("epochs") if row.get("epochs") is not None else last.get("epoch", 0)
    info["select_metric"] = row.get("select_metric") or last.get("select_metric")
    info["best_val"] = row.get("best_val") if row.get("best_val") is not None else last.get("best_val")
    info["best_epoch"] = row.get("best_epoch") if row.get("best_epoch") is not None else last.get("best_epoch")
    for key, value in row.items():
        if key not in info:
            info[key] = _finite(value)
    return info


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    """`run_info` of every run directory under `root`."""
    return [run_info(path, root) for path in find_runs(root)]


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


COMPARED_METRICS = ("status", "epochs", "best_epoch", "select_metric", "best_val", "test_elbo", "test_elbo_se",
                    "test_iwae", "test_iwae_se", "test_exact_loglik", "test_recon", "test_kl", "test_mi",
                    "test_marginal_kl", "test_marginal_kl_se", "test_aggregate_entropy",
                    "test_aggregate_cross_entropy", "test_mse", "test_active_units", "test_latent_r2",
                    "train_seconds")


def compare_runs(run_dirs: Iterable[str | Path]) -> dict[str, Any]:
    """The configs of the runs, differences only ({"section.key": [value per run]}, keys where
    not every run has the same value), and their metrics side by side (COMPARED_METRICS, the
    names of `elbokit.metrics`)."""
    run_dirs = [Path(p) for p in run_dirs]
    if len(run_dirs) < 2:
        raise ElbokitError("Give at least two run directories to compare.")
    infos = [run_info(p) for p in run_dirs]
    flat = [_flatten(tomllib.loads((p / "config.toml").read_text(encoding="utf-8"))) for p in run_dirs]
    keys = sorted(set().union(*flat))
    missing = object()
    differences = {}
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            differences[key] = [None if v is missing else v for v in values]
    differences.pop("output.out", None)  # where each run was written: always different, never a setting
    return {"runs": [i["path"] for i in infos], "names": [i["name"] for i in infos],
            "config_differences": differences,
            "metrics": {key: [i.get(key) for i in infos] for key in COMPARED_METRICS}}
