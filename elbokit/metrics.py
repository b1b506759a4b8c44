"""The one table of metric names: what each number elbokit reports is, its sign, its units,
whether it is a bound or an estimate, and where its standard error is.

Every place that shows or stores a number takes its name from here: the per-epoch records
of metrics.jsonl, `elbokit evaluate` (table and --json), the `test` section of summary.json,
benchmark columns, `elbokit runs` and the MLflow logger. One quantity has one name and one
sign everywhere. In particular a term's **loss contribution** is never named like the
quantity it estimates: the `entropy` term contributes -H[q(z)] to the loss, logged as
`train_loss_entropy`, while the held-out estimate of H[q(z)] itself (positive sign, nats) is
`aggregate_entropy`.

Run directories written before these names existed are read through `ALIASES` (old name ->
new name) and `flat_record` / `normalize_report` / `normalize_summary`, which accept both.

This module imports neither torch nor numpy: listings use it without the cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "Metric", "METRICS", "EVALUATION", "TRAINING", "SUMMARY", "ALIASES", "TERM_LOSS_PREFIX",
    "metric", "canonical", "term_loss_name", "term_loss_metric", "flat_record", "normalize_report",
    "normalize_summary", "flat_summary", "summary_columns", "term_losses", "range_note", "range_notes", "as_table",
]

NATS_DATA = "nats per example, original data units"
NATS_MODEL = "nats per example, model (standardised) space"
NATS_LATENT = "nats per example, latent space"
_SHORT_UNITS = {NATS_DATA: "nats, data", NATS_MODEL: "nats, model", NATS_LATENT: "nats, latent",
                "squared original data units": "data units^2", "squared model-space units": "model units^2",
                "mixed (squared model units + nats)": "mixed"}


@dataclass(frozen=True)
class Metric:
    """One reported quantity.

    name: the one name, in every file and output; label: how a table shows it;
    description: what it is (the maths); units; kind: `lower bound`, `exact`, `estimate`,
    `loss`, `check`, `count`, `not a bound`, `setting`; better: `higher`, `lower` or None
    (no direction: a diagnostic); se: the name of its standard-error field, or None;
    low/high: the true range of the quantity (None: unbounded on that side); an estimate
    can leave it by its error, which `range_note` says.
    """

    name: str
    label: str
    description: str
    units: str
    kind: str
    better: str | None = None
    se: str | None = None
    low: float | None = None
    high: float | None = None
    note: str = ""
    groups: tuple[str, ...] = field(default=())

    @property
    def short_units(self) -> str:
        """The units in a few characters, for a table column (per example is implied)."""
        return _SHORT_UNITS.get(self.units, self.units)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "description": self.description, "units": self.units,
                "short_units": self.short_units, "kind": self.kind, "better": self.better, "se": self.se, "low": self.low, "high": self.high,
                "note": self.note}


def _eval(name: str, label: str, description: str, units: str, kind: str, better: str | None = None,
          se: bool = True, low: float | None = None, high: float | None = None, note: str = "") -> Metric:
    return Metric(name, label, description, units, kind, better, f"{name}_se" if se else None, low, high, note,
                  ("evaluate", "summary"))


# Held-out evaluation: `elbokit evaluate`, and summary.json's `test` section (the same report).
EVALUATION: dict[str, Metric] = {m.name: m for m in (
    _eval("elbo", "ELBO", "E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))", NATS_DATA, "lower bound", "higher",
          high=None, note="a lower bound on log p(x)"),
    _eval("iwae", "IWAE (K samples)", "log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x)", NATS_DATA,
          "lower bound", "higher", note="a lower bound on log p(x), at least the ELBO in expectation"),
    _eval("exact_loglik", "exact log p(x)", "log N(x; 0, W^T W + s^2 I) of the `gaussian` generator",
          NATS_DATA, "exact", "higher"),
    _eval("recon", "reconstruction -E log p(x|z)", "-E_q(z|x)[log p(x|z)], the `recon` term's quantity",
          NATS_DATA, "estimate", "lower"),
    _eval("kl", "KL(q(z|x) || p(z))", "E_x KL(q(z|x) || p(z)), analytic where torch has a closed form down to the base distributions",
          NATS_LATENT, "estimate", "lower", low=0.0,
          note="exact when kl_estimator is analytic; a Monte-Carlo KL can fall below 0 by its error"),
    _eval("mi", "I_q(x; z)", "mutual information of the aggregate posterior of the N evaluated points",
          NATS_LATENT, "estimate", None, low=0.0,
          note="at most mi_max = log N; compare at equal N"),
    _eval("marginal_kl", "KL(q(z) || p(z))", "aggregate_cross_entropy - aggregate_entropy", NATS_LATENT,
          "estimate", "lower", low=0.0,
          note="a difference of two Monte-Carlo (or k-NN) estimates: it can print below 0 by its error"),
    _eval("aggregate_entropy", "H[q(z)]", "entropy of the aggregate posterior q(z) = (1/N) sum_n q(z|x_n), "
          "exact mixture density (the `entropy` term's loss contribution is its negative)",
          NATS_LATENT, "estimate", None),
    _eval("aggregate_cross_entropy", "H[q(z), p(z)]", "cross-entropy of the aggregate posterior to the prior, "
          "-E_q(z) log p(z), or k-NN to prior samples for a sample-only prior", NATS_LATENT, "estimate", None),
    _eval("identity_gap", "kl - (mi + marginal_kl)", "zero up to Monte-Carlo error: a check of the numbers",
          NATS_LATENT, "check", None),
    _eval("mse", "MSE", "E||x - E[x|z]||^2, summed over data dimensions", "squared original data units",
          "estimate", "lower", low=0.0),
    _eval("active_units", "active units", "latent dimensions with Cov_x(E[z|x]) > 0.01 (Burda et al. 2016)",
          "latent dimensions", "count", None, se=False, low=0.0),
    _eval("latent_r2", "latent R^2 (CV)", "R^2 of a 5-fold cross-validated linear fit from "
          "E[z|x] to the true z", "fraction", "estimate", "higher", se=False, high=1.0),
    _eval("paper_mse", "paper MSE", "the paper's MSE: squared error in the standardised space",
          "squared model-space units", "paper's metric", None, low=0.0),
    _eval("paper_kld", "paper KLD", "the paper's KLD: the per-example KL, as kl", NATS_LATENT,
          "paper's metric", None, se=False),
    _eval("paper_elbo", "paper ELBO = -MSE - KLD", "-paper_mse - paper_kld, as the paper's Table II",
          "mixed (squared model units + nats)", "not a bound", None, se=False,
          note="not a bound and does not rank models"),
)}

# Per-epoch records (metrics.jsonl). Validation is in the model's (standardised) space.
TRAINING: dict[str, Metric] = {m.name: m for m in (
    Metric("epoch", "epoch", "epochs completed", "count", "counter", groups=("train",)),
    Metric("step", "step", "optimiser steps completed", "count", "counter", groups=("train",)),
    Metric("seconds", "seconds", "training wall time so far (all processes of the run)", "seconds", "counter",
           groups=("train",)),
    Metric("train_loss", "train loss", "the weighted sum of the terms' loss contributions, mean over the epoch's "
           "batches", NATS_MODEL, "loss", "lower",
           note="the training objective: a bound only when the terms and weights form -ELBO", groups=("train",)),
    Metric("val_loss", "val loss", "the objective's loss on the validation split", NATS_MODEL, "loss", "lower",
           groups=("train",)),
    Metric("val_recon", "val recon", "-E log p(x|z) on the validation split, one z per example", NATS_MODEL,
           "estimate", "lower", groups=("train",)),
    Metric("val_kl", "val KL(q(z|x) || p(z))", "KL to the prior on the validation split (analytic where "
           "registered, else one Monte-Carlo sample)", NATS_LATENT, "estimate", "lower", low=0.0,
           groups=("train",)),
    Metric("val_neg_elbo", "val -ELBO", "val_recon + val_kl: -ELBO on the validation split", NATS_MODEL,
           "loss", "lower", note="an upper bound on -log p(x) in the model space, one-sample estimate",
           groups=("train",)),
    Metric("lr", "learning rate", "the optimiser's learning rate at the end of the epoch (after the schedule's "
           "step): the one the next step uses", "learning rate", "setting", groups=("train",)),
    Metric("best_val", "best val", "the best value of the selection metric so far (select_metric)", NATS_MODEL,
           "loss", "lower", groups=("train", "summary")),
    Metric("best_epoch", "best epoch", "the epoch of best_val (the best checkpoint)", "count", "counter",
           groups=("train", "summary")),
)}

# The rest of summary.json (its `test` section holds EVALUATION).
SUMMARY: dict[str, Metric] = {m.name: m for m in (
    Metric("epochs", "epochs", "epochs trained", "count", "counter", groups=("summary",)),
    Metric("steps", "steps", "optimiser steps taken", "count", "counter", groups=("summary",)),
    Metric("train_seconds", "train seconds", "training wall time", "seconds", "counter", groups=("summary",)),
    Metric("steps_per_second", "steps/s", "optimiser steps per second of the last process", "steps per second",
           "counter", "higher", groups=("summary",)),
)}

TERM_LOSS_PREFIX = "train_loss_"

METRICS: dict[str, Metric] = {**EVALUATION, **TRAINING, **SUMMARY}

# Names used before this table existed -> their name now. Reading an old run goes through it.
ALIASES: dict[str, str] = {
    "entropy": "aggregate_entropy",  # evaluate's H[q(z)]; the `entropy` TERM's loss is train_loss_entropy
    "entropy_se": "aggregate_entropy_se",
    "cross_entropy": "aggregate_cross_entropy",
    "cross_entropy_se": "aggregate_cross_entropy_se",
    "cross_entropy_estimator": "aggregate_cross_entropy_estimator",
    "best_value": "best_val",
    "neg_elbo": "val_neg_elbo",
}

# The training loop's current record (nested) -> the table: {"train": {"loss", "terms": {t: v}},
# "val": {k: v}, "best_value", "select_metric": "neg_elbo" | "loss", ...}.
_LOOP_VAL = {"loss": "val_loss", "recon": "val_recon", "kl": "val_kl", "neg_elbo": "val_neg_elbo"}

# What each built-in term's loss contribution is (terms from plugins get a generic description).
_TERM_QUANTITY = {
    "recon": "-E log p(x|z)",
    "kl": "+KL(q(z|x) || p(z))",
    "infonce": "+I(x;z) by InfoNCE (a lower bound on I up to its constant)",
    "mi": "+I(x;z) by minibatch weighted sampling",
    "entropy": "-H[q(z)] by a minibatch estimator (the negative of the entropy)",
    "xent": "+H[q(z), p(z)]",
    "marginal-kl": "+KL(q(z) || p(z)) = -H[q(z)] + H[q(z), p(z)]",
}


def term_loss_name(term: str) -> str:
    """The name of term `term`'s loss contribution in the per-epoch records."""
    return f"{TERM_LOSS_PREFIX}{term}"


def term_loss_metric(term: str) -> Metric:
    """The table entry of a term's loss contribution (unweighted batch mean, ELBO sign)."""
    what = _TERM_QUANTITY.get(term, "its value as a loss contribution (lower is better)")
    return Metric(term_loss_name(term), f"train {term}",
                  f"loss contribution of term '{term}', unweighted, mean over the epoch's batches: {what}",
                  NATS_MODEL if term == "recon" else NATS_LATENT, "loss", "lower", groups=("train",))


WEIGHT_PREFIX = "weight_"


def weight_metric(term: str) -> Metric:
    """The table entry of a warmed-up term's effective weight (`[terms.NAME] warmup_steps`)."""
    return Metric(WEIGHT_PREFIX + term, f"weight {term}",
                  f"effective weight of term '{term}' at the epoch's last step: its weight times the warm-up "
                  "factor (written only for a term with a warm-up)", "dimensionless", "setting", groups=("train",))


def canonical(name: str) -> str:
    """The current name of `name` (old names through ALIASES; a split prefix is kept)."""
    if name in METRICS or name.startswith(TERM_LOSS_PREFIX):
        return name
    if name in ALIASES:
        return ALIASES[name]
    for prefix in ("test_", "val_"):
        if name.startswith(prefix) and name[len(prefix):] in ALIASES:
            return prefix + ALIASES[name[len(prefix):]]
    return name


def metric(name: str) -> Metric:
    """The table entry of `name`: a name of the table, an old name, `train_loss_<term>`,
    `<name>_se` (its standard error) or `test_<name>`/`val_<name>` for an evaluation metric
    of that split. KeyError for a name that is none of these."""
    name = canonical(name)
    if name in METRICS:
        return METRICS[name]
    if name.startswith(TERM_LOSS_PREFIX):
        return term_loss_metric(name[len(TERM_LOSS_PREFIX):])
    if name.startswith(WEIGHT_PREFIX):
        return weight_metric(name[len(WEIGHT_PREFIX):])
    if name.endswith("_se"):
        base = metric(name[:-3])
        if base.se is not None:
            return replace(base, name=name, label=f"SE of {base.label}", kind="standard error", better=None,
                           se=None, low=0.0, high=None, note="std / sqrt(N) over examples")
    for prefix in ("test_", "val_", "train_"):
        if name.startswith(prefix) and name[len(prefix):] in EVALUATION:
            return replace(EVALUATION[name[len(prefix):]], name=name)
    raise KeyError(name)


def _rename(mapping: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        new = ALIASES.get(key, key)
        if new in out and key != new:
            continue  # both spellings present: the current one wins
        out[new] = value
    return out


def normalize_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation report (evaluate --json or summary.json's `test`) with current names."""
    out = _rename(report)
    for key in ("units", "bounds", "unavailable", "notes"):
        if isinstance(out.get(key), Mapping):
            out[key] = {", ".join(ALIASES.get(p.strip(), p.strip()) for p in k.split(",")): v
                        for k, v in out[key].items()}
    return out


def normalize_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json with current names (its `test` report too; `select_metric` as a name of
    the table: `val_neg_elbo` or `val_loss`)."""
    out = _rename(summary)
    if isinstance(out.get("test"), Mapping):
        out["test"] = normalize_report(out["test"])
    if out.get("select_metric") in ("neg_elbo", "loss"):
        out["select_metric"] = f"val_{out['select_metric']}"
    return out


def flat_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """One per-epoch record with the table's names, flat: epoch, step, seconds, train_loss,
    train_loss_<term> for each term, val_loss, val_recon, val_kl, val_neg_elbo, best_val,
    best_epoch, improved and select_metric (a name of the table).

    Accepts the training loop's nested record ({"train": {"loss", "terms"}, "val": {...},
    "best_value", ...}, what metrics.jsonl holds in runs written so far) and a record already
    flat (returned with old names renamed). The loop writes `flat_record(record)` to adopt
    the table without changing what it computes."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "train" and isinstance(value, Mapping):
            if "loss" in value:
                out["train_loss"] = value["loss"]
            for term, v in (value.get("terms") or {}).items():
                out[term_loss_name(term)] = v
        elif key == "val" and isinstance(value, Mapping):
            for k, v in value.items():
                out[_LOOP_VAL.get(k, f"val_{k}")] = v
        elif key == "select_metric" and value in _LOOP_VAL:
            out[key] = _LOOP_VAL[value]
        else:
            new = ALIASES.get(key, key)
            if new not in out:
                out[new] = value
    return out


def term_losses(record: Mapping[str, Any]) -> dict[str, Any]:
    """{term: loss contribution} of a flat record."""
    return {k[len(TERM_LOSS_PREFIX):]: v for k, v in record.items() if k.startswith(TERM_LOSS_PREFIX)}


SUMMARY_TEST_COLUMNS = ("elbo", "iwae", "exact_loglik", "recon", "kl", "mi", "marginal_kl", "aggregate_entropy",
                        "aggregate_cross_entropy", "identity_gap", "mse", "active_units", "latent_r2")


def summary_columns(with_se: bool = True) -> list[str]:
    """The flat columns of a finished run, in order (benchmark tables, `elbokit runs`):
    training counters, best_val, then test_<metric> (and test_<metric>_se)."""
    cols = ["epochs", "steps", "best_epoch", "best_val", "train_seconds", "steps_per_second"]
    for name in SUMMARY_TEST_COLUMNS:
        cols.append(f"test_{name}")
        se = EVALUATION[name].se
        if with_se and se:
            cols.append(f"test_{se}")
    return cols


def flat_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json (old or new names) as one flat row: every column of `summary_columns()`
    (None where absent) plus select_metric; the test report's metrics become test_<name>."""
    s = normalize_summary(summary)
    test = s.get("test") or {}
    row: dict[str, Any] = {}
    for col in summary_columns():
        if col.startswith("test_"):
            row[col] = test.get(col[len("test_"):])
        else:
            row[col] = s.get(col)
    row["select_metric"] = s.get("select_metric")
    return row


def range_note(name: str, value: float | None, se: float | None = None, high: float | None = None) -> str | None:
    """A one-sentence note when the estimate `value` of metric `name` lies outside the
    quantity's true range (as `marginal_kl` below 0): by how many standard errors, and why.
    `high` replaces the table's upper end (`mi`: log N of the report). None when it is
    inside, or unknown."""
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    try:
        m = metric(name)
    except KeyError:
        return None
    side, bound = None, None
    m = replace(m, high=high) if high is not None else m
    if m.low is not None and value < m.low:
        side, bound = "below", m.low
    elif m.high is not None and value > m.high:
        side, bound = "above", m.high
    if side is None:
        return None
    gap = abs(value - bound)
    if se and se > 0:
        within = f"{gap / se:.1f} standard errors {side} it"
        verdict = ("estimator error" if gap <= 3 * se else
                   "more than 3 standard errors: a biased estimator or too few samples")
    else:
        within, verdict = f"{gap:.3g} {side} it", "estimator error"
    return (f"{name} = {value:.4g} is {side} {bound:g}, where {m.label} cannot be ({within}): {verdict}."
            + (f" {m.note[0].upper()}{m.note[1:]}." if m.note else ""))


def range_notes(report: Mapping[str, Any], names: Iterable[str] | None = None) -> dict[str, str]:
    """`range_note` for every metric of `report` (with its `_se`) that leaves its range."""
    notes = {}
    for name in names if names is not None else EVALUATION:
        m = METRICS.get(name)
        high = report.get("mi_max") if name == "mi" else None
        note = range_note(name, report.get(name), report.get(m.se) if m is not None and m.se else None, high)
        if note:
            notes[name] = note
    return notes


def as_table(groups: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The table as JSON-able rows (optionally only metrics of the given groups)."""
    wanted = set(groups) if groups is not None else None
    return [m.as_dict() | {"groups": list(m.groups)} for m in METRICS.values()
            if wanted is None or wanted & set(m.groups)]
