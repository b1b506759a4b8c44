"""`Objective`: weighted ELBO terms, checked against the prior and the data when built."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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
    (unweighted, detached: its reported value, the true one even where the term optimises a
    surrogate such as the kl term's free bits) and the per-example total loss (detached)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    per_example: torch.Tensor
    term_values: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Each term's reported value per example, shape (B,), detached (`terms` are their means)."""


WARMUP_KEYS = ("warmup", "warmup_steps", "warmup_ratio", "warmup_cycles")


@dataclasses.dataclass(frozen=True)
class WarmUp:
    """A term's weight annealed over optimiser steps (`[terms.NAME] warmup_steps`, `warmup`):
    the effective weight at global step t (0-based: the number of steps done before it) is
    weight * factor(t), a pure function of t, so a resumed run anneals exactly as an
    uninterrupted one.

    linear: factor(t) = min(1, t / steps) (0 at the first step, 1 from step `steps` on).
    cyclical (Fu et al. 2019, "Cyclical annealing schedule"): cycles of `steps` steps; within
    a cycle at position u = (t mod steps) / steps, factor = min(1, u / ratio) (a linear ramp
    over the first `ratio` of the cycle, then 1); after `cycles` cycles the factor stays 1."""

    kind: str = "linear"
    steps: int = 0
    ratio: float = 0.5
    cycles: int = 4

    def factor(self, step: int) -> float:
        if self.steps <= 0:
            return 1.0
        if self.kind == "linear":
            return min(1.0, step / self.steps)
        if step >= self.cycles * self.steps:
            return 1.0
        return min(1.0, (step % self.steps) / self.steps / self.ratio)

    @classmethod
    def from_options(cls, term: str, opts: dict[str, Any]) -> WarmUp | None:
        """Pop the warm-up keys of a term's options; None when the term has none."""
        given = {k: opts.pop(k) for k in WARMUP_KEYS if k in opts}
        if not given:
            return None
        kind = given.get("warmup", "linear")
        if kind not in ("linear", "cyclical"):
            raise ElbokitError(f"{term}.warmup must be linear or cyclical, got {kind!r}.")
        steps = given.get("warmup_steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ElbokitError(f"{term}.warmup_steps must be a whole number of optimiser steps >= 1, got {steps!r}.")
        ratio = given.get("warmup_ratio", 0.5)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ElbokitError(f"{term}.warmup_ratio must be a number in (0, 1], got {ratio!r}.")
        cycles = given.get("warmup_cycles", 4)
        if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
            raise ElbokitError(f"{term}.warmup_cycles must be a whole number >= 1, got {cycles!r}.")
        if kind == "linear" and ({"warmup_ratio", "warmup_cycles"} & set(given)):
            raise ElbokitError(f"{term}.warmup_ratio and {term}.warmup_cycles belong to warmup=cyclical.")
        return cls(kind, steps, float(ratio), cycles)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"warmup": self.kind, "warmup_steps": self.steps}
        if self.kind == "cyclical":
            out.update(warmup_ratio=self.ratio, warmup_cycles=self.cycles)
        return out


class Objective(nn.Module):
    """A weighted sum of terms: loss = sum_t w_t * mean_i term_t(i), in nats per example."""

    # Set by elbokit.distributed.use_global_batch in a run on several processes: evaluates the
    # batch-wide terms on the batch gathered from every process. None: every term sees `batch`.
    global_batch: Any = None

    def __init__(self, terms: Mapping[str, ElboTerm], weights: Mapping[str, float], prior: Prior,
                 dataset_size: int | None = None):
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)
        self.prior = prior
        self.dataset_size = dataset_size
        self.warmups: dict[str, WarmUp] = {}  # term -> its weight's warm-up (see WarmUp)
        # The optimiser steps done before the current one, set by the training loop before each
        # step: the warm-up factors are a function of it alone.
        self.global_step = 0

    def effective_weight(self, name: str, step: int | None = None) -> float:
        """The weight of term `name` at global step `step` (default: the current one)."""
        warm = self.warmups.get(name)
        weight = self.weights[name]
        return weight if warm is None else weight * warm.factor(self.global_step if step is None else step)

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
                    "have; draw them by augmentation (--positives gaussian:RADIUS, or shift:PIXELS for "
                    "images), give data with x_pos, or use the encoder critic (infonce.critic=encoder) "
                    "or the 'mi' term."
                )
            if "dataset_size" in needs and dataset_size is not None and dataset_size <= 0:
                raise IncompatibleError(f"Term '{name}'{est} needs the dataset size N > 0.")

    def forward(self, batch: Batch) -> ObjectiveOutput:
        if batch.dataset_size is None and self.dataset_size is not None:
            batch = dataclasses.replace(batch, dataset_size=self.dataset_size)
        total: torch.Tensor | None = None
        values: dict[str, torch.Tensor] = {}
        term_values: dict[str, torch.Tensor] = {}
        if self.global_batch is not None:  # several processes: see elbokit.distributed
            per_term = self.global_batch.evaluate(self, batch)
        else:
            per_term = {name: term.contributions(batch, self.prior) for name, term in self.terms.items()}
        for name, (value, per_example) in per_term.items():
            term_values[name] = value.detach()
            values[name] = term_values[name].mean()  # the reported value (see ElboTerm.contributions)
            weight = self.effective_weight(name)
            # Skipping "0 +" and "1 *" gives the same numbers with fewer operations per step.
            weighted = per_example if weight == 1 else weight * per_example
            total = weighted if total is None else total + weighted
        if total is None:
            total = batch.z.new_zeros(batch.size)
        return ObjectiveOutput(loss=total.mean(), terms=values, per_example=total.detach(), term_values=term_values)

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
    warmups: dict[str, WarmUp] = {}
    for name, weight in parsed:
        term_cls = registry.term(name)
        term_options = options.get(name, {})
        warm = WarmUp.from_options(name, term_options)
        if warm is not None:
            warmups[name] = warm
        # `weight` is accepted among a term's options (as in a config file); weights= wins.
        weight = term_options.pop("weight", weight)
        built[name] = make_term(term_cls, term_options, registry)
        final_weights[name] = _finite_weight(name, (weights or {}).get(name, weight))
    objective = Objective(built, final_weights, prior, dataset_size=dataset_size)
    objective.warmups = warmups
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
    """Instantiate a term and its estimator, routing options (see `build_objective`). Every
    value is checked against the declared option types first (see `option_specs`)."""
    opts = dict(opts)
    # A term that builds its own estimators (e.g. marginal-kl) takes `registry`: not a user option.
    term_specs = option_specs(term_cls, hidden=("registry", "estimator"))
    term_names = {s.name for s in term_specs}
    estimator = None
    if term_cls.quantity is not None:
        est_name = str(opts.pop("estimator", None) or term_cls.default_estimator)
        est_cls = registry.estimator(term_cls.quantity, est_name)
        est_specs = option_specs(est_cls)
        what = f"term '{term_cls.name}' with estimator '{est_name}'"
        listed = dict(valid=[*term_specs, *est_specs], extra=("estimator", "weight"))
        term_kwargs = coerce_options(what, term_specs, {k: v for k, v in opts.items() if k in term_names}, **listed)
        est_kwargs = coerce_options(what, est_specs, {k: v for k, v in opts.items() if k not in term_names}, **listed)
        try:
            estimator = est_cls(**est_kwargs)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ElbokitError):
                raise
            raise ElbokitError(f"Bad option for estimator '{est_name}' of term '{term_cls.name}': {exc}") from None
    else:
        term_kwargs = coerce_options(f"term '{term_cls.name}'", term_specs, opts, extra=("weight",))
    if "registry" in _accepted(term_cls):
        term_kwargs["registry"] = registry
    try:
        return term_cls(estimator=estimator, **term_kwargs) if term_cls.quantity is not None else term_cls(**term_kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ElbokitError):
            raise
        raise ElbokitError(f"Bad option for term '{term_cls.name}': {exc}") from None


def _accepted(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


# -- option declarations ------------------------------------------------------------------
_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class OptionSpec:
    """One option of a term, prior, estimator or dataset, read from its declaration:
    the keyword arguments of `__init__` (a dataset: of its loader), their annotations and
    defaults, and the optional `option_help = {"name": "one line"}` of the class (or loader)."""

    name: str
    type: Any  # the annotation (None when untyped: the value is passed as given)
    default: Any  # OptionSpec.REQUIRED when there is none
    help: str = ""

    REQUIRED: ClassVar[Any] = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    @property
    def type_text(self) -> str:
        return type_text(self.type)

    def describe(self) -> str:
        """`n_components (int | None, default 3)`: how error messages list an option."""
        bits = [self.type_text] if self.type is not None else []
        bits.append("required" if self.required else f"default {self.default!r}")
        return f"{self.name} ({', '.join(bits)})"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_text if self.type is not None else None,
                "default": None if self.required else self.default, "required": self.required, "help": self.help}


def option_specs(component: Any, *, hidden: Sequence[str] = ()) -> list[OptionSpec]:
    """The declared options of a component class (its `__init__`) or a dataset loader (a
    function): name, type, default and help, in signature order. `*args`/`**kwargs` and
    `hidden` names (those elbokit fills in itself) are left out. A parameter without an
    annotation (or annotated `Any`) is untyped: its value is passed as given."""
    func = component.__init__ if isinstance(component, type) else component
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return []
    hints = _type_hints(func)
    helps = getattr(component, "option_help", None) or {}
    out = []
    for name, p in params.items():
        if name == "self" or name in hidden or p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        annotation = hints.get(name)
        if annotation is Any:
            annotation = None
        out.append(OptionSpec(name, annotation, p.default, str(helps.get(name, ""))))
    return out


def _type_hints(func: Any) -> dict[str, Any]:
    """Annotations resolved to types; one that cannot be resolved counts as untyped."""
    try:
        return typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - a forward reference elbokit cannot see: resolve one by one
        pass
    out = {}
    globalns = getattr(func, "__globals__", {})
    for name, annotation in getattr(func, "__annotations__", {}).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, dict(globalns))  # noqa: S307 - the plugin's own annotation
            except Exception:  # noqa: BLE001
                continue
        out[name] = annotation
    return out


def type_text(annotation: Any) -> str:
    """`int`, `int | None`, `one of 'mse', 'gaussian'`: an annotation as users read it."""
    if annotation is None:
        return "any"
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


class _NoMatch(Exception):
    pass


def _coerce(annotation: Any, value: Any) -> Any:
    """`value` as `annotation` (numbers from strings, an integral float as int); raise
    _NoMatch when it cannot be. Types elbokit does not know (arrays, tensors, classes) pass."""
    if annotation is None or annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        for member in members:  # an exact match first: 3 stays an int in `int | float`
            if member is type(None) and value is None:
                return None
            if isinstance(member, type) and type(value) is member:
                return value
        for member in members:
            try:
                return _coerce(member, value)
            except _NoMatch:
                continue
        raise _NoMatch
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise _NoMatch
    if annotation is type(None):
        if value is None:
            return None
        raise _NoMatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _NoMatch
    if annotation is int:
        if isinstance(value, bool):
            raise _NoMatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _NoMatch from None
        raise _NoMatch
    if annotation is float:
        if isinstance(value, bool):
            raise _NoMatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _NoMatch from None
        raise _NoMatch
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _NoMatch
    return value


def coerce_options(what: str, specs: Sequence[OptionSpec], values: Mapping[str, Any], *,
                   valid: Sequence[OptionSpec] | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Check `values` against the declared options of `what` (e.g. "prior 'gmm'"): an unknown
    option or a value of the wrong type is one `ElbokitError` line that lists the valid options
    with their types; returns the values converted to the declared types. `valid`: the options
    to list (default `specs`); `extra`: names accepted elsewhere (`estimator`, `weight`)."""
    by_name = {s.name: s for s in specs}
    listed = list(valid if valid is not None else specs)

    def options_text() -> str:
        names = [s.describe() for s in listed] + list(extra)
        return ", ".join(names) or "(none)"

    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in extra:
            continue
        spec = by_name.get(key)
        if spec is None:
            raise ElbokitError(f"Unknown option '{key}' for {what}. Valid options: {options_text()}.")
        try:
            out[key] = _coerce(spec.type, value)
        except _NoMatch:
            raise ElbokitError(f"Option '{key}' of {what} must be {type_text(spec.type)}, got {value!r}. "
                               f"Valid options: {options_text()}.") from None
    return out


def describe_needs(needs: frozenset[str]) -> list[str]:
    return [NEEDS.get(n, n) for n in sorted(needs)]
