"""A non-finite loss stops training with exit code 3 and one line naming the term and the step;
the last good checkpoint is kept, and resuming with a lower learning rate (or gradient clipping)
goes on from it as if the diverged epoch had never been run."""

from __future__ import annotations

import json
import re
import shutil
import tomllib

import numpy as np

ARGS = ["--terms", "classic", "--n", "300", "--hidden", "16", "--batch-size", "64", "--no-evaluate", "-q",
        "--patience", "50"]
STEPS_PER_EPOCH = 240 // 64
DIVERGED = re.compile(r"Error: Training diverged: term '(recon|kl)' became NaN or Inf at step (\d+) \(epoch (\d+)\); "
                      r"the last good checkpoint \(epoch (\d+)[^)]*\) is kept\. Resume with a lower learning rate or "
                      r"gradient clipping: elbokit train --resume (\S+) --lr 10000 --grad-clip 1$")


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def tensors(run_dir, which="last"):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoints" / f"{which}.safetensors"))


def test_a_diverged_run_keeps_its_last_good_checkpoint_and_resumes_with_a_lower_lr(tmp_path, run_cli):
    from elbokit.run import load_run

    out, reference = tmp_path / "run", tmp_path / "reference"
    assert run_cli("train", *ARGS, "--max-epochs", "4", "--out", reference).exit_code == 0
    assert run_cli("train", *ARGS, "--max-epochs", "2", "--out", out).exit_code == 0
    good = tensors(out)

    # A learning rate of 1e5 from epoch 3 on: Adam's first update overflows the decoder.
    res = run_cli("train", "--resume", out, "--max-epochs", "4", "--lr", "1e5", "-q")
    assert res.exit_code == 3
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    match = DIVERGED.match(lines[0])
    assert match, lines[0]
    step, epoch, kept, where = int(match[2]), int(match[3]), int(match[4]), match[5]
    assert epoch == 3 and 2 * STEPS_PER_EPOCH < step <= 3 * STEPS_PER_EPOCH and kept == 2 and where == str(out)

    # Nothing of the diverged epoch was saved: checkpoints/last is epoch 2's, finite and loadable.
    assert len(metrics(out)) == 2
    last = tensors(out)
    assert last.keys() == good.keys() and all(np.array_equal(last[k], good[k]) for k in good)
    run = load_run(out, "last")
    assert run.state["epoch"] == 2
    assert all(np.isfinite(p.detach().numpy()).all() for p in run.model.parameters())

    # Resuming with the original learning rate is the uninterrupted run, number for number.
    shutil.copytree(out, tmp_path / "copy")
    assert run_cli("train", "--resume", tmp_path / "copy", "--lr", "0.001", "--max-epochs", "4", "-q").exit_code == 0
    assert metrics(tmp_path / "copy") == metrics(reference)
    ref = tensors(reference)
    assert all(np.array_equal(tensors(tmp_path / "copy")[k], ref[k]) for k in ref)

    # Resuming with what the message suggests for a milder case proceeds, and the config says so.
    res = run_cli("train", "--resume", out, "--lr", "1e-4", "--grad-clip", "1", "--max-epochs", "4", "-q")
    assert res.exit_code == 0, res.stderr
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[2] != metrics(reference)[2]  # the changed learning rate changed the numbers
    saved = tomllib.loads((out / "config.toml").read_text())["train"]
    assert saved["lr"] == 1e-4 and saved["grad_clip"] == 1.0


def test_divergence_in_the_first_epoch_keeps_the_initial_state(tmp_path, run_cli):
    out, reference = tmp_path / "run", tmp_path / "reference"
    res = run_cli("train", *ARGS, "--max-epochs", "2", "--lr", "1e5", "--out", out)
    assert res.exit_code == 3
    match = DIVERGED.match(res.stderr.strip())
    assert match and int(match[3]) == 1 and int(match[4]) == 0 and "(epoch 0: the initial state)" in res.stderr
    assert metrics(out) == [] and not (out / "checkpoints" / "best.safetensors").exists()
    assert run_cli("train", "--resume", out, "--lr", "0.001", "-q").exit_code == 0
    assert run_cli("train", *ARGS, "--max-epochs", "2", "--out", reference).exit_code == 0
    assert metrics(out) == metrics(reference)


def test_a_nan_gradient_behind_a_finite_loss_is_a_divergence_not_a_traceback(tmp_path, run_cli):
    """A term whose value is finite but whose gradient is NaN poisons the parameters; the next
    forward pass would raise in torch.distributions. It is reported like any divergence."""
    import torch

    from elbokit import ElboTerm, hookimpl
    from elbokit.plugins import Registry, set_registry

    class NanGradient(ElboTerm):
        """0 in value; its gradient is inf * 0 = NaN (sqrt at 0 of z^2 * 0)."""

        name = "nan-gradient"

        def forward(self, batch, prior):
            return torch.sqrt(batch.z.pow(2).sum(-1) * 0.0)

    class Plugin:
        @hookimpl
        def register_terms(self, register):
            register(NanGradient)

    set_registry(Registry.build([Plugin()], load_entry_points=False, strict=True))
    try:
        out = tmp_path / "run"
        res = run_cli("train", *ARGS, "--terms", "recon,kl,nan-gradient", "--max-epochs", "2", "--out", out)
    finally:
        set_registry(None)
    assert res.exit_code == 3 and "Traceback" not in res.stderr
    line, = res.stderr.strip().splitlines()
    assert line.startswith("Error: Training diverged: the parameters became NaN or Inf in the update of step 1, "
                           "where the largest term was 'recon' = ")
    assert "(a gradient overflowed) (epoch 1); the last good checkpoint (epoch 0: the initial state) is kept." in line
