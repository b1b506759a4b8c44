"""The extension points of elbokit. A spec only ever gains arguments.

Each hook receives a `register` callback; call it once per component you provide.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("elbokit")
hookimpl = HookimplMarker("elbokit")


@hookspec
def register_terms(register):
    """Register `ElboTerm` subclasses: `register(TermClass)`."""


@hookspec
def register_priors(register):
    """Register `Prior` subclasses: `register(PriorClass)`."""


@hookspec
def register_estimators(register):
    """Register `Estimator` subclasses: `register(EstimatorClass)`."""


@hookspec
def register_datasets(register):
    """Register datasets: `register(name, loader, description)`; `loader(**options)` returns a `Dataset`."""
