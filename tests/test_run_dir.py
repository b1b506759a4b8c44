"""The run directory holds up: one writer at a time (an OS lock the kernel releases when the
holder dies), readers never blocked, and the metadata says what made the run.

The concurrent trainers are real processes: the test-only hook ELBOKIT_TEST_CRASH_AT
(elbokit/io.py) makes the first one SIGSTOP itself in the middle of epoch 1, holding the lock,
so the second one is started at a known moment without any sleep or timing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ARGS = ["train", "--n", "300", "--hidden", "16", "--batch-size", "64", "--max-epochs", "3",
        "--patience", "50", "--no-evaluate", "-q", "--checkpoint-seconds", "0"]


def start_stopped_trainer(out, point="step:train:2:STOP"):
    """`elbokit train --out OUT` in a subprocess, returned once it has stopped itself at `point`."""
    env = {**os.environ, "ELBOKIT_TEST_CRASH_AT": point, "ELBOKIT_DISABLE_PLUGINS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from elbokit.cli import console_main; console_main()",
                             *ARGS, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns when it stops (or exits)
    assert os.WIFSTOPPED(status), proc.communicate()
    return proc


def epochs(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_second_writer_is_refused_with_the_holders_pid_and_host(tmp_path, run_cli):
    out = tmp_path / "run"
    first = start_stopped_trainer(out)
    try:
        second = run_cli("train", "--resume", out, "-q", "--checkpoint-seconds", "0")
        assert second.exit_code == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ")
        assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
        again = run_cli(*ARGS, "--out", out)  # the same --out twice
        assert again.exit_code == 2 and "already exists" in again.stderr
    finally:
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr.decode()
    assert epochs(out) == [1, 2, 3]  # one line per epoch: the refused writer wrote nothing


def test_sigkill_of_the_writer_leaves_no_stale_lock(tmp_path, run_cli):
    out = tmp_path / "run"
    first = start_stopped_trainer(out)
    first.kill()  # SIGKILL while it holds the lock
    first.communicate(timeout=60)
    resumed = run_cli("train", "--resume", out, "-q", "--checkpoint-seconds", "0")
    assert resumed.exit_code == 0, resumed.stderr
    assert epochs(out) == [1, 2, 3]


def test_readers_never_take_the_lock_and_a_second_open_is_refused(tmp_path, run_cli):
    from elbokit.run import RunDir, RunDirLocked, load_run

    out = tmp_path / "run"
    assert run_cli(*ARGS, "--max-epochs", "1", "--out", out).exit_code == 0
    with RunDir.open(out) as writer:
        assert writer.locked
        # flock belongs to the open file description: a second open in this very process is refused too
        with pytest.raises(RunDirLocked, match="being written by another process"):
            RunDir.open(out)
        reader = RunDir(out)
        assert [r["epoch"] for r in reader.read_metrics()] == [1]
        assert load_run(out).state["epoch"] == 1
        with pytest.raises(RuntimeError, match="reading only"):
            reader.write_summary({})
    with RunDir.open(out) as again:  # released by close()
        assert again.locked


def test_run_json_names_versions_threads_and_each_components_plugin(tmp_path, run_cli):
    import torch

    import elbokit

    out = tmp_path / "run"
    assert run_cli(*ARGS, "--max-epochs", "1", "--terms", "ed", "--out", out).exit_code == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["versions"]["elbokit"] == elbokit.__version__
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["world_size"] == 1 and meta["threads"] >= 1
    kinds = {(c["kind"], c["name"]): c for c in meta["components"]}
    assert kinds[("prior", "standard-normal")]["plugin"] == "elbokit.default_plugins.priors"
    assert kinds[("dataset", "mixture")]["plugin"] == "elbokit.default_plugins.datasets"
    assert kinds[("term", "entropy")]["plugin_version"] == elbokit.__version__
    assert ("estimator", "entropy/mws") in kinds and ("estimator", "mi/infonce") in kinds


@pytest.mark.parametrize("argv, message", [
    (["--n", "3"], "split"),
    (["--terms", "ed", "-o", "entropy.estimator=knn", "-o", "entropy.k=50", "--batch-size", "16"], "larger than k=50"),
    (["--terms", "ed", "-o", "entropy.estimator=mss", "--batch-size", "1"], "at least 2"),
    (["--n", "12", "--terms", "ed"], "test split has 1 row"),
])
def test_each_pre_run_check_leaves_no_directory(tmp_path, run_cli, argv, message):
    result = run_cli(*ARGS, *argv, "--evaluate", "--out", tmp_path / "run")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: ") and message in result.stderr and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    # --print-config runs the same checks
    printed = run_cli(*ARGS, *argv, "--evaluate", "--out", tmp_path / "run", "--print-config")
    assert printed.exit_code == 2 and message in printed.stderr


def test_print_config_checks_and_says_where_the_run_would_go(tmp_path, run_cli):
    import tomllib

    result = run_cli(*ARGS, "--terms", "ed", "--out", tmp_path / "run", "--print-config")
    assert result.exit_code == 0, result.stderr
    assert f"the run would be written to {tmp_path / 'run'}" in result.stdout
    assert tomllib.loads(result.stdout)["train"]["threads"] == 1  # OMP_NUM_THREADS=1 (conftest)
    assert list(tmp_path.iterdir()) == []


def test_the_precheck_changes_no_number(tmp_path):
    """A checked run and the same run built without the check give identical weights."""
    from elbokit import config
    from elbokit.build import build_components, precheck

    import random

    import numpy as np
    import torch

    cfg = config.resolve(overrides={"objective": {"terms": "ed"}, "data": {"n": 300}, "model": {"hidden": [16]}})
    plain = build_components(cfg)
    draws_plain = (torch.rand(3), np.random.rand(3), random.random())
    checked = build_components(cfg)
    assert precheck(checked)["auto"] == {"xent": "analytic"}  # ed's xent with the standard normal
    draws_checked = (torch.rand(3), np.random.rand(3), random.random())
    assert all(p.grad is None for p in checked.model.parameters())
    for a, b in zip([*plain.model.state_dict().values(), *plain.objective.state_dict().values()],
                    [*checked.model.state_dict().values(), *checked.objective.state_dict().values()]):
        assert torch.equal(a, b)
    assert torch.equal(draws_plain[0], draws_checked[0]) and np.array_equal(draws_plain[1], draws_checked[1])
    assert draws_plain[2] == draws_checked[2]


def test_default_threads_follow_omp_num_threads_then_the_allowed_cpus(monkeypatch):
    from elbokit import build, config

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert build.default_threads() == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads, source = build.default_threads()
    assert threads == len(os.sched_getaffinity(0)) or threads < len(os.sched_getaffinity(0))  # a cgroup quota only lowers it
    assert threads >= 1 and "affinity" in source
    cfg, _ = build.resolve_threads(config.resolve())
    assert cfg["train"]["threads"] == threads
    pinned, source = build.resolve_threads(config.resolve(overrides={"train": {"threads": 1}}))
    assert pinned["train"]["threads"] == 1 and source == "train.threads"


def test_summary_records_weights_options_estimator_choice_threads_and_versions(tmp_path, run_cli):
    import torch

    out = tmp_path / "run"
    result = run_cli(*ARGS, "--max-epochs", "1", "--terms", "recon,kl:0.5,infonce,entropy,xent", "--prior", "gmm",
                     "-o", "entropy.estimator=knn", "--data-option", "n=320", "--json", "--out", out)
    assert result.exit_code == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    terms = {t["name"]: t for t in summary["objective"]}
    assert terms["kl"]["weight"] == 0.5 and terms["recon"]["weight"] == 1.0
    assert terms["entropy"]["estimator"] == "knn" and terms["entropy"]["options"]["k"] >= 1
    assert terms["kl"]["estimator_chosen"] == "mc"  # a GMM prior has no analytic KL against a diagonal normal
    assert terms["xent"]["estimator_chosen"] == "mc"
    assert summary["threads"] == 1 and summary["versions"]["torch"] == torch.__version__
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 320
    import tomllib

    assert tomllib.loads((out / "config.toml").read_text())["data"]["n"] == 320  # the effective n


def test_resuming_a_finished_run_changes_nothing(tmp_path, run_cli):
    out = tmp_path / "run"
    assert run_cli(*ARGS, "--max-epochs", "1", "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    again = run_cli("train", "--resume", out)
    assert again.exit_code == 0 and "is complete" in again.stdout
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_a_run_stopped_by_patience_continues_with_a_larger_budget(tmp_path, run_cli):
    out = tmp_path / "run"
    # lr 1e-12 is below the float32 spacing of the weights: nothing improves after epoch 1
    assert run_cli(*ARGS, "--lr", "1e-12", "--patience", "1", "--out", out).exit_code == 0
    assert epochs(out) == [1, 2]
    same = run_cli("train", "--resume", out, "-q")
    assert same.exit_code == 0 and epochs(out) == [1, 2]
    more = run_cli("train", "--resume", out, "--max-epochs", "5", "-q", "--json")
    assert more.exit_code == 0, more.stderr
    assert epochs(out) == [1, 2, 3]  # the counter restarted: one more epoch without improvement
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "patience"


def _metrics_without_time(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_disk_full_mid_checkpoint_exits_4_keeps_the_last_and_resumes_to_the_same_numbers(tmp_path, run_cli, monkeypatch):
    import errno
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import load_file

    from elbokit import io, run
    from elbokit.run import load_run

    reference, out = tmp_path / "reference", tmp_path / "run"
    assert run_cli(*ARGS, "--out", reference).exit_code == 0
    real_write_bytes, calls = run.write_bytes, []

    def disk_fills_up(path, data):
        if Path(path).name == "last.safetensors":
            calls.append(path)
            if len(calls) == 3:  # the initial state, epoch 1, then epoch 2: half written, then ENOSPC
                with io.atomic_write(path, "wb") as fh:
                    fh.write(data[:len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write_bytes(path, data)

    monkeypatch.setattr(run, "write_bytes", disk_fills_up)
    failed = run_cli(*ARGS, "--out", out)
    monkeypatch.undo()
    assert failed.exit_code == 4
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "No space left on device (ENOSPC)" in lines[0]
    assert "the last checkpoint (epoch 1) is intact" in lines[0] and f"elbokit train --resume {out}" in lines[0]
    assert not list(out.glob("**/.*.tmp"))  # the half-written temporary file is gone
    assert load_run(out, "last").state["epoch"] == 1
    resumed = run_cli("train", "--resume", out, "-q")
    assert resumed.exit_code == 0, resumed.stderr
    assert _metrics_without_time(out) == _metrics_without_time(reference)
    for which in ("best", "last"):
        a = load_file(str(out / "checkpoints" / f"{which}.safetensors"))
        b = load_file(str(reference / "checkpoints" / f"{which}.safetensors"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), which


def test_a_read_only_run_directory_at_resume_is_exit_4(tmp_path, run_cli, monkeypatch):
    import errno

    from elbokit import run

    out = tmp_path / "run"
    assert run_cli(*ARGS, "--max-epochs", "1", "--out", out).exit_code == 0

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out / "config.toml"))

    monkeypatch.setattr(run, "write_text", read_only)
    failed = run_cli("train", "--resume", out, "--max-epochs", "2", "-q")
    assert failed.exit_code == 4 and "Read-only file system (EROFS)" in failed.stderr
    assert failed.stderr.count("\n") == 1 and "is intact" in failed.stderr


def test_a_relative_data_path_works_from_another_directory_and_after_moving_the_run(tmp_path, run_cli, monkeypatch):
    import numpy as np

    project = tmp_path / "project"
    project.mkdir()
    np.save(project / "rows.npy", np.random.default_rng(0).normal(size=(300, 6)))
    monkeypatch.chdir(project)
    file_args = [a for a in ARGS if a not in ("--n", "300")]
    assert run_cli(*file_args, "--max-epochs", "1", "--data", "rows.npy", "--out", "run").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = project / "run"
    assert run_cli("evaluate", run, "-k", "5", "--json").exit_code == 0
    assert run_cli("plot", run).exit_code == 0
    resumed = run_cli("train", "--resume", run, "--max-epochs", "2", "-q")
    assert resumed.exit_code == 0, resumed.stderr
    moved = tmp_path / "moved"
    project.rename(moved)  # the run together with its data
    result = run_cli("evaluate", moved / "run", "-k", "5", "--json")
    assert result.exit_code == 0, result.stderr
    np.save(moved / "rows.npy", np.random.default_rng(1).normal(size=(300, 6)))  # same shape, other rows
    changed = run_cli("evaluate", moved / "run", "-k", "5")
    assert changed.exit_code == 2 and "sha256 differs" in changed.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from elbokit.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*ARGS, "--max-epochs", "1", "--out", str(out)]) == 0
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_run_directory_in_the_layout_before_run_json_evaluates_plots_and_resumes(finished_run, tmp_path, run_cli):
    """The layout today's code replaced: no run.json, no .lock, a summary without the new keys."""
    old = copy_run(finished_run, tmp_path / "old")
    (old / "run.json").unlink()
    (old / ".lock").unlink()
    summary = json.loads((old / "summary.json").read_text())
    for key in ("objective", "threads", "threads_from", "versions"):
        summary.pop(key)
    (old / "summary.json").write_text(json.dumps(summary))
    evaluated = run_cli("evaluate", old, "-k", "5", "--json")
    assert evaluated.exit_code == 0 and evaluated.stderr == ""
    assert json.loads(evaluated.stdout)["rows"] == {"source": "split", "split": "test", "n": 30, "training_rows": 0}
    assert run_cli("plot", old).exit_code == 0
    resumed = run_cli("train", "--resume", old, "--max-epochs", "2", "-q")
    assert resumed.exit_code == 0, resumed.stderr
    assert epochs(old) == [1, 2]


def test_another_format_or_a_missing_plugin_is_refused_and_a_changed_version_warned(finished_run, tmp_path, run_cli):
    changed = copy_run(finished_run, tmp_path / "changed")
    meta = json.loads((changed / "run.json").read_text())
    for c in meta["components"]:
        if c["kind"] == "prior":
            c["plugin_version"] = "0.0.1"
    (changed / "run.json").write_text(json.dumps(meta))
    warned = run_cli("evaluate", changed, "-k", "5", "--json")
    assert warned.exit_code == 0
    lines = warned.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning: ") and "0.0.1" in lines[0] and "prior 'standard-normal'" in lines[0]
    assert run_cli("plot", changed).stderr.count("Warning: ") == 1

    gone = copy_run(finished_run, tmp_path / "gone")
    meta = json.loads((gone / "run.json").read_text())
    meta["components"].append({"kind": "term", "name": "vanished", "plugin": "elbokit-vanished", "plugin_version": "1.0"})
    (gone / "run.json").write_text(json.dumps(meta))
    for argv in (["evaluate", gone], ["train", "--resume", gone, "--max-epochs", "2"]):
        refused = run_cli(*argv)
        assert refused.exit_code == 2 and "'elbokit-vanished' 1.0, which is not installed" in refused.stderr

    future = copy_run(finished_run, tmp_path / "future")
    meta = json.loads((future / "run.json").read_text())
    meta["format"] = 99
    (future / "run.json").write_text(json.dumps(meta))
    refused = run_cli("evaluate", future)
    assert refused.exit_code == 2 and "run-directory format 99" in refused.stderr and refused.stderr.count("\n") == 1


def test_evaluating_training_rows_warns_and_records_them(finished_run, run_cli):
    result = run_cli("evaluate", finished_run, "--split", "train", "-k", "5", "--json")
    assert result.exit_code == 0
    assert result.stderr.count("\n") == 1 and "240 of the 240 rows evaluated are rows the model was trained on" in result.stderr
    assert json.loads(result.stdout)["rows"] == {"source": "split", "split": "train", "n": 240, "training_rows": 240}


def test_a_run_re_run_from_its_config_toml_is_bit_identical(finished_run, tmp_path, run_cli):
    from safetensors.numpy import load_file
    import numpy as np

    again = tmp_path / "again"
    assert run_cli("train", "--config", finished_run / "config.toml", "--out", again, "-q").exit_code == 0
    assert _metrics_without_time(again) == _metrics_without_time(finished_run)
    a, b = (load_file(str(d / "checkpoints" / "last.safetensors")) for d in (again, finished_run))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
