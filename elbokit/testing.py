"""Conformance checks that plugin authors call from their own tests.

    from elbokit.testing import check_estimator, check_prior, check_term

    def test_my_prior_conforms():
        check_prior(lambda: MyPrior(dim=2))

    def test_my_term_conforms():
        check_term(MyTerm, plugins=[my_plugin_module])

Each check runs the component the way elbokit will, raises `AssertionError` with a message
that names the component and what is wrong, and returns a dict of what it measured. The
checks need no test framework, are deterministic (seeded, without touching the global random
state) and take well under a second for small components.

The checks that `elbokit train` also runs before a run starts live in `elbokit.contracts`
and are called from here, so a component that passes these checks is never refused there:
sample shape and finiteness, `rsample` where `has_rsample` is declared, `log_prob` shape and
finiteness, the normalisation of `log_prob`, and each term's output (a scalar or (B,), finite,
reading only the `Batch` fields its `needs` declare). The kit checks more (moments, gradients,
`spec()`), and raises `AssertionError` where `elbokit train` prints one `Error:` line.

- `check_prior`: the flags, `sample` (shape, dtype, device, finite), `spec()` (JSON-able, and
  rebuilds a prior into which the `state_dict` loads), and `log_prob`: shape, finite,
  differentiable in z, equal to `distribution().log_prob`, raising `NotImplementedError` when
  `has_log_prob` is False, and consistent with `sample` by importance sampling (see
  `check_density_matches_samples`).
- `check_term` / `check_estimator`: name, docstring, declared needs; for each of three test
  priors (`standard-normal`, `gmm`, sample-only `samples`) the objective either refuses the
  component when it is built (it must when `prior_log_prob` is declared and the prior has no
  density) or runs it on a batch that holds only what the component declares: output a scalar
  or of shape (B,), finite, for two batch sizes, with gradients reaching the encoder's parameters.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

from . import contracts
from .batch import Batch, gaussian_posterior
from .errors import IncompatibleError, PluginError
from .estimators import NEEDS, QUANTITIES, SCOPES, Estimator
from .hookspecs import hookimpl
from .objective import Objective, build_objective
from .plugins import Registry, first_line
from .priors import Prior
from .terms import ElboTerm

__all__ = ["check_density_matches_samples", "check_estimator", "check_prior", "check_term"]

ESTIMATE_KINDS = ("exact", "lower bound", "upper bound", "estimate")


def _fail(what: str, message: str) -> None:
    raise AssertionError(f"{what}: {message}")


def _check(condition: Any, what: str, message: str) -> None:
    if not condition:
        _fail(what, message)


@contextlib.contextmanager
def _as_assertion() -> Iterator[None]:
    """The contract checks shared with `elbokit train` raise ContractError; the kit, AssertionError."""
    try:
        yield
    except contracts.ContractError as exc:
        raise AssertionError(str(exc)) from None


# ----------------------------------------------------------------------------------- priors
def check_prior(
    prior_or_factory: Prior | Callable[[], Prior],
    *,
    model: Any = None,
    n: int = 4000,
    seed: int = 0,
    z_threshold: float = 5.0,
) -> dict[str, Any]:
    """Check a prior (or a zero-argument factory that returns one, ready to use).

    `model`: passed to `attach` of the prior rebuilt from `spec()` (needed by priors that
    depend on the model, such as a VampPrior; give the model the factory attached).
    `n`: the Monte-Carlo sample size; `z_threshold`: how many standard errors a Monte-Carlo
    disagreement may reach before the check fails.
    Returns the measured numbers (see `check_density_matches_samples`).
    """
    prior = prior_or_factory() if not isinstance(prior_or_factory, Prior) and callable(prior_or_factory) else prior_or_factory
    _check(isinstance(prior, Prior), repr(prior), "is not an elbokit.Prior (subclass Prior and implement sample).")
    cls = type(prior)
    what = f"prior '{cls.name or cls.__name__}'"
    _check(isinstance(cls.name, str) and cls.name, what, "has no `name` (what users type after --prior).")
    _check(first_line(cls), what, "has no docstring; its first line is what `elbokit priors` shows.")
    for flag in ("has_log_prob", "has_rsample", "needs_samples"):
        _check(isinstance(getattr(prior, flag), bool), what, f"flag `{flag}` must be a bool, got {getattr(prior, flag)!r}.")
    dim = prior.dim
    report: dict[str, Any] = {"name": cls.name, "dim": dim}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _as_assertion():
            sample = contracts.check_prior_samples(prior, n, what)
            _check(tuple(prior.sample(1).shape) == (1, dim), what, f"sample(1) must have shape (1, {dim}).")
            contracts.check_prior_rsample(prior, what)
        _check(sample.dtype == prior.dtype, what, f"samples have dtype {sample.dtype} but the prior holds {prior.dtype}.")
        _check(sample.device == prior.device, what, f"samples are on {sample.device}, the prior on {prior.device}.")
        _check_spec(prior, what, model, sample[:64])
        if not prior.has_log_prob:
            try:
                prior.log_prob(sample[:8])
            except NotImplementedError:
                pass
            else:
                _fail(what, "has_log_prob is False but log_prob returned a value; raise NotImplementedError "
                      "(or set has_log_prob = True).")
            report["log_prob"] = False
            return report
        _check_log_prob(prior, what, sample)
        with _as_assertion():  # what `elbokit train` checks too (it also skips above 10 dimensions)
            report.update(contracts.check_density_matches_samples(prior, n=n, z_threshold=z_threshold, what=what))
    return report


def _check_spec(prior: Prior, what: str, model: Any, z: torch.Tensor) -> None:
    spec = prior.spec()
    try:
        json.dumps(spec)
    except (TypeError, ValueError) as exc:
        _fail(what, f"spec() must be JSON-able (it is saved with a run): {exc}")
    _check(spec.get("dim") == prior.dim, what, f"spec() must include dim={prior.dim}, got {spec!r}.")
    try:
        rebuilt = type(prior)(**spec)
    except Exception as exc:  # noqa: BLE001 - reported as the failure it is
        _fail(what, f"cannot be rebuilt from spec() {spec!r}: {type(exc).__name__}: {exc}")
    if model is not None:
        rebuilt.attach(model)
    state = prior.state_dict()
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as exc:
        _fail(what, f"the prior rebuilt from spec() {spec!r} cannot load the saved state_dict "
              f"(spec() must give every shape): {str(exc).splitlines()[0]}")
    rebuilt.to(device=prior.device, dtype=prior.dtype)
    if prior.has_log_prob:
        try:
            again = rebuilt.log_prob(z)
        except Exception as exc:  # noqa: BLE001
            hint = " (pass model= to check_prior so that it can be attached)" if model is None else ""
            _fail(what, f"the prior rebuilt from spec() fails in log_prob{hint}: {type(exc).__name__}: {exc}")
        _check(torch.allclose(again, prior.log_prob(z), rtol=1e-4, atol=1e-4), what,
               "the prior rebuilt from spec() and the saved state_dict has a different log_prob.")


def _check_log_prob(prior: Prior, what: str, sample: torch.Tensor) -> None:
    n, dim = sample.shape
    with _as_assertion():
        lp = contracts.check_prior_log_prob(prior, sample, what)
    _check(lp.dtype == sample.dtype, what, f"log_prob returned {lp.dtype} for {sample.dtype} input.")
    z = sample[:64].detach().clone().requires_grad_(True)
    out = prior.log_prob(z).sum()
    grad = torch.autograd.grad(out, z, allow_unused=True)[0] if out.requires_grad else None
    _check(grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0), what,
           "log_prob is not differentiable in z (the xent and kl estimators need its gradient).")
    dist = prior.distribution()
    if dist is not None:
        _check(tuple(dist.event_shape) == (dim,), what,
               f"distribution() has event shape {tuple(dist.event_shape)}, expected ({dim},).")
        _check(torch.allclose(dist.log_prob(sample[:256]), lp[:256].detach(), rtol=1e-4, atol=1e-4), what,
               "log_prob differs from distribution().log_prob.")


def check_density_matches_samples(prior: Prior, *, n: int = 4000, z_threshold: float = 5.0,
                                  min_ess_fraction: float = 0.02, what: str | None = None) -> dict[str, float]:
    """`elbokit.contracts.check_density_matches_samples` (the normalisation and moment checks
    by importance sampling, which `elbokit train` also runs), failing with AssertionError."""
    with _as_assertion():
        return contracts.check_density_matches_samples(prior, n=n, z_threshold=z_threshold,
                                                       min_ess_fraction=min_ess_fraction, what=what)


# ---------------------------------------------------------------------- terms and estimators
class _ComponentPlugin:
    """A plugin that registers one component, for checking classes no plugin registers yet."""

    def __init__(self, kind: str, cls: type):
        self.kind, self.cls = kind, cls
        self.__name__ = f"elbokit.testing[{cls.__module__}.{cls.__qualname__}]"

    @hookimpl
    def register_terms(self, register):
        if self.kind == "term":
            register(self.cls)

    @hookimpl
    def register_estimators(self, register):
        if self.kind == "estimator":
            register(self.cls)


def _registry_with(kind: str, cls: type, plugins: Iterable[Any], what: str) -> Registry:
    plugins = list(plugins)
    try:
        registry = Registry.build(plugins, load_entry_points=False, strict=True)
        table = registry.terms if kind == "term" else registry.estimators
        key = cls.name if kind == "term" else (cls.quantity, cls.name)
        if key in table and table[key].obj is cls:
            return registry
        return Registry.build([*plugins, _ComponentPlugin(kind, cls)], load_entry_points=False, strict=True)
    except PluginError as exc:
        _fail(what, f"cannot be registered: {exc}")


_FITTED: dict[tuple[type, int], Prior] = {}


def _test_priors(registry: Registry, dim: int) -> dict[str, Prior]:
    """standard-normal, a 2-component gmm fitted to samples, and the sample-only `samples`."""
    gmm_cls = registry.prior("gmm")
    if (gmm_cls, dim) not in _FITTED:  # fitting is the slow part: once per process
        shift = torch.zeros(dim)
        shift[0] = 2.0
        generator = torch.Generator().manual_seed(dim)
        samples = torch.cat([torch.randn(200, dim, generator=generator) - shift,
                             0.5 * torch.randn(200, dim, generator=generator) + shift])
        _FITTED[(gmm_cls, dim)] = gmm_cls(samples=samples, n_components=2)
    return {
        "standard-normal": registry.prior("standard-normal")(dim=dim),
        "gmm": copy.deepcopy(_FITTED[(gmm_cls, dim)]),
        "samples": registry.prior("samples")(samples=torch.randn(512, dim)),
    }


class _TinyModel(nn.Module):
    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.encoder = nn.Linear(data_dim, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, data_dim)

    def encode(self, x: torch.Tensor) -> D.Independent:
        loc, pre = self.encoder(x).chunk(2, dim=-1)
        return gaussian_posterior(loc, F.softplus(pre) + 1e-3)


def _minimal_batch(model: _TinyModel, needs: frozenset[str], batch_size: int, dataset_size: int) -> Batch:
    """A batch with only what `needs` declares: x_recon, positives and N are left out otherwise."""
    x = torch.randn(batch_size, model.encoder.in_features)
    posterior = model.encode(x)
    z = posterior.rsample()
    batch = Batch(x=x, posterior=posterior, z=z)
    if "x_recon" in needs:
        batch.x_recon = model.decoder(z)
    if "positives" in needs:
        batch.x_pos = x + 0.1 * torch.randn_like(x)
        batch.posterior_pos = model.encode(batch.x_pos)
        batch.z_pos = batch.posterior_pos.rsample()
    if "dataset_size" in needs:
        batch.dataset_size = dataset_size
    return batch


def _exercise(what: str, build: Callable[[Prior], Objective], registry: Registry, *, latent_dim: int,
              data_dim: int, batch_size: int, dataset_size: int) -> dict[str, Any]:
    """Build the objective with each test prior; run it on minimal batches where it is accepted."""
    accepted: list[str] = []
    refused: dict[str, str] = {}
    for prior_name, prior in _test_priors(registry, latent_dim).items():
        try:
            objective = build(prior)
        except IncompatibleError as exc:
            refused[prior_name] = str(exc)
            continue
        needs = objective.needs()
        unknown = sorted(needs - set(NEEDS))
        _check(not unknown, what, f"declares unknown needs {unknown}; valid needs: {', '.join(sorted(NEEDS))}.")
        if "prior_log_prob" in needs and not prior.has_log_prob:
            _fail(what, f"declares prior_log_prob but was accepted with the sample-only prior '{prior_name}'.")
        if "positives" in needs:
            try:
                objective.check(has_positives=False)
            except IncompatibleError:
                pass
            else:
                _fail(what, "declares positives but is accepted for data without positives.")
        model = _TinyModel(data_dim, latent_dim)
        for size in (batch_size, batch_size // 2 + 1):
            batch = _minimal_batch(model, needs, size, dataset_size)
            try:
                # The same per-term check `elbokit train` runs: only declared fields, output
                # a scalar or shape (B,), finite.
                for name, term in objective.terms.items():
                    contracts.run_term(name, term, batch, prior)
                out = objective(batch)
            except contracts.ContractError as exc:
                _fail(what, f"with prior '{prior_name}': {str(exc).split(': ', 1)[-1]}")
            except Exception as exc:  # noqa: BLE001 - the failure is the finding
                _fail(what, f"was accepted with prior '{prior_name}' but failed on a batch holding only what it "
                      f"declares (needs: {', '.join(sorted(needs)) or 'none'}): {type(exc).__name__}: {exc}. "
                      "Declare what it uses in `needs`, or refuse the prior in check_prior.")
        model.zero_grad()
        _check(out.loss.requires_grad, what,
               f"no gradient reaches the encoder's parameters with prior '{prior_name}' (is the output detached?).")
        out.loss.backward()
        grads = [p.grad for p in model.encoder.parameters()]
        _check(all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads), what,
               f"no gradient reaches the encoder's parameters with prior '{prior_name}' (is the output detached?).")
        _check(all(bool(torch.isfinite(g).all()) for g in grads), what,
               f"non-finite gradients for the encoder with prior '{prior_name}'.")
        accepted.append(prior_name)
    _check(accepted, what, f"was refused with every test prior: {refused}")
    return {"accepted": accepted, "refused": refused}


def _check_declarations(cls: type, what: str) -> None:
    _check(isinstance(getattr(cls, "name", None), str) and cls.name, what, "has no `name`.")
    _check(first_line(cls), what, "has no docstring; its first line is what the listings show.")
    unknown = sorted(set(getattr(cls, "needs", frozenset())) - set(NEEDS))
    _check(not unknown, what, f"declares unknown needs {unknown}; valid needs: {', '.join(sorted(NEEDS))}.")
    scope = getattr(cls, "scope", None)  # None: undeclared, refused only by a run on several processes
    _check(scope is None or scope in SCOPES, what, f"declares scope {scope!r}; valid: {', '.join(SCOPES)} (or None).")


def check_term(
    term_cls: type[ElboTerm],
    options: Mapping[str, Any] | None = None,
    *,
    plugins: Iterable[Any] = (),
    latent_dim: int = 3,
    data_dim: int = 6,
    batch_size: int = 16,
    dataset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Check an `ElboTerm` subclass through `build_objective`, as `--terms NAME` builds it.

    `options`: the term's options (`{"estimator": ...}` and constructor keywords); `plugins`:
    modules or objects whose hooks register what the term relies on (e.g. its own
    estimators); the term itself is registered if no plugin does. Returns the names of the
    test priors it was accepted and refused with.
    """
    what = f"term '{getattr(term_cls, 'name', '') or term_cls.__name__}'"
    _check(isinstance(term_cls, type) and issubclass(term_cls, ElboTerm), what, "is not an elbokit.ElboTerm subclass.")
    _check_declarations(term_cls, what)
    _check(term_cls.quantity is None or term_cls.quantity in QUANTITIES, what,
           f"estimates unknown quantity '{term_cls.quantity}'; known: {', '.join(QUANTITIES)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        registry = _registry_with("term", term_cls, plugins, what)
        term_options = {term_cls.name: dict(options)} if options else None

        def build(prior: Prior) -> Objective:
            return build_objective([term_cls.name], prior, options=term_options, registry=registry)

        return _exercise(what, build, registry, latent_dim=latent_dim, data_dim=data_dim,
                         batch_size=batch_size, dataset_size=dataset_size)


def check_estimator(
    est_cls: type[Estimator],
    options: Mapping[str, Any] | None = None,
    *,
    plugins: Iterable[Any] = (),
    latent_dim: int = 3,
    data_dim: int = 6,
    batch_size: int = 16,
    dataset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Check an `Estimator` subclass through `build_objective`, as a term's `estimator=` option
    picks it (e.g. `xent.estimator=NAME`): the first registered term of its quantity is used.

    `options`: the estimator's constructor keywords; `plugins`: as for `check_term`.
    """
    what = f"estimator '{getattr(est_cls, 'quantity', '')}/{getattr(est_cls, 'name', '') or est_cls.__name__}'"
    _check(isinstance(est_cls, type) and issubclass(est_cls, Estimator), what, "is not an elbokit.Estimator subclass.")
    _check_declarations(est_cls, what)
    _check(est_cls.quantity in QUANTITIES, what,
           f"estimates unknown quantity '{est_cls.quantity}'; known: {', '.join(QUANTITIES)}.")
    _check(est_cls.kind in ESTIMATE_KINDS, what, f"kind must be one of {', '.join(ESTIMATE_KINDS)}, got '{est_cls.kind}'.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        registry = _registry_with("estimator", est_cls, plugins, what)
        term_name = next((n for n, e in registry.terms.items() if e.obj.quantity == est_cls.quantity), None)
        _check(term_name is not None, what, f"no registered term estimates '{est_cls.quantity}'.")
        term_options = {term_name: {"estimator": est_cls.name, **dict(options or {})}}

        def build(prior: Prior) -> Objective:
            return build_objective([term_name], prior, options=term_options, registry=registry)

        return _exercise(what, build, registry, latent_dim=latent_dim, data_dim=data_dim,
                         batch_size=batch_size, dataset_size=dataset_size)
