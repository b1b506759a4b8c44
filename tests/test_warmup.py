"""Warm-up of a term's weight ([terms.NAME] warmup_steps, warmup = linear | cyclical): the
weight a step uses follows the documented curve, and a resume mid-warm-up is exact."""

from __future__ import annotations

import json

import pytest
import torch

TRAIN = ["train", "--data", "mixture", "--n", "300", "--hidden", "16", "--batch-size", "32", "--latent-dim", "2",
         "--no-evaluate", "-q"]


def _records(run_dir):
    from elbokit.run import read_metrics

    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run_dir / "metrics.jsonl")]


def test_the_loss_uses_weight_times_the_factor_of_the_global_step():
    from elbokit import make_prior
    from elbokit.models import VAE
    from elbokit.objective import build_objective

    torch.manual_seed(0)
    prior = make_prior("standard-normal", dim=2)
    objective = build_objective("recon,kl:0.5", prior, options={"kl": {"warmup_steps": 10}})
    model = VAE(4, latent_dim=2, hidden=(8,))
    x = torch.randn(16, 4)
    for step, factor in ((0, 0.0), (3, 0.3), (10, 1.0), (25, 1.0)):
        objective.global_step = step
        torch.manual_seed(1)
        out = objective(model(x))
        expected = out.terms["recon"] + 0.5 * factor * out.terms["kl"]
        assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-6, abs=1e-7)
        assert objective.effective_weight("kl") == pytest.approx(0.5 * factor)
        assert objective.effective_weight("recon") == 1.0


@pytest.mark.parametrize("kind", ["linear", "cyclical"])
def test_the_recorded_weight_follows_the_documented_curve(tmp_path, kind):
    from elbokit.cli import main
    from elbokit.objective import WarmUp

    out = tmp_path / kind
    opts = ["-o", "kl.warmup_steps=20", "-o", f"kl.warmup={kind}"]
    if kind == "cyclical":
        opts += ["-o", "kl.warmup_ratio=0.5", "-o", "kl.warmup_cycles=2"]
    assert main([*TRAIN, "--terms", "recon,kl:2", *opts, "--max-epochs", "8", "--out", str(out)]) == 0
    records = _records(out)
    steps = [r["step"] for r in records]
    per_epoch = steps[0]
    assert 0 < per_epoch < 20  # the warm-up spans several epochs
    got = [r["weight_kl"] for r in records]
    # The documented curve, written out: linear min(1, t/20); cyclical: ramp over the first half
    # of each 20-step cycle, 1 in the second half, 1 after two cycles. t = the last step's index.
    if kind == "linear":
        want = [2 * min(1.0, (s - 1) / 20) for s in steps]
    else:
        want = [2 * (1.0 if s - 1 >= 40 else min(1.0, ((s - 1) % 20) / 10)) for s in steps]
    assert got == pytest.approx(want, rel=1e-12)
    assert [2 * WarmUp(kind, 20, 0.5, 2).factor(s - 1) for s in steps] == pytest.approx(want)
    assert len(set(got)) > 2  # the curve moved during the run
    summary = json.loads((out / "summary.json").read_text())
    (kl,) = [t for t in summary["objective"] if t["name"] == "kl"]
    assert kl["warmup"] == kind and kl["warmup_steps"] == 20 and "warmup_steps" not in kl["options"]


def test_a_resume_mid_warm_up_equals_an_uninterrupted_run(tmp_path):
    from elbokit.cli import main

    opts = ["--terms", "classic", "-o", "kl.warmup_steps=30", "--seed", "3"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*TRAIN, *opts, "--max-epochs", "5", "--out", str(whole)]) == 0
    assert main([*TRAIN, *opts, "--max-epochs", "2", "--out", str(parts)]) == 0
    assert _records(parts)[-1]["weight_kl"] < 1.0  # stopped inside the warm-up
    assert main(["train", "--resume", str(parts), "--max-epochs", "5", "-q"]) == 0
    assert _records(parts) == _records(whole)


@pytest.mark.parametrize("option, word", [("kl.warmup=cosine", "linear or cyclical"),
                                          ("kl.warmup_steps=0", "warmup_steps"),
                                          ("kl.warmup_steps=1.5", "warmup_steps")])
def test_bad_warm_up_options_are_one_line_and_nothing_is_written(tmp_path, capsys, option, word):
    from elbokit.cli import main

    out = tmp_path / "r"
    extra = [] if option.startswith("kl.warmup_steps") else ["-o", "kl.warmup_steps=10"]
    assert main([*TRAIN, "-o", option, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error:") and word in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
