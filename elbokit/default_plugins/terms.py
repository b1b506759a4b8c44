"""Built-in terms. Loss contributions carry the ELBO's sign (docs/design.md section 2):

    -ELBO = recon + kl = recon + mi + (-entropy) + xent = recon + mi + marginal-kl
"""

from __future__ import annotations

from typing import Any

import torch

from elbokit.batch import Batch
from elbokit.errors import ElbokitError
from elbokit.hookspecs import hookimpl
from elbokit.likelihoods import make_likelihood
from elbokit.priors import Prior
from elbokit.terms import ElboTerm


class Reconstruction(ElboTerm):
    """Reconstruction: -log p(x|z) under the likelihood (mse, gaussian, bernoulli, continuous-bernoulli, discretized).

    Summed over every data dimension. `levels`, `low` and `high` describe the grid of a
    `discretized` likelihood (default 256 levels in [0, 1]); `data_dim` (an example's shape)
    is filled in by elbokit for the likelihoods with a learned scale per dimension."""

    name = "recon"
    needs = frozenset({"x_recon"})
    scope = "example"

    def __init__(self, likelihood: str = "mse", data_dim: Any = None, levels: int | None = None,
                 low: float | None = None, high: float | None = None):
        super().__init__()
        grid = {k: v for k, v in (("levels", levels), ("low", low), ("high", high)) if v is not None}
        if grid and likelihood != "discretized":
            raise ElbokitError(f"recon.{next(iter(grid))} describes the grid of the discretized likelihood; "
                               f"drop it or use recon.likelihood=discretized.")
        try:
            self.likelihood = make_likelihood(likelihood, data_dim, **grid)
        except ValueError as exc:
            raise ElbokitError(f"Bad recon likelihood: {exc}.") from None

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        if batch.x_recon is None:
            raise ElbokitError("The 'recon' term needs the decoder's output: pass x_recon= in the Batch.")
        return -self.likelihood.log_prob(batch.x, batch.x_recon)


class KL(ElboTerm):
    """KL(q(z|x) || p(z)) per example, the classic ELBO's regulariser."""

    name, quantity, default_estimator = "kl", "kl", "auto"


class InfoNCETerm(ElboTerm):
    """+I(x;z) estimated by InfoNCE (the ELBO's sign: MI is penalised; weight < 0 for InfoMax)."""

    name, quantity, default_estimator = "infonce", "mi", "infonce"


class MutualInformation(ElboTerm):
    """+I(x;z) estimated by minibatch weighted sampling (no positives needed)."""

    name, quantity, default_estimator = "mi", "mi", "mws"


class Entropy(ElboTerm):
    """-H[q(z)], the negative entropy of the aggregate posterior."""

    name, quantity, default_estimator, sign = "entropy", "entropy", "mws", -1


class CrossEntropy(ElboTerm):
    """+H[q(z), p(z)], cross-entropy of the aggregate posterior to the prior."""

    name, quantity, default_estimator = "xent", "cross_entropy", "auto"


class MarginalKL(ElboTerm):
    """KL(q(z) || p(z)) = -H[q(z)] + H[q(z), p(z)], from an entropy and a cross-entropy estimator."""

    name = "marginal-kl"

    def __init__(self, entropy_estimator: str = "mws", xent_estimator: str = "auto", registry: Any = None):
        super().__init__()
        from elbokit.plugins import get_registry

        registry = registry or get_registry()
        self.entropy = registry.estimator("entropy", entropy_estimator)()
        self.cross_entropy = registry.estimator("cross_entropy", xent_estimator)()

    def all_needs(self) -> frozenset[str]:
        return self.entropy.needs | self.cross_entropy.needs

    def check_prior(self, prior: Prior) -> str | None:
        return self.entropy.check_prior(prior) or self.cross_entropy.check_prior(prior)

    def batch_scope(self) -> str | None:
        scopes = {self.entropy.scope, self.cross_entropy.scope}
        return None if None in scopes else ("batch" if "batch" in scopes else "example")

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        return self.cross_entropy(batch, prior) - self.entropy(batch, prior)


@hookimpl
def register_terms(register):
    for cls in (Reconstruction, KL, InfoNCETerm, MutualInformation, Entropy, CrossEntropy, MarginalKL):
        register(cls)
