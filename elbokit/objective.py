"""`Objective`: weighted ELBO terms, checked against the prior and the data when built."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batch import Batch
from .errors import ElbokitError, IncompatibleError
from .estimators import NEEDS
from .priors import Prior
from .terms import ElboTerm

PRESETS: dict[str, str] = {
    "classic": "recon,kl",
    "ed": "recon,infonce,entropy,xent",
}

_TERM_ITEM = re.compile(r"^([a-z][a-z0-9_-]*)(?::([^:]+))?$")


def parse_terms(spec: str | Sequence[str]) -> list[tuple[str, float]]:
    """Parse `--terms`: a preset (`classic`, `ed`) or comma-separated `name[:weight]` items,
    e.g. `recon,kl:0.5`. Returns [(name, weight)]. Raises ElbokitError on bad syntax."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if len(items) == 1 and str(items[0]).strip() in PRESETS:
        items = PRESETS[str(items[0]).strip()].split(",")
    parsed: list[tuple[str, float]] = []
    if not items or all(not str(i).strip() for i in items):
        raise ElbokitError("--terms is empty: give a preset (classic, ed) or names like recon,kl.")
    for raw in items:
        item = str(raw).strip()
        match = _TERM_ITEM.match(item)
        if not match:
            raise ElbokitError(
                f"Cannot read term {item!r} in --terms: write comma-separated name[:weight] "
                "items, e.g. recon,kl:0.5."
            )
        name, weight_text = match.group(1), match.group(2)
        weight = 1.0
        if weight_text is not None:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ElbokitError(f"The weight of term '{name}' must be a number, got {weight_text!r}.") from None
            if not math.isfinite(weight):
                raise ElbokitError(f"The weight of term '{name}' must be finite, got {weight_text!r}.")
        if name in PRESETS:
            raise ElbokitError(f"Preset '{name}' cannot be mixed with other terms; use it alone.")
        if any(name == n for n, _ in parsed):
            raise ElbokitError(f"Term '{name}' appears twice in --terms; give it once with a weight.")
        parsed.append((name, weight))
    return parsed


@dataclass
class ObjectiveOutput:
    """The differentiable `loss` (scalar) and, for reporting, each term's batch mean
    (unweighted, detached) and the per-example total (detached)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    per_example: torch.Tensor


class Objective(nn.Module):
    """A weighted sum of terms: loss = sum_t w_t * mean_i term_t(i), in nats per example."""

    def __init__(self, terms: Mapping[str, ElboTerm], weights: Mapping[str, float], prior: Prior,
                 dataset_size: int | None = None):
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)
        self.prior = prior
        self.dataset_size = dataset_size

    @property
    def term_names(self) -> list[str]:
        return list(self.terms.keys())

    def needs(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for term in self.terms.values():
            out |= term.all_needs()
        return out

    def check(self, *, has_positives: bool | None = None, dataset_size: int | None = None) -> None:
        """Refuse, with one sentence, any term the prior or data cannot serve. `None` means
        'not known yet' for the data; those needs are checked again on the first batch."""
        for name, term in self.terms.items():
            needs = term.all_needs()
            est = f" (estimator '{term.estimator.name}')" if term.estimator is not None else ""
            if "prior_log_prob" in needs and not self.prior.has_log_prob:
                raise IncompatibleError(
                    f"Term '{name}'{est} needs the prior's log_prob, which prior "
                    f"'{self.prior.name}' does not have; {_alternative(name)}"
                )
            reason = term.check_prior(self.prior)
            if reason:
                raise IncompatibleError(f"Term '{name}'{est}: {reason}")
            if "positives" in needs and has_positives is False:
                raise IncompatibleError(
                    f"Term '{name}'{est} needs positive pairs (x, x+), which this data does not "
                    "have; give data with x_pos, or use the encoder critic (infonce.critic=encoder) "
                    "or the 'mi' term."
                )
            if "dataset_size" in needs and dataset_size is not None and dataset_size <= 0:
                raise IncompatibleError(f"Term '{name}'{est} needs the dataset size N > 0.")

    def forward(self, batch: Batch) -> ObjectiveOutput:
        if batch.dataset_size is None and self.dataset_size is not None:
            batch = dataclasses.replace(batch, dataset_size=self.dataset_size)
        total = batch.z.new_zeros(batch.size)
        values: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            per_example = term(batch, self.prior)
            values[name] = per_example.detach().mean()
            total = total + self.weights[name] * per_example
        return ObjectiveOutput(loss=total.mean(), terms=values, per_example=total.detach())

    def reconstruction_likelihood(self) -> nn.Module | None:
        """The likelihood of the first term that has one (the `recon` term), else None."""
        for term in self.terms.values():
            lik = getattr(term, "likelihood", None)
            if lik is not None:
                return lik
        return None


def _alternative(term_name: str) -> str:
    if term_name in ("xent", "marginal-kl", "entropy"):
        return "use the knn estimator (e.g. xent.estimator=knn), or a prior with a density such as 'gmm'."
    if term_name == "kl":
        return "use the 'ed' terms with xent.estimator=knn, or a prior with a density such as 'gmm'."
    return "use a prior with a density such as 'gmm' (fitted to the same samples)."


def build_objective(
    terms: str | Sequence[str] = "classic",
    prior: Prior | None = None,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    weights: Mapping[str, float] | None = None,
    dataset_size: int | None = None,
    has_positives: bool | None = None,
    registry: Any = None,
) -> Objective:
    """Build an `Objective` from term names, a prior and per-term options.

    terms: a preset (`classic`, `ed`), `"recon,kl:0.5"` or a list of names.
    options: `{term: {option: value}}`; the key `estimator` picks the term's estimator by name,
    keys the term's constructor accepts go to the term (e.g. `recon.likelihood`), the rest to
    the estimator (e.g. `infonce.critic`, `infonce.temperature`, `entropy.k`).
    weights: per-term weights, overriding the ones written in `terms`.
    dataset_size, has_positives: what the data provides; checked now when given.
    """
    from .plugins import get_registry

    registry = registry or get_registry()
    if prior is None:
        raise ElbokitError("build_objective needs a prior, e.g. elbokit.make_prior('standard-normal', dim=5).")
    parsed = parse_terms(terms)
    options = {k: dict(v) for k, v in (options or {}).items()}
    names = [n for n, _ in parsed]
    for key in options:
        if key not in names:
            raise ElbokitError(f"Options were given for term '{key}', which is not among the terms ({', '.join(names)}).")
    for key in weights or {}:
        if key not in names:
            raise ElbokitError(f"A weight was given for term '{key}', which is not among the terms ({', '.join(names)}).")
    built: dict[str, ElboTerm] = {}
    final_weights: dict[str, float] = {}
    for name, weight in parsed:
        term_cls = registry.term(name)
        term_options = options.get(name, {})
        # `weight` is accepted among a term's options (as in a config file); weights= wins.
        weight = term_options.pop("weight", weight)
        built[name] = make_term(term_cls, term_options, registry)
        final_weights[name] = _finite_weight(name, (weights or {}).get(name, weight))
    objective = Objective(built, final_weights, prior, dataset_size=dataset_size)
    objective.check(has_positives=has_positives, dataset_size=dataset_size)
    return objective


def _finite_weight(name: str, value: Any) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ElbokitError(f"The weight of term '{name}' must be a number, got {value!r}.") from None
    if not math.isfinite(weight):
        raise ElbokitError(f"The weight of term '{name}' must be finite, got {value!r}.")
    return weight


def make_term(term_cls: type[ElboTerm], opts: Mapping[str, Any], registry: Any) -> ElboTerm:
    """Instantiate a term and its estimator, routing options (see `build_objective`)."""
    opts = dict(opts)
    # A term that builds its own estimators (e.g. marginal-kl) takes `registry`: not a user option.
    term_params = _accepted(term_cls) - {"registry"}
    term_kwargs = {k: opts.pop(k) for k in list(opts) if k in term_params and k != "estimator"}
    if "registry" in _accepted(term_cls):
        term_kwargs["registry"] = registry
    estimator = None
    if term_cls.quantity is not None:
        est_name = opts.pop("estimator", None) or term_cls.default_estimator
        est_cls = registry.estimator(term_cls.quantity, est_name)
        est_params = _accepted(est_cls)
        bad = [k for k in opts if k not in est_params]
        if bad:
            valid = sorted((term_params - {"estimator"}) | est_params | {"estimator", "weight"})
            raise ElbokitError(
                f"Unknown option '{bad[0]}' for term '{term_cls.name}' with estimator "
                f"'{est_name}'. Valid options: {', '.join(valid)}."
            )
        est_kwargs = dict(opts)
        try:
            estimator = est_cls(**est_kwargs)
        except (TypeError, ValueError) as exc:
            raise ElbokitError(f"Bad option for estimator '{est_name}' of term '{term_cls.name}': {exc}") from None
    elif opts:
        key = next(iter(opts))
        valid = sorted(term_params - {"estimator"}) or ["(none)"]
        raise ElbokitError(f"Unknown option '{key}' for term '{term_cls.name}'. Valid options: {', '.join(valid)}.")
    try:
        return term_cls(estimator=estimator, **term_kwargs) if term_cls.quantity is not None else term_cls(**term_kwargs)
    except (TypeError, ValueError) as exc:
        raise ElbokitError(f"Bad option for term '{term_cls.name}': {exc}") from None


def _accepted(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def describe_needs(needs: frozenset[str]) -> list[str]:
    return [NEEDS.get(n, n) for n in sorted(needs)]
