"""elbokit: compose, train and honestly evaluate VAE objectives from pluggable parts.

The public API (plugins import only from here):

    import elbokit
    prior = elbokit.make_prior("gmm", samples=z_prior, n_components=3)
    objective = elbokit.build_objective("ed", prior, dataset_size=len(train), has_positives=True)
    out = objective(elbokit.Batch(x=x, posterior=q, z=z, x_recon=decoder(z), x_pos=xp, z_pos=zp))
    out.loss.backward()
"""

from __future__ import annotations

from typing import Any

from .batch import Batch, gaussian_posterior
from .errors import ElbokitError, IncompatibleError, PluginError, UnknownNameError
from .estimators import NEEDS, QUANTITIES, Estimator
from .hookspecs import hookimpl
from .likelihoods import Likelihood, make_likelihood
from .objective import PRESETS, Objective, ObjectiveOutput, build_objective, parse_terms
from .plugins import Registry, get_registry
from .priors import Prior
from .terms import ElboTerm

__version__ = "0.1.0"


def make_prior(name: str, dim: int | None = None, *, registry: Registry | None = None, **options: Any) -> Prior:
    """Build a registered prior by name.

    `make_prior("standard-normal", dim=5)`; `make_prior("gmm", samples=array_n_by_dim,
    n_components=3)` (n_components=0 chooses by BIC); `make_prior("samples", samples=...)`.
    """
    cls = (registry or get_registry()).prior(name)
    if dim is not None:
        options["dim"] = dim
    try:
        return cls(**options)
    except TypeError as exc:
        raise ElbokitError(f"Bad option for prior '{name}': {exc}") from None


__all__ = [
    "Batch", "gaussian_posterior",
    "ElboTerm", "Prior", "Estimator", "Objective", "ObjectiveOutput", "Likelihood",
    "build_objective", "make_prior", "make_likelihood", "parse_terms", "PRESETS",
    "QUANTITIES", "NEEDS", "hookimpl", "Registry", "get_registry",
    "ElbokitError", "UnknownNameError", "IncompatibleError", "PluginError",
    "__version__",
]
