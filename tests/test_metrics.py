"""The one table of metric names: every number of every output has a name in it, one sign,
and old run directories are read through the alias map."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from elbokit import metrics

ROOT = Path(__file__).resolve().parents[1]
# Report fields that are settings or descriptions, not metrics.
REPORT_INFO = {"n", "iw_samples", "seed", "mi_max", "latent_dim", "seconds", "split", "data", "run_dir",
               "checkpoint", "kl_estimator", "aggregate_cross_entropy_estimator", "aggregate_estimator", "latent_r2_method", "units",
               "bounds", "unavailable", "notes"}


@pytest.fixture(scope="module")
def ed_run(tmp_path_factory):
    """`elbokit train --terms ed` for 3 epochs on small data: a real metrics.jsonl and summary."""
    from elbokit.cli import main

    out = tmp_path_factory.mktemp("runs") / "ed"
    code = main(["train", "--data", "mixture", "--n", "600", "--hidden", "16", "--max-epochs", "3",
                 "--batch-size", "128", "--terms", "ed", "--prior", "gmm", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def _records(run_dir):
    from elbokit.run import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def test_every_field_of_every_output_is_in_the_table(ed_run):
    """A metric added to the loop, the summary or evaluate without a table entry fails here."""
    for record in _records(ed_run):
        for name in metrics.flat_record(record):
            if name in ("improved", "select_metric"):
                continue
            assert metrics.metric(name).name == name
    summary = metrics.normalize_summary(json.loads((ed_run / "summary.json").read_text()))
    for name, value in summary["test"].items():
        if name not in REPORT_INFO:
            assert metrics.metric(name), name
    assert summary["select_metric"] in metrics.METRICS
    for name, value in metrics.flat_summary(summary).items():
        if name != "select_metric":
            metrics.metric(name)


def test_term_losses_carry_the_elbo_sign_and_sum_to_the_loss(ed_run):
    """train_loss is the weighted (here unit-weight) sum of the term losses, each with the
    ELBO's sign; -train_loss_entropy is an entropy estimate, so the entropy term's
    contribution and evaluate's aggregate_entropy have opposite signs, by name."""
    summary = json.loads((ed_run / "summary.json").read_text())
    for record in map(metrics.flat_record, _records(ed_run)):
        terms = metrics.term_losses(record)
        assert set(terms) == {"recon", "infonce", "entropy", "xent"}
        assert record["train_loss"] == pytest.approx(sum(terms.values()), rel=1e-5, abs=1e-5)
        assert record["val_neg_elbo"] == pytest.approx(record["val_recon"] + record["val_kl"], rel=1e-9)
        assert record["select_metric"] == "val_neg_elbo"
        assert record[record["select_metric"]] >= record["best_val"] - 1e-12
    entropy = metrics.metric("train_loss_entropy")
    assert "-H[q(z)]" in entropy.description and entropy.better == "lower"
    assert "H[q(z)]" == metrics.metric("aggregate_entropy").label
    test = summary["test"]
    assert test["marginal_kl"] == pytest.approx(test["aggregate_cross_entropy"] - test["aggregate_entropy"], abs=1e-9)


def test_summary_and_evaluate_agree_on_names_and_values(ed_run, run_cli):
    """The same quantity has the same name and value in summary.json and `evaluate --json`
    (same checkpoint, split, K and seed)."""
    summary = metrics.flat_summary(json.loads((ed_run / "summary.json").read_text()))
    result = run_cli("evaluate", ed_run, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for column in metrics.summary_columns():
        if column.startswith("test_"):
            name = column[len("test_"):]
            assert report[name] == pytest.approx(summary[column], rel=1e-9, nan_ok=True) \
                if report[name] is not None else summary[column] is None, column


def test_old_run_directories_are_read_with_the_new_names(ed_run, tmp_path):
    """A summary and records written with the names used before the table (evaluate's
    `entropy`, `cross_entropy`; the loop's nested record and `best_value`) read back as now."""
    summary = json.loads((ed_run / "summary.json").read_text())
    old = dict(summary)
    old["test"] = {("entropy" if k == "aggregate_entropy" else "cross_entropy" if k == "aggregate_cross_entropy"
                    else "cross_entropy_se" if k == "aggregate_cross_entropy_se"
                    else "entropy_se" if k == "aggregate_entropy_se" else k): v for k, v in summary["test"].items()}
    old["select_metric"] = "neg_elbo"
    assert "aggregate_entropy" not in old["test"]
    new = metrics.normalize_summary(old)
    assert new["test"]["aggregate_entropy"] == summary["test"]["aggregate_entropy"]
    assert new["test"]["aggregate_cross_entropy_se"] == summary["test"]["aggregate_cross_entropy_se"]
    assert metrics.flat_summary(old) == metrics.flat_summary(summary)

    nested = {"epoch": 2, "step": 8, "train": {"loss": 3.0, "terms": {"recon": 5.0, "entropy": -2.0}},
              "val": {"recon": 4.0, "loss": 3.5, "kl": 1.5, "neg_elbo": 5.5}, "select_metric": "neg_elbo",
              "improved": True, "best_value": 5.5, "best_epoch": 2, "seconds": 1.25}
    flat = metrics.flat_record(nested)
    assert flat == {"epoch": 2, "step": 8, "train_loss": 3.0, "train_loss_recon": 5.0, "train_loss_entropy": -2.0,
                    "val_recon": 4.0, "val_loss": 3.5, "val_kl": 1.5, "val_neg_elbo": 5.5,
                    "select_metric": "val_neg_elbo", "improved": True, "best_val": 5.5, "best_epoch": 2,
                    "seconds": 1.25}
    assert metrics.flat_record(flat) == flat  # a record already in the table's names is kept


def test_canonical_and_metric_resolve_old_and_prefixed_names():
    assert metrics.canonical("entropy") == "aggregate_entropy"
    assert metrics.canonical("test_cross_entropy") == "test_aggregate_cross_entropy"
    assert metrics.canonical("train_loss_entropy") == "train_loss_entropy"  # a term, never renamed
    assert metrics.metric("test_elbo").kind == "lower bound"
    se = metrics.metric("test_marginal_kl_se")
    assert se.kind == "standard error" and se.low == 0.0
    assert metrics.metric("train_loss_my-plugin-term").better == "lower"
    with pytest.raises(KeyError):
        metrics.metric("no_such_metric")


@pytest.mark.parametrize("value, se, expected", [
    (-0.03, 0.02, r"below 0, .*1\.5 standard errors below it\): estimator error"),
    (-0.5, 0.02, r"more than 3 standard errors"),
    (0.01, 0.02, None),
])
def test_a_marginal_kl_below_zero_gets_a_note_with_its_se(value, se, expected):
    note = metrics.range_note("marginal_kl", value, se)
    if expected is None:
        assert note is None
    else:
        assert re.search(expected, note), note


def test_mi_above_log_n_is_noted():
    report = {"mi": 4.2, "mi_se": 0.01, "mi_max": math.log(60), "marginal_kl": 0.3, "marginal_kl_se": 0.1}
    notes = metrics.range_notes(report)
    assert set(notes) == {"mi"} and "above 4.09" in notes["mi"]


def test_evaluate_notes_a_negative_marginal_kl(truth_collapsed):
    """With an encoder that nearly ignores x, the aggregate posterior is within ~1e-6 nats of
    the prior while the Monte-Carlo error is ~1e-5: the estimate falls below 0 about half the
    time, and the report then carries a note, and never otherwise."""
    r = truth_collapsed
    assert abs(r["marginal_kl"]) <= 4 * r["marginal_kl_se"]
    assert ("marginal_kl" in r["notes"]) == (r["marginal_kl"] < 0)


@pytest.fixture(scope="module")
def truth_collapsed():
    """evaluate_model on an encoder that nearly ignores x: q(z|x) = N(0.001 x[:2], I), p(z) = N(0, I).
    The first report of six seeds whose marginal_kl is negative (else the first)."""
    import torch
    from torch import distributions as D

    from elbokit.evaluate import evaluate_model
    from elbokit.likelihoods import make_likelihood
    from elbokit import make_prior

    class Collapsed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(3))

        def encode(self, x):
            loc = 1e-3 * x[:, :2]
            return D.Independent(D.Normal(loc, torch.ones_like(loc)), 1)

        def decode(self, z):
            return self.bias.expand(z.shape[0], 3)

    prior = make_prior("standard-normal", dim=2)
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    results = [evaluate_model(Collapsed(), prior, make_likelihood("mse", 3), x, iw_samples=2, seed=s)
               for s in range(6)]
    negative = [r for r in results if r["marginal_kl"] < 0]
    return negative[0] if negative else results[0]


def test_docs_list_every_metric_name():
    text = (ROOT / "docs" / "metrics.md").read_text()
    tables, aliases = text.split("## Names used before this table")
    documented = set(re.findall(r"^\| `([a-z_0-9<>-]+)` \|", tables, flags=re.M))
    assert set(metrics.METRICS) | {"train_loss_<term>", "weight_<term>"} == documented
    for old, new in metrics.ALIASES.items():
        assert f"| `{old}` | `{new}` |" in aliases
