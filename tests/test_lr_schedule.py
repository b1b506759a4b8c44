"""Learning-rate schedules (torch.optim.lr_scheduler): each changes the learning rate as
docs/training.md says, the value is recorded per epoch (`lr` in metrics.jsonl), and a run
resumed in the middle of a schedule equals an uninterrupted one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

# 240 training rows in batches of 60: 4 steps per epoch.
FAST = ["--n", "300", "--hidden", "16", "--batch-size", "60", "--no-evaluate", "-q", "--checkpoint-seconds", "0"]
LR = 0.01


def records(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def train(run_cli, out, *args):
    res = run_cli("train", *FAST, "--lr", LR, "--out", out, *args)
    assert res.exit_code == 0, res.stderr
    return records(out)


def test_step_schedule_multiplies_by_gamma_every_n_epochs(tmp_path, run_cli):
    rows = train(run_cli, tmp_path / "r", "--max-epochs", "5", "--patience", "99", "--lr-schedule", "step",
                 "--lr-step-epochs", "2", "--lr-gamma", "0.5")
    assert [r["lr"] for r in rows] == pytest.approx([LR * 0.5 ** (e // 2) for e in range(1, 6)], rel=1e-12)


def test_warmup_then_cosine_follows_the_closed_form(tmp_path, run_cli):
    warmup, epochs, spe, lr_min = 6, 5, 4, 1e-4
    rows = train(run_cli, tmp_path / "r", "--max-epochs", "6", "--patience", "99", "--lr-schedule", "cosine",
                 "--lr-warmup-steps", warmup, "--lr-cosine-epochs", epochs, "--lr-min", lr_min)
    length = epochs * spe - warmup

    def expected(t):  # the learning rate of step t (from 0)
        if t < warmup:
            return LR * (t + 1) / warmup
        u = min(t - warmup, length)  # held at lr_min after the cosine's length
        return lr_min + (LR - lr_min) * (1 + math.cos(math.pi * u / length)) / 2

    assert [r["lr"] for r in rows] == pytest.approx([expected(r["step"]) for r in rows], rel=1e-9)
    assert rows[-1]["lr"] == pytest.approx(lr_min, rel=1e-9)  # epoch 6: past the 5 epochs of the schedule
    cfg = (tmp_path / "r" / "config.toml").read_text()
    assert 'lr_schedule = "cosine"' in cfg and "lr_cosine_epochs = 5" in cfg


def test_warmup_alone_reaches_lr_and_stays(tmp_path, run_cli):
    rows = train(run_cli, tmp_path / "r", "--max-epochs", "3", "--lr-warmup-steps", "10")
    assert [r["lr"] for r in rows] == pytest.approx([LR * 5 / 10, LR * 9 / 10, LR], rel=1e-12)


def test_plateau_reduces_on_the_selection_metric(tmp_path, run_cli):
    import torch

    rows = train(run_cli, tmp_path / "r", "--max-epochs", "8", "--patience", "99", "--lr", "0.05",
                 "--lr-schedule", "plateau", "--lr-plateau-patience", "0", "--lr-gamma", "0.5")
    # torch's own rule, fed the validation metric the run recorded, gives the same learning rates.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    rule = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    expected = []
    for r in rows:
        rule.step(r[r["select_metric"]])
        expected.append(opt.param_groups[0]["lr"])
    assert [r["lr"] for r in rows] == expected
    assert min(expected) < 0.05  # the run did plateau: the test saw a reduction


@pytest.mark.parametrize("schedule", [
    ["--lr-schedule", "cosine", "--lr-warmup-steps", "5", "--lr-cosine-epochs", "4"],
    ["--lr-schedule", "plateau", "--lr-plateau-patience", "0", "--lr-gamma", "0.5"],
    ["--lr-schedule", "step", "--lr-step-epochs", "1", "--lr-gamma", "0.7"],
])
def test_a_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path, run_cli, schedule):
    from safetensors.numpy import load_file

    whole = train(run_cli, tmp_path / "whole", "--max-epochs", "4", "--patience", "99", *schedule)
    train(run_cli, tmp_path / "part", "--max-epochs", "2", "--patience", "99", *schedule)
    res = run_cli("train", "--resume", tmp_path / "part", "--max-epochs", "4", "-q")
    assert res.exit_code == 0, res.stderr
    assert records(tmp_path / "part") == whole
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "last.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a if k.startswith("model."))


def test_bad_schedule_values_are_one_line(tmp_path, run_cli):
    res = run_cli("train", *FAST, "--lr-schedule", "linear", "--out", tmp_path / "a")
    assert res.exit_code == 2 and "train.lr_schedule (--lr-schedule) must be one of" in res.stderr
    res = run_cli("train", *FAST, "--lr-schedule", "plateau", "--lr-gamma", "1", "--out", tmp_path / "b")
    assert res.exit_code == 2 and "must be below 1 for the plateau schedule" in res.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
