"""The component contract: what a prior and a term must do, checked in one place.

`elbokit.testing` (the kit plugin authors run) and `elbokit train` (before any run directory
is created) call the same functions here, so a component that passes the kit is never
refused by the command line, and the kit catches everything the command line refuses. A
failure is a `ContractError`: one line naming the component, the plugin that supplied it and
what was expected versus what came back (exit code 2 on the command line; the kit raises it
as an `AssertionError`).

- priors (`check_prior_contract`): `sample(n)` has shape (n, dim), dim the model's latent
  dimension, and is finite; `rsample(n)` works when `has_rsample` is declared; `log_prob` of
  its own samples has shape (n,) and is finite; and, where the prior can be sampled, has a
  `log_prob` and at most `DENSITY_CHECK_MAX_DIM` dimensions, exp(log_prob) integrates to 1
  by importance sampling (`check_density_matches_samples`): a log-density off by a constant
  is refused. The command line runs the density check on plugin priors only (the built-ins
  are tested in elbokit's own suite); set ELBOKIT_NO_DENSITY_CHECK=1 to skip it.
- terms (`check_term_output`, through `check_objective`): each term returns a scalar or one
  value per example, shape (B,), finite, and reads only the `Batch` fields its `needs`
  declare (`x_recon`; `x_pos`, `posterior_pos`, `z_pos` for `positives`; `dataset_size`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import distributions as D

from .batch import Batch
from .errors import ElbokitError
from .ops import pairwise_gaussian_log_density

DENSITY_CHECK_MAX_DIM = 10  # the range where the importance-sampling check is reliable
NO_DENSITY_CHECK_ENV = "ELBOKIT_NO_DENSITY_CHECK"

# Optional Batch fields and the need that must be declared to read each.
FIELD_NEEDS = {"x_recon": "x_recon", "x_pos": "positives", "posterior_pos": "positives",
               "z_pos": "positives", "dataset_size": "dataset_size"}


class ContractError(ElbokitError):
    """A component that breaks its contract: one line naming it, its plugin, expected vs got."""


class UndeclaredFieldError(ContractError):
    """A term read a `Batch` field that its `needs` do not declare."""

    def __init__(self, field: str, need: str):
        super().__init__(f"reads batch.{field} but does not declare '{need}' in needs")
        self.field, self.need = field, need


def require(condition: Any, what: str, message: str) -> None:
    if not condition:
        raise ContractError(f"{what}: {message}")


def label_of(obj: Any, kind: str, registry: Any = None) -> str:
    """How a message names a component: `prior 'laplace' (plugin 'elbokit-laplace' 0.1.0)`."""
    entry = registry.entry_for(obj) if registry is not None else None
    if entry is not None:
        return entry.label
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{kind} '{getattr(cls, 'name', '') or cls.__name__}'"


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if torch.is_tensor(value) else type(value).__name__


# ----------------------------------------------------------------------------------- priors
def check_prior_samples(prior: Any, n: int, what: str, latent_dim: int | None = None) -> torch.Tensor:
    """`sample(n)`: a finite floating (n, dim) tensor, dim the latent dimension when given."""
    dim = prior.dim if latent_dim is None else latent_dim
    sample = prior.sample(n)
    require(torch.is_tensor(sample), what, f"sample(n) must return a tensor, got {type(sample).__name__}.")
    require(tuple(sample.shape) == (n, dim), what,
            f"sample({n}) must have shape ({n}, {dim}) (the latent dimension is {dim}), got {_shape(sample)}.")
    require(sample.is_floating_point(), what, f"samples must be floating point, got {sample.dtype}.")
    require(bool(torch.isfinite(sample).all()), what, "sample returned NaN or Inf.")
    return sample


def check_prior_rsample(prior: Any, what: str, n: int = 16) -> None:
    """Declared `has_rsample`: `rsample(n)` gives (n, dim) samples, with a gradient to the
    prior's parameters when it has any."""
    if not prior.has_rsample:
        return
    try:
        out = prior.rsample(n)
    except NotImplementedError:
        raise ContractError(f"{what}: has_rsample is True but rsample(n) is not implemented; implement rsample "
                            "(or distribution() with rsample), or set has_rsample = False.") from None
    require(torch.is_tensor(out) and tuple(out.shape) == (n, prior.dim), what,
            f"rsample({n}) must have shape ({n}, {prior.dim}), got {_shape(out)}.")
    if any(p.requires_grad for p in prior.parameters()):
        require(out.requires_grad, what, "has_rsample is True but rsample carries no gradient to its parameters; "
                "sample with rsample, or set has_rsample = False.")


def check_prior_log_prob(prior: Any, sample: torch.Tensor, what: str) -> torch.Tensor:
    """`log_prob` of the prior's own samples: shape (n,) and finite."""
    n, dim = sample.shape
    lp = prior.log_prob(sample)
    require(torch.is_tensor(lp) and tuple(lp.shape) == (n,), what,
            f"log_prob of ({n}, {dim}) samples must have shape ({n},), one value per sample, got {_shape(lp)}.")
    require(bool(torch.isfinite(lp).all()), what, "log_prob is NaN or infinite at its own samples.")
    return lp


def check_prior_contract(prior: Any, *, what: str, latent_dim: int | None = None, n: int = 4000,
                         density: bool = True, z_threshold: float = 5.0) -> dict[str, Any]:
    """The prior part of the contract (see the module docstring). Runs under the caller's
    random state. Returns what it measured, and `notes` (e.g. the density check skipped)."""
    report: dict[str, Any] = {"notes": []}
    sample = check_prior_samples(prior, n, what, latent_dim)
    check_prior_rsample(prior, what)
    if not prior.has_log_prob:
        return report
    check_prior_log_prob(prior, sample, what)
    if not density:
        return report
    if prior.dim > DENSITY_CHECK_MAX_DIM:
        report["notes"].append(f"the normalisation check of {what} is skipped: it is reliable up to "
                               f"{DENSITY_CHECK_MAX_DIM} latent dimensions, this prior has {prior.dim}.")
        return report
    report.update(check_density_matches_samples(prior, n=n, z_threshold=z_threshold, what=what, moments=False))
    return report


def _proposal(reference: torch.Tensor) -> tuple[Callable[[int], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """A defensive importance-sampling proposal built from prior samples (float64): 45% a
    Gaussian kernel density estimate on the samples (follows multimodal priors), 45% a
    product of Student-t(3) at their median with twice their spread, and 10% a product of
    Cauchy distributions there (heavier tails than any prior whose tails are no heavier than a
    Cauchy's, so the weights p/q stay bounded). The spread is the median absolute deviation
    (x 1.4826, the standard deviation for a Gaussian), which a heavy-tailed prior does not blow up."""
    m, d = reference.shape
    loc = reference.median(0).values
    spread = ((reference - loc).abs().median(0).values * 1.4826).clamp_min(1e-6)
    bandwidth = spread * 1.5 * m ** (-1.0 / (d + 4))  # Scott's rule, widened
    parts = [(0.45, D.Independent(D.StudentT(3.0, loc, 2.0 * spread), 1)),
             (0.10, D.Independent(D.Cauchy(loc, 2.0 * spread), 1))]
    kde_scale = bandwidth.expand(m, d)

    def draw(count: int) -> torch.Tensor:
        out = reference[torch.randint(0, m, (count,))] + bandwidth * torch.randn(count, d, dtype=reference.dtype)
        u = torch.rand(count, 1)
        low = 0.45
        for weight, dist in parts:
            out = torch.where((u >= low) & (u < low + weight), dist.sample((count,)), out)
            low += weight
        return out

    def log_density(y: torch.Tensor) -> torch.Tensor:
        log_kde = torch.logsumexp(pairwise_gaussian_log_density(y, reference, kde_scale), dim=1) - math.log(m)
        terms = [log_kde + math.log(0.45)] + [dist.log_prob(y) + math.log(w) for w, dist in parts]
        return torch.logsumexp(torch.stack(terms), dim=0)

    return draw, log_density


def check_density_matches_samples(
    prior: Any,
    *,
    n: int = 4000,
    z_threshold: float = 5.0,
    min_ess_fraction: float = 0.02,
    what: str | None = None,
    moments: bool = True,
) -> dict[str, float]:
    """Check by importance sampling that `log_prob` is the normalised density of `sample`.

    With a proposal q built from 512 prior samples (`_proposal`) and y_1..y_n ~ q, the
    weights w = p(y)/q(y) give two checks that a wrong density fails:

    1. normalisation: mean(w) estimates the integral of p, which must be 1. A log_prob off by
       a constant c gives exp(c): the check fails when |log mean(w)| exceeds z_threshold of
       its standard errors plus 0.02 nats: with n = 4000 and a Gaussian prior, an error of
       0.1 nats fails in 1-2 dimensions, 0.15 nats in up to 5, 0.25 nats in 8, 1 nat always
       up to 10 (measured by benchmarks/bench_density_check.py; table in
       docs/writing-plugins.md).
    2. agreement with `sample`: for every coordinate, E_p[z_d] and E_p[z_d^2] from the
       self-normalised weights must match the same moments of n fresh prior samples within
       z_threshold standard errors: a density with the wrong location or scale (or samples
       from the wrong distribution) fails, even when it is normalised.

    `elbokit train` runs check 1 only (`moments=False`): a prior without finite moments (a
    Cauchy) is legitimate there; the kit runs both.

    The weights must not be degenerate (effective sample size at least `min_ess_fraction` of
    n): a log_prob far more peaked than the samples fails there. The check is meant for small
    latent dimensions (up to `DENSITY_CHECK_MAX_DIM`). Runs under the caller's random state.
    Returns log_normaliser, its standard error, the ESS fraction and the largest moment z-score.
    """
    what = what or f"prior '{prior.name}'"
    dtype = prior.sample(1).dtype
    with torch.no_grad():
        reference = prior.sample(512).to(torch.float64).cpu()
        draw, log_q = _proposal(reference)
        y = draw(n)
        log_w = prior.log_prob(y.to(device=prior.device, dtype=dtype)).to(torch.float64).cpu() - log_q(y)
        require(bool(torch.isfinite(log_w).all()), what,
                "log_prob is NaN or infinite at points near its samples (importance-sampling check).")
        log_mean_w = torch.logsumexp(log_w, 0) - math.log(n)
        w = torch.exp(log_w - log_w.max())
        ess_fraction = float(w.sum() ** 2 / (w * w).sum()) / n
        require(ess_fraction >= min_ess_fraction, what,
                f"log_prob does not match the spread of its samples: importance weights p/q are degenerate "
                f"(effective sample size {ess_fraction:.1%} of {n}); is log_prob far more peaked than sample?")
        rel_se = float(w.std() / (w.mean() * math.sqrt(n)))
        log_norm = float(log_mean_w)
        tolerance = z_threshold * rel_se + 0.02
        require(abs(log_norm) <= tolerance, what,
                f"log_prob is not normalised: the integral of exp(log_prob) is estimated as exp({log_norm:.3f}) "
                f"(expected exp(0), tolerance +-{tolerance:.3f} in log); is a constant missing from log_prob?")
        fresh = prior.sample(n).to(torch.float64).cpu() if moments else y
        weights = w / w.sum()
        worst = 0.0
        for label, f_y, f_p in (("mean", y, fresh), ("second moment", y * y, fresh * fresh)) if moments else ():
            is_mean = (weights[:, None] * f_y).sum(0)
            is_se = ((weights[:, None] ** 2) * (f_y - is_mean) ** 2).sum(0).sqrt()
            mc_mean, mc_se = f_p.mean(0), f_p.std(0) / math.sqrt(n)
            zscores = (is_mean - mc_mean).abs() / (is_se**2 + mc_se**2).sqrt().clamp_min(1e-12)
            d = int(zscores.argmax())
            worst = max(worst, float(zscores[d]))
            require(float(zscores[d]) <= z_threshold, what,
                    f"log_prob and sample disagree: the {label} of coordinate {d} is {float(is_mean[d]):.4f} under "
                    f"log_prob (importance sampling) but {float(mc_mean[d]):.4f} from sample "
                    f"({float(zscores[d]):.1f} standard errors apart).")
    return {"log_normaliser": log_norm, "log_normaliser_se": rel_se, "ess_fraction": ess_fraction,
            "max_moment_zscore": worst}


# ------------------------------------------------------------------------------------ terms
class _GuardedBatch(Batch):
    """A Batch whose optional fields can be read only when declared in `needs`."""

    def __getattribute__(self, name: str) -> Any:
        need = FIELD_NEEDS.get(name)
        if need is not None:
            declared = object.__getattribute__(self, "__dict__").get("_declared")
            if declared is not None and need not in declared:
                raise UndeclaredFieldError(name, need)
        return object.__getattribute__(self, name)


def guarded(batch: Batch, needs: frozenset[str]) -> Batch:
    """`batch` as a term declaring `needs` may see it: reading an undeclared optional field
    (x_recon, x_pos, posterior_pos, z_pos, dataset_size) raises `UndeclaredFieldError`."""
    values = {f.name: object.__getattribute__(batch, f.name) for f in fields(Batch)}
    out = _GuardedBatch(**values)
    out.__dict__["_declared"] = frozenset(needs)
    return out


def term_label(name: str, term: Any, registry: Any = None) -> str:
    """`term 'tc' (plugin 'elbokit-tc' 0.2.0)`, with its estimator when it has one."""
    label = label_of(term, "term", registry)
    if not label.startswith(f"term '{name}'"):
        label = f"term '{name}'"
    estimator = getattr(term, "estimator", None)
    if estimator is not None:
        label += " with " + label_of(estimator, "estimator", registry)
    return label


def check_term_output(value: Any, batch_size: int, what: str) -> None:
    """A term returns a scalar or one value per example, shape (B,), all finite."""
    require(torch.is_tensor(value) and tuple(value.shape) in ((), (batch_size,)), what,
            f"must return one loss value per example, shape ({batch_size},) for a batch of {batch_size} (or a "
            f"scalar), got {_shape(value)}.")
    require(bool(torch.isfinite(value).all()), what, f"returned NaN or Inf on a batch of {batch_size}.")


def run_term(name: str, term: Any, batch: Batch, prior: Any, registry: Any = None) -> torch.Tensor:
    """Run one term on `batch` limited to what it declares, and check its output."""
    what = term_label(name, term, registry)
    try:
        value = term(guarded(batch, term.all_needs()), prior)
    except UndeclaredFieldError as exc:
        raise ContractError(f"{what}: {exc}; add it to `needs` (see elbokit.NEEDS) so that the objective "
                            "can check the data provides it.") from None
    check_term_output(value, batch.size, what)
    return value


# ---------------------------------------------------------------------------- the objective
def density_check_enabled() -> bool:
    return os.environ.get(NO_DENSITY_CHECK_ENV, "") in ("", "0")


def check_objective(objective: Any, batch: Batch, *, registry: Any = None, n: int = 4000,
                    density: bool | None = None, seed: int = 0) -> list[str]:
    """The contract checks that run when an objective is built, on a small `batch` from the
    model (before any run directory exists): the prior (shapes, finiteness, rsample, and the
    normalisation check for a plugin prior of at most `DENSITY_CHECK_MAX_DIM` dimensions
    unless `density` is False or ELBOKIT_NO_DENSITY_CHECK=1), then every term. Raises
    `ContractError`; returns notes (a check that was skipped, and why). Runs under its own
    seed and leaves the caller's random state alone, so a run's numbers do not change."""
    prior = objective.prior
    entry = registry.entry_for(prior) if registry is not None else None
    builtin = entry is not None and entry.builtin
    if density is None:
        density = density_check_enabled() and not builtin
    devices = [batch.z.device] if batch.z.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        report = check_prior_contract(prior, what=label_of(prior, "prior", registry), latent_dim=batch.latent_dim,
                                      n=n if density else min(n, 256), density=density)
        for name, term in objective.terms.items():
            run_term(name, term, batch, prior, registry)
    return report["notes"]


def check_model_objective(model: Any, objective: Any, x: torch.Tensor, x_pos: torch.Tensor | None, *,
                          registry: Any = None, rows: int = 64, seed: int = 0) -> list[str]:
    """`check_objective` on a batch the model makes from the first `rows` rows of `x`."""
    rows = min(rows, x.shape[0])
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        batch = model(x[:rows], None if x_pos is None else x_pos[:rows], dataset_size=objective.dataset_size)
    return check_objective(objective, batch, registry=registry, seed=seed)


def plugin_suspects(objective: Any, registry: Any, term_name: str | None) -> str | None:
    """The plugin components that a non-finite `term_name` (None: any term) went through:
    the term, its estimator and the prior, those a plugin supplied; None if all are built-in."""
    if registry is None:
        return None
    terms = objective.terms if term_name is None else {term_name: objective.terms[term_name]}
    found: list[str] = []
    for term in terms.values():
        for component in (term, getattr(term, "estimator", None), objective.prior):
            entry = registry.entry_for(component) if component is not None else None
            if entry is not None and not entry.builtin and entry.label not in found:
                found.append(entry.label)
    return ", ".join(found) or None
