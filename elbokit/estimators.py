"""`Estimator`: estimates one named quantity of the ELBO from a batch.

Quantities, all in nats, positive sign (terms apply the ELBO's sign):
- `kl`: KL(q(z|x) || p(z)) per example;
- `entropy`: H[q(z)], the entropy of the aggregate posterior (per-example contributions
  -log q^(z_i) whose batch mean is the estimate);
- `cross_entropy`: H[q(z), p(z)] (per-example -log p^(z_i));
- `mi`: the mutual information I_q(x; z) (per-example contributions).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import distributions as D
from torch import nn

if TYPE_CHECKING:
    from .batch import Batch
    from .priors import Prior

QUANTITIES: dict[str, str] = {
    "kl": "KL(q(z|x) || p(z)), per example",
    "entropy": "H[q(z)], entropy of the aggregate posterior",
    "cross_entropy": "H[q(z), p(z)], cross-entropy of the aggregate posterior to the prior",
    "mi": "I_q(x; z), mutual information between data and code",
}

# What a component may declare in `needs`; the objective checks each when it is built.
NEEDS: dict[str, str] = {
    "x_recon": "the decoder's output for z",
    "positives": "positive pairs (x, x+) in the data",
    "dataset_size": "the number N of training examples",
    "prior_log_prob": "a prior with log_prob",
    "prior_samples": "a prior that can be sampled",
}

# What a component's per-example contribution i depends on, declared as `scope`. A run on
# several processes (elbokit.distributed) evaluates "batch" components on the global batch
# gathered from every process, and refuses components that declare neither (None).
SCOPES: dict[str, str] = {
    "example": "per-example: contribution i depends on example i alone",
    "batch": "batch-wide: contribution i depends on the whole batch (InfoNCE, MWS, kNN, ...)",
}


class Estimator(nn.Module):
    """Estimates `quantity` from a `Batch` and a `Prior`.

    `forward(batch, prior)` returns per-example contributions, shape (B,), whose mean is the
    estimate. `needs` lists what the estimator requires (see `NEEDS`); `check_prior` can refuse
    a prior for reasons the flags do not capture (e.g. no analytic KL for that pair) by
    returning one sentence. `kind` says what the number is: "exact", "lower bound",
    "upper bound" or "estimate". `scope` is "example" or "batch" (see `SCOPES`); a third-party
    estimator that leaves it None cannot be trained on several processes.
    """

    quantity: ClassVar[str] = ""
    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    kind: ClassVar[str] = "estimate"
    scope: ClassVar[str | None] = None

    def check_prior(self, prior: Prior) -> str | None:
        """None if this estimator can use `prior`, else one sentence saying why not."""
        return None

    @abstractmethod
    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        """Per-example contributions, shape (B,)."""

    def extra_repr(self) -> str:
        return f"{self.quantity}/{self.name}"


# ------------------------------------------------------------------ KL to the prior
def analytic_kl(posterior: D.Distribution, prior_dist: D.Distribution | None) -> torch.Tensor | None:
    """KL(q(z|x) || p(z)) per example by torch's registered rule, or None where there is none.

    This is the one place that decides "analytic or not" for every KL to the prior (the `kl`
    term's estimators, the validation pass, `elbokit evaluate` and the end-of-training summary).

    Why the rule is *called* rather than looked up: torch's dispatch on the outer types is not
    the answer. `Independent(Normal)` against `Independent(StudentT)` dispatches to the
    registered (Independent, Independent) rule, which then recurses into the base pair and
    raises `NotImplementedError` there; the (ExponentialFamily, ExponentialFamily) rule and the
    (TransformedDistribution, TransformedDistribution) rule likewise raise at call time for
    pairs they do not cover. Only calling `kl_divergence` resolves the rule down to the base
    distributions exactly as torch will; `NotImplementedError` is torch's documented signal
    for "no closed form". The call is the computation itself, so nothing is spent twice.
    """
    if prior_dist is None:
        return None
    try:
        return D.kl_divergence(posterior, prior_dist)
    except NotImplementedError:
        return None


def kl_to_prior(posterior: D.Distribution, z: torch.Tensor, prior: Prior,
                estimator: str = "auto") -> tuple[torch.Tensor, str]:
    """KL(q(z|x) || p(z)) per example, shape (B,), and how it was computed ("analytic" or "mc").

    `estimator`: "analytic" (the closed form; raises IncompatibleError where there is none),
    "mc" (log q(z|x) - log p(z) at the sample z, unbiased) or "auto" (analytic where torch has
    a rule for the pair down to the base distributions, else mc). See `analytic_kl`.
    """
    if estimator not in ("analytic", "mc", "auto"):
        raise ValueError(f"estimator must be analytic, mc or auto, got {estimator!r}")
    if estimator != "mc":
        value = analytic_kl(posterior, prior.distribution())
        if value is not None:
            return value, "analytic"
        if estimator == "analytic":
            from .errors import IncompatibleError

            raise IncompatibleError(no_analytic_kl_sentence(prior))
    return posterior.log_prob(z) - prior.log_prob(z), "mc"


def no_analytic_kl_sentence(prior: Prior) -> str:
    return (f"no closed-form KL is registered in torch.distributions between a Gaussian posterior and "
            f"prior '{prior.name}' (down to its base distributions); use kl.estimator=mc (or auto).")


def has_analytic_kl(prior: Prior) -> bool:
    """Whether `analytic_kl` finds a closed form between elbokit's diagonal-Gaussian posterior
    and `prior`, decided when an objective is built by calling it on a one-example probe
    q = N(0, I) (the same call as in training, so the answer cannot differ)."""
    if not prior.has_log_prob:
        return False
    dist = prior.distribution()
    if dist is None:
        return False
    from .batch import gaussian_posterior

    loc = torch.zeros(1, prior.dim, device=prior.device, dtype=prior.dtype)
    return analytic_kl(gaussian_posterior(loc, torch.ones_like(loc)), dist) is not None
