"""`torchrun --nproc-per-node 2 -m elbokit train` (gloo, CPU, loopback): one run directory
written by process 0, world size 2 in the summary and run.json; a SIGTERM to one process stops
both at the same step with an exact checkpoint, and resuming on 2 processes ends where the
uninterrupted run ends, bit for bit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# n=600: 480 training rows, 8 steps of 60 per epoch (30 per process).
CONFIG = """
[data]
n = 600
[model]
hidden = [32]
[objective]
terms = "ed"
[train]
batch_size = 60
max_epochs = 3
patience = 100
"""
STOP_AT_STEP = 11  # process 1 gets SIGTERM after its 11th step: epoch 2, 3 steps done


def torchrun(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ELBOKIT_DISABLE_PLUGINS": "1", **(env_extra or {}),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], env=env, capture_output=True, text=True, timeout=300)


# Process 1 alone signals itself (the test-only crash hook of elbokit.io) after a given step.
LAUNCHER = """
import os
if os.environ["RANK"] == "1":
    os.environ["ELBOKIT_TEST_CRASH_AT"] = "step:train:{step}:TERM"
from elbokit.cli import console_main
console_main()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    config = root / "config.toml"
    config.write_text(CONFIG)
    launcher = root / "launcher.py"
    launcher.write_text(LAUNCHER.format(step=STOP_AT_STEP))
    whole = torchrun("-m", "elbokit", "train", "--config", str(config), "--out", str(root / "whole"), "--json")
    stopped = torchrun(str(launcher), "train", "--config", str(config), "--out", str(root / "stopped"))
    checkpoint_at_stop = _checkpoint_meta(root / "stopped")
    shutil.copytree(root / "stopped", root / "stopped-copy")  # resumed on one process below
    resumed = torchrun("-m", "elbokit", "train", "--resume", str(root / "stopped"), "--no-evaluate")
    return {"root": root, "whole": whole, "stopped": stopped, "resumed": resumed, "at_stop": checkpoint_at_stop}


def _checkpoint_meta(run_dir: Path) -> dict:
    from elbokit.run import read_checkpoint

    return read_checkpoint(run_dir / "checkpoints" / "last.safetensors")[1]


def test_two_processes_write_one_run_directory_recording_world_size_2(runs):
    whole = runs["whole"]
    assert whole.returncode == 0, whole.stderr[-3000:]
    summary = json.loads(whole.stdout)  # process 0 alone prints it
    run_dir = runs["root"] / "whole"
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 3 and summary["steps"] == 3 * 8
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    assert "test" in summary and summary["test"]["iwae"] >= summary["test"]["elbo"]  # evaluated on process 0
    assert [r["epoch"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]
    # one directory per run (no second one, no staging directory left by another process)
    assert sorted(p.name for p in runs["root"].iterdir()) == ["config.toml", "launcher.py", "stopped", "stopped-copy", "whole"]


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(runs):
    stopped = runs["stopped"]
    assert stopped.returncode != 0  # torchrun reports the stopped workers as failed
    # Process 0 (not signalled) says where the run stopped, once; process 1 prints nothing.
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("Interrupted:")]
    assert lines == [f"Interrupted: the run is saved at step {STOP_AT_STEP - 8} of epoch 2 (resuming finishes "
                     f"that epoch exactly) in {runs['root'] / 'stopped'}; resume with: torchrun --nproc-per-node 2 -m "
                     f"elbokit train --resume {runs['root'] / 'stopped'}"]
    # torchrun lists the workers it saw fail (one or both, by timing) with 143, the code of a
    # one-process run stopped by SIGTERM; a process still exiting when torchrun sends SIGTERM to
    # the rest may show -15. None fails with a traceback's 1.
    codes = re.findall(r"exitcode\s+: (-?\d+) \(pid", stopped.stderr)
    assert "143" in codes and set(codes) <= {"143", "-15"}, codes
    assert not re.search(r"\[rank\d\]: Traceback", stopped.stderr)  # torchrun's own report aside
    meta = runs["at_stop"]
    assert meta["epoch"] == 1 and meta["partial_epoch"]["steps_done"] == STOP_AT_STEP - 8
    assert meta["world_size"] == 2


def test_resuming_on_two_processes_is_exact(runs):
    from elbokit.run import read_checkpoint

    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]
    a, meta_a = read_checkpoint(runs["root"] / "whole" / "checkpoints" / "last.safetensors")
    b, meta_b = read_checkpoint(runs["root"] / "stopped" / "checkpoints" / "last.safetensors")
    assert meta_a["epoch"] == meta_b["epoch"] == 3
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # parameters, optimiser, every process's random state
    metrics = [[json.loads(line) for line in (runs["root"] / d / "metrics.jsonl").read_text().splitlines()]
               for d in ("whole", "stopped")]
    assert len(metrics[0]) == len(metrics[1]) == 3
    for ra, rb in zip(*metrics):  # every number of every epoch but the wall-clock time
        ra.pop("seconds"), rb.pop("seconds")
        assert ra == rb


def test_resuming_on_one_process_continues_and_says_it_is_not_bit_exact(runs, run_cli):
    run_dir = runs["root"] / "stopped-copy"
    result = run_cli("train", "--resume", str(run_dir), "--no-evaluate", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 3 and summary["world_size"] == 1
    assert any("resumed on 1 process from a checkpoint written by 2" in note for note in summary["notes"])
    whole = json.loads((runs["root"] / "whole" / "summary.json").read_text())
    # the same objective and batches: close to the 2-process run, not equal
    assert summary["best_val"] == pytest.approx(whole["best_val"], rel=0.05)


def test_a_global_batch_that_does_not_split_evenly_is_one_line_and_writes_nothing(run_cli, tmp_path, monkeypatch):
    # As torchrun would start 3 processes; refused before joining any process group.
    monkeypatch.setenv("WORLD_SIZE", "3")
    result = run_cli("train", "--batch-size", "64", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: The batch size 64 is the global batch and must split evenly across the 3 processes; "
        "give a multiple of 3, e.g. --batch-size 63."]
    assert not (tmp_path / "run").exists()


def test_a_divergence_on_two_processes_stops_both_and_keeps_the_last_good_checkpoint(runs, tmp_path):
    """A learning rate of 1e5 from epoch 4 on overflows the first update: both processes stop
    at the same step, process 0 says so in one line, nothing of the diverged epoch is saved and
    run.json records it; no process ends with a traceback or waits for the other."""
    from elbokit.run import read_checkpoint

    run_dir = tmp_path / "diverging"
    shutil.copytree(runs["root"] / "whole", run_dir)
    result = torchrun("-m", "elbokit", "train", "--resume", str(run_dir), "--max-epochs", "5", "--lr", "1e5",
                      "--no-evaluate")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "Training diverged" in line]
    assert len(lines) == 1 and lines[0].startswith("Error: Training diverged: "), result.stderr[-3000:]
    assert "(epoch 4)" in lines[0] and "checkpoint (epoch 3)" in lines[0]
    # The command it suggests resumes on as many processes (the exact resume needs them).
    assert f"torchrun --nproc-per-node 2 -m elbokit train --resume {run_dir} --lr 10000 --grad-clip 1" in lines[0]
    codes = re.findall(r"exitcode\s+: (-?\d+) \(pid", result.stderr)
    assert "3" in codes and set(codes) <= {"3", "-15"}, codes  # 3: diverged, as on one process
    assert not re.search(r"\[rank\d\]: Traceback", result.stderr)
    kept, meta = read_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    good, _ = read_checkpoint(runs["root"] / "whole" / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == 3 and kept.keys() == good.keys()
    assert all(torch.equal(kept[name], good[name]) for name in good)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    status = json.loads((run_dir / "run.json").read_text())["status"]
    assert status["status"] == "diverged" and status["epoch"] == 4 and status["kept_epoch"] == 3
