"""The extension points of elbokit. A spec only ever gains arguments.

Each hook receives a `register` callback; call it once per component you provide, with the
class (a dataset: its name, loader and description). `register(..., override=True)` replaces a
built-in of the same name; without it the built-in keeps the name and the plugin's component
is reachable as `PLUGIN:NAME`. Each plugin is validated on its own when it loads (hook names,
kinds, names, needs, quantities: see elbokit.plugins) and kept out as a whole if it fails.
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


@hookspec
def register_models(register):
    """Register `Model` subclasses: `register(ModelClass)`; `ModelClass(event_shape, latent_dim, **options)` builds one."""
