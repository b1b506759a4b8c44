"""Built-in terms. Loss contributions carry the ELBO's sign (docs/design.md section 2):

    -ELBO = recon + kl = recon + mi + (-entropy) + xent = recon + mi + marginal-kl
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import distributions as D

from elbokit.batch import Batch, gaussian_posterior
from elbokit.estimators import Estimator
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
    option_help = {"likelihood": "p(x|z): mse, gaussian (a learned scale per dimension), bernoulli, "
                                 "continuous-bernoulli or discretized (a discretized logistic)",
                   "levels": "discretized: the number of levels of the grid (unset: 256)",
                   "low": "discretized: the lowest level (unset: 0)",
                   "high": "discretized: the highest level (unset: 1)"}
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


def per_dimension_kl(posterior: D.Distribution, prior_dist: D.Distribution | None) -> torch.Tensor | None:
    """KL(q_j(z_j|x) || p_j(z_j)) per example and latent dimension j, shape (B, L), by torch's
    rule for the one-dimensional base distributions; None when either side is not a product of
    one-dimensional distributions over the latent dimensions (a mixture, a full covariance) or
    torch has no closed form for the pair. Summed over j it is `elbokit.estimators.analytic_kl`
    exactly (torch's (Independent, Independent) rule sums the same base values)."""
    if not (isinstance(posterior, D.Independent) and isinstance(prior_dist, D.Independent)):
        return None
    if posterior.reinterpreted_batch_ndims != 1 or prior_dist.reinterpreted_batch_ndims != 1:
        return None
    q, p = posterior.base_dist, prior_dist.base_dist
    if q.event_shape != () or p.event_shape != ():
        return None
    try:
        return D.kl_divergence(q, p)
    except NotImplementedError:  # torch's documented signal for "no closed form"
        return None


def no_per_dimension_kl(prior: Prior) -> str | None:
    """None if the KL between elbokit's diagonal-Gaussian posterior and `prior` has a closed
    form per latent dimension (probed on q = N(0, I), the call training makes), else why not."""
    dist = prior.distribution() if prior.has_log_prob else None
    if dist is None:
        return f"prior '{prior.name}' has no density"
    probe = torch.zeros(1, prior.dim, device=prior.device, dtype=prior.dtype)
    if not (isinstance(dist, D.Independent) and dist.reinterpreted_batch_ndims == 1 and dist.base_dist.event_shape == ()):
        return (f"prior '{prior.name}' is not a product of one-dimensional distributions over the latent "
                f"dimensions ({type(dist).__name__} couples them)")
    if per_dimension_kl(gaussian_posterior(probe, torch.ones_like(probe)), dist) is None:
        return (f"torch.distributions has no closed-form KL from a Normal to the factors of prior "
                f"'{prior.name}' ({type(dist.base_dist).__name__})")
    return None


class KL(ElboTerm):
    """KL(q(z|x) || p(z)) per example, the classic ELBO's regulariser.

    `free_bits` = lambda > 0 turns on free bits (Kingma et al. 2016, "Improved variational
    inference with inverse autoregressive flow", section C.8 of the appendix): the loss uses
    sum_j max(lambda, KL_j) with KL_j the batch mean of the KL in latent dimension j, so a
    dimension whose mean KL is below lambda gets no gradient from this term (it is not pushed
    to collapse onto the prior) and one above it gets the plain KL's. Only the loss changes:
    the value reported (train logs, metrics.jsonl, the summary) is the true KL, and every
    bound elbokit evaluates is computed without the floor. Needs the KL in closed form per
    dimension: a diagonal-Gaussian posterior and a prior that is a product of one-dimensional
    distributions with a torch rule (standard-normal), estimator analytic or auto; refused
    when the objective is built otherwise (a gmm or sample-only prior, the mc estimator).
    The batch mean makes the term batch-wide (scope "batch") while free bits are on."""

    name, quantity, default_estimator = "kl", "kl", "auto"
    option_help = {"free_bits": "free bits lambda in nats per latent dimension: the loss uses "
                                "sum_j max(lambda, batch-mean KL_j); the reported KL stays the true one (0: off)"}

    def __init__(self, estimator: Estimator | None = None, free_bits: float = 0.0):
        super().__init__(estimator)
        if not math.isfinite(free_bits) or free_bits < 0:
            raise ElbokitError(f"kl.free_bits must be a number of nats >= 0 (0 turns it off), got {free_bits!r}.")
        if free_bits > 0 and estimator is not None and estimator.name not in ("analytic", "auto"):
            raise ElbokitError(f"Term 'kl' with kl.free_bits={free_bits:g} needs the closed-form KL per latent "
                               f"dimension, which estimator '{estimator.name}' does not give; use "
                               "kl.estimator=analytic (or auto), or drop kl.free_bits.")
        self.free_bits = float(free_bits)

    def batch_scope(self) -> str | None:
        return "batch" if self.free_bits > 0 else super().batch_scope()

    def check_prior(self, prior: Prior) -> str | None:
        reason = super().check_prior(prior)
        if reason is not None or self.free_bits == 0:
            return reason
        why = no_per_dimension_kl(prior)
        if why is None:
            return None
        return (f"kl.free_bits={self.free_bits:g} needs the KL in closed form per latent dimension, and {why}; "
                "use a factorised prior such as standard-normal, or drop kl.free_bits.")

    def _per_dimension(self, batch: Batch, prior: Prior) -> torch.Tensor:
        per_dim = per_dimension_kl(batch.posterior, prior.distribution())
        if per_dim is None:
            raise ElbokitError("Term 'kl' with kl.free_bits needs a diagonal-Gaussian posterior "
                               "(Independent(Normal(loc, scale), 1)) and a factorised prior; drop kl.free_bits.")
        return per_dim

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        if self.free_bits == 0:
            return super().forward(batch, prior)
        return self._per_dimension(batch, prior).sum(-1)  # the analytic KL, summed as torch sums it

    def contributions(self, batch: Batch, prior: Prior) -> tuple[torch.Tensor, torch.Tensor]:
        if self.free_bits == 0:
            return super().contributions(batch, prior)
        per_dim = self._per_dimension(batch, prior)  # (B, L)
        # sum_j max(lambda, mean_i KL_ij), written per example so that the objective's mean over
        # the batch gives it exactly: dimension j contributes KL_ij where its batch mean is above
        # lambda, else the constant lambda (no gradient). No library has this surrogate.
        above = per_dim.detach().mean(0) > self.free_bits
        loss = torch.where(above, per_dim, per_dim.new_tensor(self.free_bits)).sum(-1)
        return per_dim.sum(-1), loss


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
    option_help = {"entropy_estimator": "the estimator of H[q(z)] (elbokit estimators entropy/NAME)",
                   "xent_estimator": "the estimator of H[q(z), p(z)] (elbokit estimators cross_entropy/NAME)"}

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
