"""`elbokit runs list` and `elbokit runs compare` over real runs: finished, diverged,
interrupted, running (a live lock) and one written before run.json existed."""

from __future__ import annotations

import json
import shutil

import pytest

ARGS = ["train", "--terms", "classic", "--data", "gaussian", "--n", "300", "--hidden", "16", "--batch-size", "64",
        "--patience", "50", "-q"]
STEPS_PER_EPOCH = 240 // 64


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """runs/finished (3 epochs, evaluated), runs/diverged (lr 1e5), runs/interrupted (SIGINT
    during step 2 of epoch 2), runs/grid/cell-0 (a nested run, as a benchmark cell)."""
    from elbokit import io
    from elbokit.cli import main

    root = tmp_path_factory.mktemp("runs")
    assert main([*ARGS, "--max-epochs", "3", "--out", str(root / "finished")]) == 0
    assert main([*ARGS, "--max-epochs", "3", "--lr", "1e5", "--out", str(root / "diverged")]) == 3
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(io, "_crash_counts", {})
        mp.setenv(io.CRASH_ENV, f"step:train:{STEPS_PER_EPOCH + 2}:INT")
        assert main([*ARGS, "--max-epochs", "3", "--no-evaluate", "--out", str(root / "interrupted")]) == 130
    finally:
        mp.undo()
    assert main([*ARGS, "--max-epochs", "2", "--seed", "1", "--no-evaluate", "--out",
                 str(root / "grid" / "cell-0")]) == 0
    return root


def _by_name(rows):
    return {r["name"]: r for r in rows}


def test_runs_list_tells_each_status_apart(runs_dir, run_cli):
    from elbokit.run import RunDir
    from elbokit.runs import status_record

    res = run_cli("runs", "list", runs_dir, "--json")
    assert res.exit_code == 0, res.stderr
    rows = _by_name(json.loads(res.stdout))
    assert set(rows) == {"finished", "diverged", "interrupted", "grid/cell-0"}
    finished = rows["finished"]
    summary = json.loads((runs_dir / "finished" / "summary.json").read_text())
    assert finished["status"] == "finished" and finished["epochs"] == 3 and finished["max_epochs"] == 3
    assert finished["terms"] == "classic" and finished["prior"] == "standard-normal" and finished["data"] == "gaussian"
    assert finished["best_val"] == summary["best_val"] and finished["test_elbo"] == summary["test"]["elbo"]
    assert finished["test_iwae"] == summary["test"]["iwae"] and finished["test_elbo"] <= finished["test_iwae"]
    interrupted = rows["interrupted"]
    assert interrupted["status"] == "interrupted" and "step 2 of epoch 2" in interrupted["status_detail"]
    assert interrupted["epochs"] == 1 and interrupted["test_elbo"] is None
    # A diverged run leaves its last good checkpoint and no summary; the loop records why it
    # ended in run.json, with the epoch it diverged in and the epoch of the checkpoint it kept.
    diverged = rows["diverged"]
    assert diverged["status"] == "diverged" and diverged["best_val"] is None
    assert diverged["status_detail"].startswith("Training diverged: ") and "(epoch 1)" in diverged["status_detail"]
    recorded = json.loads((runs_dir / "diverged" / "run.json").read_text())["status"]
    assert recorded["epoch"] == 1 and recorded["kept_epoch"] == 0
    recorded = json.loads((runs_dir / "interrupted" / "run.json").read_text())["status"]
    assert recorded == {"status": "interrupted", "reason": "Interrupted at step 2 of epoch 2.", "epoch": 1,
                        "step_in_epoch": 2, "signal": 2}
    assert rows["grid/cell-0"]["status"] == "finished" and rows["grid/cell-0"]["seed"] == 1
    assert "status" not in json.loads((runs_dir / "finished" / "run.json").read_text())


def test_a_resumed_run_clears_its_recorded_status(runs_dir, tmp_path):
    """Resuming clears how the run ended before; finishing leaves it finished."""
    from elbokit.cli import main
    from elbokit.runs import run_info, status_record

    run = tmp_path / "interrupted"
    shutil.copytree(runs_dir / "interrupted", run)
    assert main(["train", "--resume", str(run), "-q"]) == 0
    assert "status" not in json.loads((run / "run.json").read_text())
    assert run_info(run)["status"] == "finished" and run_info(run)["epochs"] == 3
    # A finished run extended by a resume starts from a clean record too.
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "status": status_record("stopped", "by hand")}))
    assert run_info(run)["status"] == "stopped"
    assert main(["train", "--resume", str(run), "--max-epochs", "4", "-q"]) == 0
    assert run_info(run)["status"] == "finished" and run_info(run)["epochs"] == 4


def test_a_keyboard_interrupt_from_code_is_recorded(tmp_path, interrupting_reporter):
    """A KeyboardInterrupt raised by code (or a second Ctrl-C) stops at once: recorded too."""
    from elbokit import config
    from elbokit.runs import run_info
    from elbokit.train import TrainingInterrupted, train

    cfg = config.resolve(overrides={
        "data": {"dataset": "gaussian", "n": 300}, "model": {"hidden": [16]},
        "train": {"max_epochs": 3, "patience": 50, "batch_size": 64, "evaluate": False},
        "output": {"out": str(tmp_path / "run")}})
    with pytest.raises(TrainingInterrupted):
        train(cfg, reporter=interrupting_reporter(STEPS_PER_EPOCH + 1))
    info = run_info(tmp_path / "run")
    assert info["status"] == "interrupted" and info["status_detail"] == "Interrupted after epoch 1."
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"]["signal"] is None


def test_a_live_lock_is_running_and_a_released_one_is_not(runs_dir, run_cli):
    import os

    from elbokit.run import RunDir
    from elbokit.runs import lock_holder, run_info

    path = runs_dir / "finished"
    with RunDir.open(path) as run:
        run.begin_writing()
        info = run_info(path)
        assert info["status"] == "running" and f"pid {os.getpid()}" in info["status_detail"]
        assert lock_holder(path)["pid"] == os.getpid()
        with pytest.raises(Exception, match="being written by another process"):  # the probe stole nothing
            RunDir.open(path)
    assert lock_holder(path) is None and run_info(path)["status"] == "finished"


def test_a_killed_writer_is_not_running(runs_dir):
    """The kernel drops a flock when its process dies: a SIGKILLed writer leaves a stopped run."""
    import signal
    import subprocess
    import sys

    from elbokit.runs import run_info

    path = runs_dir / "interrupted"
    code = ("import sys, time\nfrom elbokit.run import RunDir\nr = RunDir.open(sys.argv[1]); r.begin_writing()\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert run_info(path)["status"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert run_info(path)["status"] == "interrupted"


def test_runs_alone_lists_dot_runs_as_a_table(runs_dir, run_cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(runs_dir / "finished", tmp_path / "runs" / "finished")
    monkeypatch.setenv("COLUMNS", "100")
    res = run_cli("runs")
    assert res.exit_code == 0, res.stderr
    assert "finished" in res.stdout and "classic" in res.stdout and "Runs under runs" in res.stdout
    json_rows = json.loads(run_cli("runs", "--json").stdout)
    assert [r["name"] for r in json_rows] == ["finished"]


def test_an_old_run_directory_is_listed_with_the_current_names(runs_dir, tmp_path):
    """A run written before run.json and before the metric names: old summary keys, nested
    metrics records. It lists the same numbers under the current names."""
    from elbokit.runs import run_info

    old = tmp_path / "old"
    shutil.copytree(runs_dir / "finished", old)
    (old / "run.json").unlink()
    summary = json.loads((old / "summary.json").read_text())
    test = summary["test"]
    test["entropy"], test["cross_entropy"] = test.pop("aggregate_entropy"), test.pop("aggregate_cross_entropy")
    summary["select_metric"] = "neg_elbo"
    (old / "summary.json").write_text(json.dumps(summary))
    info, new = run_info(old), run_info(runs_dir / "finished")
    assert info["test_aggregate_entropy"] == new["test_aggregate_entropy"] is not None
    assert info["select_metric"] == "val_neg_elbo" and info["status"] == "finished"


def test_runs_compare_shows_config_differences_and_metrics_side_by_side(runs_dir, run_cli):
    res = run_cli("runs", "compare", runs_dir / "finished", runs_dir / "diverged", runs_dir / "interrupted", "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    diff = out["config_differences"]
    assert diff["train.lr"] == [0.001, 1e5, 0.001]
    assert diff["train.evaluate"] == [True, True, False]
    assert "train.batch_size" not in diff and "output.out" not in diff  # the same, or not a setting
    metrics = out["metrics"]
    assert metrics["status"][0] == "finished" and metrics["status"][2] == "interrupted"
    assert metrics["epochs"] == [3, 0, 1]
    assert metrics["test_elbo"][0] is not None and metrics["test_elbo"][2] is None
    table = run_cli("runs", "compare", runs_dir / "finished", runs_dir / "interrupted")
    assert table.exit_code == 0 and "train.evaluate" in table.stdout and "test_iwae" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["runs", "list", "{tmp}/nowhere"], "Runs directory not found"),
    (["runs", "compare", "{runs}/finished"], "at least two run directories"),
    (["runs", "compare", "{runs}/finished", "{tmp}"], "is not an elbokit run directory"),
])
def test_runs_bad_input_is_one_line(runs_dir, run_cli, tmp_path, args, message):
    res = run_cli(*(a.replace("{runs}", str(runs_dir)).replace("{tmp}", str(tmp_path)) for a in args))
    assert res.exit_code == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and message in res.stderr


def test_listing_does_not_import_torch(runs_dir):
    import subprocess
    import sys

    code = ("import sys\nfrom elbokit.cli import main\ncode = main(['runs', 'list', sys.argv[1], '--json'])\n"
            "sys.stderr.write(f'CODE={code} TORCH={\"torch\" in sys.modules}')")
    proc = subprocess.run([sys.executable, "-c", code, str(runs_dir)], capture_output=True, text=True, timeout=120)
    assert "CODE=0 TORCH=False" in proc.stderr, proc.stderr
