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


class Estimator(nn.Module):
    """Estimates `quantity` from a `Batch` and a `Prior`.

    `forward(batch, prior)` returns per-example contributions, shape (B,), whose mean is the
    estimate. `needs` lists what the estimator requires (see `NEEDS`); `check_prior` can refuse
    a prior for reasons the flags do not capture (e.g. no analytic KL for that pair) by
    returning one sentence. `kind` says what the number is: "exact", "lower bound",
    "upper bound" or "estimate".
    """

    quantity: ClassVar[str] = ""
    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    kind: ClassVar[str] = "estimate"

    def check_prior(self, prior: Prior) -> str | None:
        """None if this estimator can use `prior`, else one sentence saying why not."""
        return None

    @abstractmethod
    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        """Per-example contributions, shape (B,)."""

    def extra_repr(self) -> str:
        return f"{self.quantity}/{self.name}"
