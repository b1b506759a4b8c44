"""What the training loop keeps besides the model: the best model copied and written later,
the epoch's running sums and first non-finite value, and the end-of-epoch parameter check.
Each was made cheaper (docs/benchmarks.md); these tests hold them to the slower originals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

TINY = ["--n", "300", "--hidden", "16", "--batch-size", "32", "--no-evaluate", "-q"]


def _checkpoint(run_dir, which):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoints" / f"{which}.safetensors"))


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def test_a_best_model_written_later_is_the_one_reached(tmp_path, run_cli):
    """With checkpoints written only at the end, the best model (copied when reached, several
    epochs before) must equal the one written at once by a run that checkpoints every epoch."""
    args = ["train", "--terms", "ed", *TINY, "--max-epochs", "8", "--patience", "50", "--lr", "0.02"]
    assert run_cli(*args, "--checkpoint-seconds", "0", "--out", tmp_path / "eager").exit_code == 0
    assert run_cli(*args, "--checkpoint-seconds", "100000", "--out", tmp_path / "late").exit_code == 0
    eager, late = _metrics(tmp_path / "eager"), _metrics(tmp_path / "late")
    assert eager == late
    best_epoch = [r["epoch"] for r in eager if r["improved"]][-1]
    assert best_epoch < 8, "the test needs a best epoch before the last one"
    for which in ("best", "last"):
        a, b = _checkpoint(tmp_path / "eager", which), _checkpoint(tmp_path / "late", which)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), which
    best, last = _checkpoint(tmp_path / "late", "best"), _checkpoint(tmp_path / "late", "last")
    assert not all(np.array_equal(best[k], last[k]) for k in best if k.startswith("model."))
    from elbokit.run import read_checkpoint

    assert read_checkpoint(tmp_path / "late" / "checkpoints" / "best.safetensors")[1]["epoch"] == best_epoch


def test_a_snapshot_serialises_the_state_it_copied():
    from elbokit.run import checkpoint_bytes, checkpoint_snapshot

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    parts = dict(model=model, objective=torch.nn.Module(), optimizer=opt, data_generator=torch.Generator(),
                 state={"epoch": 1, "lr_schedulers": {"base_lrs": [0.001]}})
    now = checkpoint_bytes(**parts)
    snapshot = checkpoint_snapshot(**parts)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on
    parts["state"]["epoch"] = 2
    parts["state"]["lr_schedulers"]["base_lrs"].append(0.5)
    assert snapshot.to_bytes() == now
    assert checkpoint_bytes(**parts) != now


def _old_tally(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bookkeeping the loop did in every step before, as the reference."""
    sums = torch.zeros(rows.shape[1])
    first_bad = torch.full((2,), -1, dtype=torch.long)
    for i, values in enumerate(rows):
        for k in range(len(values)):
            sums[k] += values[k]
        nonfinite = ~torch.isfinite(values)
        new_bad = (first_bad[0] < 0) & nonfinite.any()
        first_bad = torch.where(new_bad, torch.stack([torch.tensor(i), nonfinite.long().argmax()]), first_bad)
    return sums, first_bad


class _Out:
    def __init__(self, names, values):
        self.terms = {n: values[k] for k, n in enumerate(names)}
        self.loss = values[-1]


@pytest.mark.parametrize("bad", [None, (3, 1), (0, 2), (6, 0)])
@pytest.mark.parametrize("split", [0, 2, 5])
def test_epoch_tally_equals_the_per_step_bookkeeping_and_resumes_exactly(bad, split):
    from elbokit.train import _EpochTally

    names, steps = ["recon", "kl"], 7
    rows = torch.randn(steps, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 100
    if bad is not None:
        rows[bad[0], bad[1]] = math.nan
        rows[bad[0] + 1:, 0] = math.inf  # later non-finite values do not move the first one
    want_sums, want_bad = _old_tally(rows)

    whole = _EpochTally(names, 0, steps, torch.device("cpu"))
    for i in range(steps):
        whole.add(i, _Out(names, rows[i]))
    loss_sum, term_sums, first_bad = whole.totals(steps)
    got = torch.stack([*term_sums.values(), loss_sum])
    assert torch.equal(got, want_sums) or (bad is not None and torch.equal(got.isnan(), want_sums.isnan()))
    assert first_bad.tolist() == want_bad.tolist()
    assert got.dtype == torch.float32  # as before: float32 running sums whatever the data's dtype

    # Interrupted after `split` steps and resumed from the saved totals: the same numbers.
    first = _EpochTally(names, 0, steps, torch.device("cpu"))
    for i in range(split):
        first.add(i, _Out(names, rows[i]))
    saved = first.totals(split)
    second = _EpochTally(names, split, steps, torch.device("cpu"), *saved)
    for i in range(split, steps):
        second.add(i, _Out(names, rows[i]))
    r_loss, r_terms, r_bad = second.totals(steps)
    resumed = torch.stack([*r_terms.values(), r_loss])
    assert torch.equal(resumed.nan_to_num(), got.nan_to_num()) and torch.equal(resumed.isnan(), got.isnan())
    assert r_bad.tolist() == want_bad.tolist()


def _trainer(tmp_path):
    from elbokit import config
    from elbokit.train import Trainer, prepare

    cfg = config.resolve(overrides={"data": {"n": 200}, "model": {"hidden": [8]},
                                    "train": {"max_epochs": 1, "batch_size": 50, "evaluate": False},
                                    "output": {"out": str(tmp_path / "r")}})
    return Trainer(prepare(cfg))


def test_parameter_check_has_no_false_alarm_when_a_sum_overflows(tmp_path):
    from elbokit.train import TrainingDiverged

    trainer = _trainer(tmp_path)
    never = torch.tensor([-1, -1])
    weight = trainer.optimizer.param_groups[0]["params"][0]
    with torch.no_grad():
        weight.fill_(3e38)  # finite, but its sum is not
    assert not torch.isfinite(weight.sum())
    trainer._check_finite(1, never, 0, None)  # no divergence
    with torch.no_grad():
        weight[0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match="parameters became NaN or Inf"):
        trainer._check_finite(1, never, 0, None)
    with torch.no_grad():
        weight.fill_(0.0)
        weight[-1, -1] = -math.inf
    with pytest.raises(TrainingDiverged, match="parameters became NaN or Inf"):
        trainer._check_finite(1, never, 0, None)


def test_the_trainers_adam_updates_are_torchs_default_bit_for_bit(tmp_path):
    """The trainer's Adam uses the foreach implementation for speed; runs keep their numbers
    only if it updates exactly as torch's default (per-tensor on CPU) does."""
    import copy

    trainer = _trainer(tmp_path)
    assert trainer.optimizer.defaults["foreach"] is True
    model = trainer.model
    reference = copy.deepcopy(model)
    default = torch.optim.Adam(reference.parameters(), lr=trainer.optimizer.defaults["lr"])
    assert default.defaults["foreach"] is None  # torch's default: per-tensor on CPU
    x = trainer.setup.splits["train"].x[:50]
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(5):
        for m, opt in ((model, trainer.optimizer), (reference, default)):
            torch.manual_seed(step)
            loss = trainer.objective(m(x, None, dataset_size=200)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), start))  # it trained
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("terms, options", [
    ("classic", {}),
    ("recon,kl", {"kl": {"estimator": "analytic"}}),
    ("recon,kl", {"kl": {"estimator": "mc"}}),
    ("recon,kl", {"kl": {"free_bits": 0.5}}),
    ("ed", {}),
])
@pytest.mark.parametrize("prior", ["standard-normal", "gmm"])
def test_validation_reading_the_objectives_terms_gives_the_numbers_computed_apart(tmp_path, terms, options, prior):
    """Validation reads recon and kl from the objective's own terms where they are the same
    computation: the metrics must equal, bit for bit, the ones computed separately."""
    from elbokit import config
    from elbokit import train as train_mod
    from elbokit.errors import ElbokitError

    overrides = {"data": {"n": 300}, "model": {"hidden": [16]}, "objective": {"terms": terms},
                 "prior": {"name": prior}, "terms": options,
                 "train": {"max_epochs": 1, "batch_size": 50, "evaluate": False},
                 "output": {"out": str(tmp_path / "r")}}
    try:
        setup = train_mod.prepare(config.resolve(overrides=overrides))
    except ElbokitError:
        assert prior == "gmm" and (terms == "recon,kl" and options.get("kl", {}).get("estimator") == "analytic"
                                   or "free_bits" in options.get("kl", {}))
        return
    reads = train_mod._same_as_validation(setup)
    expected_kl = None if options.get("kl", {}).get("estimator") == "mc" or "free_bits" in options.get("kl", {}) \
        or "kl" not in setup.objective.terms else "kl"
    assert reads == ("recon", expected_kl)
    fast = train_mod.validation_metrics(setup, setup.splits["val"], 3)
    original = train_mod._same_as_validation
    train_mod._same_as_validation = lambda s: (None, None)  # compute recon and kl apart, as before
    try:
        apart = train_mod.validation_metrics(setup, setup.splits["val"], 3)
    finally:
        train_mod._same_as_validation = original
    assert fast == apart
