"""`ElboTerm`: one named term of an objective, returning per-example loss contributions."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from .batch import Batch
    from .estimators import Estimator
    from .priors import Prior


class ElboTerm(nn.Module):
    """A term of the (negative) ELBO, in nats per example, with the ELBO's sign.

    `forward(batch, prior)` returns the loss contribution per example, shape (B,): lower is
    better, and the objective weights, averages and adds them (docs/design.md section 1).

    Most terms are `sign * estimate` of one quantity: set `quantity` (see
    `elbokit.estimators.QUANTITIES`), `default_estimator` and `sign`, and the estimator is
    chosen by name when the objective is built. Terms that compute their value directly
    (such as `recon`) set `quantity = None`, override `forward` and declare `scope` ("example"
    or "batch", see `elbokit.estimators.SCOPES`); a term with an estimator takes its scope.
    """

    name: ClassVar[str] = ""
    quantity: ClassVar[str | None] = None
    default_estimator: ClassVar[str | None] = None
    sign: ClassVar[int] = 1
    needs: ClassVar[frozenset[str]] = frozenset()
    scope: ClassVar[str | None] = None

    def __init__(self, estimator: Estimator | None = None):
        super().__init__()
        self.estimator = estimator

    def all_needs(self) -> frozenset[str]:
        """What this term needs, with its estimator's needs."""
        extra = self.estimator.needs if self.estimator is not None else frozenset()
        return frozenset(self.needs) | extra

    def batch_scope(self) -> str | None:
        """"example" or "batch" (this term's, or its estimator's), None if undeclared."""
        return self.estimator.scope if self.estimator is not None else self.scope

    def check_prior(self, prior: Prior) -> str | None:
        """None if this term can use `prior`, else one sentence saying why not."""
        return self.estimator.check_prior(prior) if self.estimator is not None else None

    def contributions(self, batch: Batch, prior: Prior) -> tuple[torch.Tensor, torch.Tensor]:
        """(value, loss) per example, both shape (B,): `value` is what logs, metrics.jsonl and
        the summary report (this term's `forward`), `loss` what the objective weights and
        optimises. They are one tensor for a term that optimises what it reports; a term with a
        surrogate loss (the kl term's free bits) overrides this, so that the reported number
        stays the true one (as pyro keeps the differentiable loss apart from the reported value)."""
        value = self(batch, prior)
        return value, value

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        if self.estimator is None:
            raise NotImplementedError(f"Term '{self.name}' has no estimator and no forward.")
        value = self.estimator(batch, prior)
        return value if self.sign == 1 else self.sign * value  # the same numbers, one operation fewer

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
