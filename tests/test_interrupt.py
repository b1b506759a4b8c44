"""A run stopped at any moment loses nothing: SIGKILL (even half-way through a checkpoint
write) leaves the last complete checkpoint loadable, and resuming ends with exactly the numbers
and tensors of an uninterrupted run; SIGINT/SIGTERM save the exact position in the epoch.

The kills are real: `elbokit train` runs as a subprocess and the test-only hook
ELBOKIT_TEST_CRASH_AT (elbokit/io.py) makes it SIGKILL itself at a named point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ARGS = ["train", "--terms", "ed", "--n", "300", "--hidden", "16", "--batch-size", "64", "--max-epochs", "4",
        "--patience", "50", "--no-evaluate", "-q", "--checkpoint-seconds", "0"]  # every epoch, for the kill points
STEPS_PER_EPOCH = 240 // 64  # 300 rows: 240 for training

# (crash point, the epoch of checkpoints/last after the kill; None: killed while the run
# directory was being created, so there is no run directory at all)
KILL_POINTS = [
    ("mid-write:last.safetensors:1", None),      # the initial checkpoint, before the directory exists
    ("before-replace:best.safetensors:1", 0),    # epoch 1's best fsynced but not renamed
    ("after-replace:last.safetensors:2", 1),     # epoch 1's last renamed, directory not fsynced
    ("mid-write:last.safetensors:3", 1),         # half of epoch 2's last written
    ("mid-line:metrics.jsonl:3", 2),             # half of epoch 3's metrics line written
    ("after-line:metrics.jsonl:3", 2),           # epoch 3's metrics written, its checkpoints not
    (f"step:train:{2 * STEPS_PER_EPOCH + 2}", 2),  # in the middle of epoch 3
]


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")  # wall-clock time is the only thing allowed to differ
    return rows


def tensors(run_dir, which):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoints" / f"{which}.safetensors"))


def assert_same_run(run_dir, reference):
    assert metrics(run_dir) == metrics(reference)
    for which in ("best", "last"):
        a, b = tensors(run_dir, which), tensors(reference, which)
        assert a.keys() == b.keys(), which
        assert all(np.array_equal(a[k], b[k]) for k in a), which


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in-process)."""
    from elbokit.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """One subprocess per kill point, all started at once (each pays for importing torch)."""
    root = tmp_path_factory.mktemp("killed")
    procs = {}
    for i, (point, _) in enumerate(KILL_POINTS):
        parent = root / str(i)
        parent.mkdir()
        env = {**os.environ, "ELBOKIT_TEST_CRASH_AT": point, "ELBOKIT_DISABLE_PLUGINS": "1"}
        procs[point] = (parent / "run", subprocess.Popen(
            [sys.executable, "-c", "from elbokit.cli import console_main; console_main()", *ARGS,
             "--out", str(parent / "run")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {}
    for point, (out, proc) in procs.items():
        _, err = proc.communicate(timeout=600)  # a hang guard only: 7 processes at once on a loaded machine
        results[point] = (out, proc.returncode, err.decode())
    return results


@pytest.mark.parametrize("point, last_epoch", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_sigkill_then_resume_equals_an_uninterrupted_run(killed, reference, run_cli, point, last_epoch):
    from elbokit.run import read_checkpoint

    out, code, err = killed[point]
    assert code == -9, (code, err)  # it really was killed, at that point
    if last_epoch is None:
        # Killed while the run directory was being made: it does not exist (a hidden staging
        # directory is left beside it), so the same command simply runs again.
        assert not out.exists()
        assert [p.name.startswith(".run.") and p.name.endswith(".tmp") for p in out.parent.iterdir()] == [True]
        res = run_cli(*ARGS, "--out", out)
    else:
        _, meta = read_checkpoint(out / "checkpoints" / "last.safetensors")  # loadable (CRC checked)
        assert meta["epoch"] == last_epoch and "partial_epoch" not in meta
        last = tensors(out, "last")
        assert all(np.isfinite(v).all() for k, v in last.items() if k.startswith("model."))
        res = run_cli("train", "--resume", out, "-q")
    assert res.exit_code == 0, res.stderr
    assert_same_run(out, reference)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # strays removed


@pytest.mark.parametrize("signal_name, code", [("INT", 130), ("TERM", 143)])
def test_a_signal_saves_the_position_in_the_epoch_and_resuming_is_exact(
        tmp_path, reference, run_cli, monkeypatch, signal_name, code):
    from elbokit import io
    from elbokit.run import read_checkpoint

    out = tmp_path / "run"
    stop_at = STEPS_PER_EPOCH + 2  # the signal arrives during step 2 of epoch 2
    monkeypatch.setattr(io, "_crash_counts", {})
    monkeypatch.setenv(io.CRASH_ENV, f"step:train:{stop_at}:{signal_name}")
    res = run_cli(*ARGS, "--out", out)
    assert res.exit_code == code
    assert res.stderr.strip().splitlines() == [
        f"Interrupted: the run is saved at step 2 of epoch 2 (resuming finishes that epoch exactly) in {out}; "
        f"resume with: elbokit train --resume {out}"]
    _, meta = read_checkpoint(out / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == 1 and meta["partial_epoch"]["steps_done"] == 2
    assert len(metrics(out)) == 1
    monkeypatch.delenv(io.CRASH_ENV)
    res = run_cli("train", "--resume", out, "-q")
    assert res.exit_code == 0, res.stderr
    assert_same_run(out, reference)


def test_a_keyboard_interrupt_from_code_keeps_the_last_complete_epoch(tmp_path, reference, interrupting_reporter):
    """Without the signal handler's step boundary (e.g. a second Ctrl-C), the stop is
    immediate and checkpoints/last keeps the last complete epoch; resuming is still exact."""
    from elbokit import config
    from elbokit.train import TrainingInterrupted, train

    cfg = config.resolve(overrides={
        "data": {"n": 300}, "model": {"hidden": [16]}, "objective": {"terms": "ed"},
        "train": {"max_epochs": 4, "patience": 50, "batch_size": 64, "evaluate": False},
        "output": {"out": str(tmp_path / "run")}})
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, reporter=interrupting_reporter(STEPS_PER_EPOCH + 1))
    assert info.value.epoch == 1 and info.value.step_in_epoch == 0
    train(resume=tmp_path / "run")
    assert_same_run(tmp_path / "run", reference)


def test_checkpoints_written_seldom_still_resume_exactly(tmp_path, reference, run_cli):
    """With the default spacing of checkpoints (train.checkpoint_seconds), a SIGKILL loses the
    epochs since the last write, and the resume replays them to the same numbers; a best
    reached in between is written with the final checkpoints."""
    from elbokit.run import read_checkpoint

    out = tmp_path / "run"
    args = [*ARGS[:-2], "--checkpoint-seconds", "1000"]  # nothing but the initial checkpoint until the end
    env = {**os.environ, "ELBOKIT_TEST_CRASH_AT": f"step:train:{2 * STEPS_PER_EPOCH + 2}",
           "ELBOKIT_DISABLE_PLUGINS": "1"}
    proc = subprocess.run([sys.executable, "-c", "from elbokit.cli import console_main; console_main()", *args,
                           "--out", str(out)], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -9, proc.stderr.decode()
    _, meta = read_checkpoint(out / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == 0 and not (out / "checkpoints" / "best.safetensors").exists()
    assert len(metrics(out)) == 2  # epochs 1 and 2 ran; the resume drops and replays them
    res = run_cli("train", "--resume", out, "-q")
    assert res.exit_code == 0, res.stderr
    assert_same_run(out, reference)
