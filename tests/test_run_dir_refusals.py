"""A resume refused under the run directory's lock leaves the directory as it found it (no
stray `.lock` in a run from before lock files), and a run directory that cannot be written is
one line and exit code 4 (docs/training.md, "The run directory")."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

ARGS = ["train", "--data", "gaussian", "--n", "300", "--hidden", "16", "--batch-size", "64", "--no-evaluate",
        "-q", "--patience", "50", "--checkpoint-seconds", "0"]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    from elbokit.cli import main

    out = tmp_path_factory.mktemp("runs") / "run"
    assert main([*ARGS, "--max-epochs", "1", "--out", str(out)]) == 0
    return out


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def damaged_copy(src: Path, dst: Path, *, keep_lock: bool) -> Path:
    shutil.copytree(src, dst)
    if not keep_lock:  # the layout before lock files
        (dst / ".lock").unlink()
    with open(dst / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write("not a record\n")  # refused by the resume, under the lock, before anything is written
    return dst


@pytest.mark.parametrize("keep_lock", [False, True], ids=["without-lock-file", "with-lock-file"])
def test_a_refused_resume_leaves_the_run_directory_as_it_was(one_epoch_run, tmp_path, run_cli, keep_lock):
    run = damaged_copy(one_epoch_run, tmp_path / "run", keep_lock=keep_lock)
    before = snapshot(run)
    res = run_cli("train", "--resume", run, "--max-epochs", "2", "-q")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "metrics.jsonl line 2" in lines[0]
    assert snapshot(run) == before  # no .lock created, the one there untouched
    assert (run / ".lock").exists() is keep_lock


def test_a_lock_file_created_for_nothing_is_removed_and_one_written_under_stays(one_epoch_run, tmp_path):
    from elbokit.run import RunDir
    from elbokit.runs import lock_holder

    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    (run / ".lock").unlink()
    with RunDir.open(run) as rd:
        assert rd.locked and (run / ".lock").exists() and lock_holder(run) == {}
    assert not (run / ".lock").exists()
    with RunDir.open(run) as rd:
        rd.begin_writing()
    assert (run / ".lock").exists() and lock_holder(run) is None
    with RunDir.open(run):  # existed before: stays
        pass
    assert (run / ".lock").exists()


def _modes_are_enforced() -> bool:
    """Whether this process is refused a write into a 0o500 directory (root, or a process
    with CAP_DAC_OVERRIDE, is not: then the test cannot show anything)."""
    if os.geteuid() == 0 and not _lacks_dac_override():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "d"
        probe.mkdir(mode=0o500)
        try:
            (probe / "f").write_text("")
        except PermissionError:
            return True
        finally:
            probe.chmod(0o700)
        return False


def _lacks_dac_override() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    eff = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapEff:")), None)
    return eff is not None and not eff & (1 << 1)  # CAP_DAC_OVERRIDE is capability 1


@pytest.mark.skipif(not _modes_are_enforced(), reason="file modes are not enforced for this process (root)")
@pytest.mark.parametrize("keep_lock", [False, True], ids=["without-lock-file", "with-lock-file"])
def test_a_run_directory_that_cannot_be_written_is_exit_4_and_one_line(one_epoch_run, tmp_path, run_cli, keep_lock):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    if not keep_lock:
        (run / ".lock").unlink()
    before = snapshot(run)
    run.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0o500
    try:
        res = run_cli("train", "--resume", run, "--max-epochs", "2", "-q")
    finally:
        run.chmod(0o700)
    assert res.exit_code == 4
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Could not write ") and "Permission denied" in lines[0]
    assert "the last checkpoint (epoch 1) is intact" in lines[0] and f"--resume {run}" in lines[0]
    after = snapshot(run)
    if keep_lock:  # the holder's pid was recorded in the lock file, which is writable itself
        before.pop(".lock"), after.pop(".lock")
    assert after == before
