"""elbokit: compose, train and honestly evaluate VAE objectives from pluggable parts.

The public API (plugins import only from here):

    import elbokit
    prior = elbokit.make_prior("gmm", samples=z_prior, n_components=3)
    objective = elbokit.build_objective("ed", prior, dataset_size=len(train), has_positives=True)
    out = objective(elbokit.Batch(x=x, posterior=q, z=z, x_recon=decoder(z), x_pos=xp, z_pos=zp))
    out.loss.backward()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl  # pluggy only: cheap

__version__ = "0.1.0"

# The public API, imported on first use so that `elbokit --help` does not pay for torch.
_EXPORTS = {
    "Batch": "batch", "gaussian_posterior": "batch",
    "ElbokitError": "errors", "IncompatibleError": "errors", "PluginError": "errors",
    "UnknownNameError": "errors",
    "Estimator": "estimators", "NEEDS": "estimators", "QUANTITIES": "estimators",
    "Likelihood": "likelihoods", "make_likelihood": "likelihoods",
    "PRESETS": "objective", "Objective": "objective", "ObjectiveOutput": "objective",
    "build_objective": "objective", "parse_terms": "objective",
    "OptionSpec": "objective", "option_specs": "objective",
    "Registry": "plugins", "get_registry": "plugins",
    "Prior": "priors",
    "ElboTerm": "terms",
    "Dataset": "data",
    "VAE": "models", "Model": "models",
    "load_run": "run",
}

if TYPE_CHECKING:  # for type checkers and IDEs
    from .batch import Batch, gaussian_posterior
    from .data import Dataset
    from .errors import ElbokitError, IncompatibleError, PluginError, UnknownNameError
    from .estimators import NEEDS, QUANTITIES, Estimator
    from .likelihoods import Likelihood, make_likelihood
    from .models import VAE, Model
    from .objective import PRESETS, Objective, ObjectiveOutput, OptionSpec, build_objective, option_specs, parse_terms
    from .plugins import Registry, get_registry
    from .priors import Prior
    from .run import load_run
    from .terms import ElboTerm


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'elbokit' has no attribute {name!r}")


def make_prior(name: str, dim: int | None = None, *, registry: Any = None, **options: Any):
    """Build a registered prior by name.

    `make_prior("standard-normal", dim=5)`; `make_prior("gmm", samples=array_n_by_dim,
    n_components=3)` (n_components=0 chooses by BIC); `make_prior("samples", samples=...)`.
    """
    from .errors import ElbokitError
    from .plugins import get_registry

    from .objective import coerce_options, option_specs

    cls = (registry or get_registry()).prior(name)
    # `dim` and `samples` come from elbokit (--latent-dim, --prior-samples), the rest are
    # checked against the prior's declared options: one line listing them if wrong.
    given = {k: options.pop(k) for k in ("samples",) if k in options}
    options = coerce_options(f"prior '{name}'", option_specs(cls, hidden=("dim", "samples")), options)
    if dim is not None:
        options["dim"] = dim
    try:
        return cls(**options, **given)
    except TypeError as exc:
        raise ElbokitError(f"Bad option for prior '{name}': {exc}") from None


__all__ = sorted([*_EXPORTS, "hookimpl", "make_prior", "__version__"])
