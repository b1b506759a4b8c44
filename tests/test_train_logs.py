"""`elbokit train` outside a terminal: one plain line per epoch on stderr (throttled), stdout
left to --json; --name and --tag recorded in config.toml and run.json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# 240 training rows in 3 batches of 80: no rows are left out, so stderr holds no note before the lines.
FAST = ["--n", "300", "--hidden", "16", "--batch-size", "80", "--no-evaluate"]
LINE = re.compile(r"^epoch (\d+)/(\d+)  step (\d+)  train_loss \S+  train_loss_recon \S+  train_loss_kl \S+  "
                  r"val_loss \S+  val_neg_elbo (\S+)  best \S+ @ \d+  lr \S+  (\S+) steps/s  elapsed \d+:\d\d:\d\d  "
                  r"ETA \d+:\d\d:\d\d$")


def _train_through_pipes(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "elbokit.cli", "train", *FAST, *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=600)


def test_a_pipe_gets_one_line_per_epoch_on_stderr_and_json_on_stdout(tmp_path):
    out = tmp_path / "run"
    proc = _train_through_pipes("--max-epochs", "3", "--log-seconds", "0", "--json", "--out", out)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # stdout is exactly the summary
    assert summary["epochs"] == 3
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"Training into {out}")
    matches = [LINE.match(line) for line in lines[1:]]
    assert all(matches), lines
    assert [int(m[1]) for m in matches] == [1, 2, 3] and {int(m[2]) for m in matches} == {3}
    assert [int(m[3]) for m in matches] == [3, 6, 9] and all(float(m[5]) > 0 for m in matches)
    # The numbers on the line are the ones stored in metrics.jsonl, under the same names.
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [float(m[4]) for m in matches] == [float(f"{r['val_neg_elbo']:.4g}") for r in rows]


def test_short_epochs_are_throttled_and_the_last_one_is_always_printed(tmp_path):
    proc = _train_through_pipes("--max-epochs", "4", "--log-seconds", "3600", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    epochs = [int(m[1]) for m in map(LINE.match, proc.stderr.splitlines()) if m]
    assert epochs == [1, 4]
    # Patience stops before max_epochs: the last trained epoch is still printed, at the end.
    proc = _train_through_pipes("--max-epochs", "50", "--patience", "1", "--lr", "0.5", "--log-seconds", "3600",
                                "--out", tmp_path / "stopped")
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["stopped_by"] == "patience" and summary["epochs"] < 50
    epochs = [int(m[1]) for m in map(LINE.match, proc.stderr.splitlines()) if m]
    assert epochs == [1, summary["epochs"]]


def test_name_and_tags_are_recorded_and_may_change_on_resume(tmp_path, run_cli):
    out = tmp_path / "run"
    res = run_cli("train", *FAST, "--max-epochs", "1", "-q", "--out", out, "--name", "baseline",
                  "--tag", "gmm", "--tag", "seed0", "--tag", "gmm")
    assert res.exit_code == 0, res.stderr
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["output"]["name"] == "baseline" and cfg["output"]["tags"] == ["gmm", "seed0"]
    meta = json.loads((out / "run.json").read_text())
    assert meta["name"] == "baseline" and meta["tags"] == ["gmm", "seed0"]
    res = run_cli("train", "--resume", out, "--max-epochs", "2", "-q", "--tag", "longer")
    assert res.exit_code == 0, res.stderr
    assert tomllib.loads((out / "config.toml").read_text())["output"]["tags"] == ["longer"]


def test_bad_log_seconds_and_tags_are_one_line(tmp_path, run_cli):
    res = run_cli("train", *FAST, "--log-seconds", "-1", "--out", tmp_path / "a")
    assert res.exit_code == 2 and res.stderr.startswith("Error: --log-seconds") and not (tmp_path / "a").exists()
    (tmp_path / "c.toml").write_text("[output]\ntags = [1]\n")
    res = run_cli("train", "--config", tmp_path / "c.toml", *FAST, "--out", tmp_path / "b")
    assert res.exit_code == 2 and "output.tags (--tag) must be a list" in res.stderr
    assert len(res.stderr.splitlines()) == 1
