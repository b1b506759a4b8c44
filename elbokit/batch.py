"""`Batch`: what one minibatch gives the terms and estimators.

A model (elbokit's own VAE or a user's) encodes x into a Gaussian q(z|x) and draws z; the
batch carries those so that every term sees the same sample. Shapes: x (B, D), z (B, L).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import distributions as D

from .errors import ElbokitError


@dataclass
class Batch:
    x: torch.Tensor
    """Data, (B, D)."""
    posterior: D.Distribution
    """q(z|x): batch shape (B,), event shape (L,); an `Independent(Normal)` for the pairwise estimators."""
    z: torch.Tensor
    """A reparameterised sample of q(z|x), (B, L)."""
    x_recon: torch.Tensor | None = None
    """Decoder output for z (mean or logits, as the likelihood expects), (B, D)."""
    x_pos: torch.Tensor | None = None
    """Positive views of x (the paper's x+), (B, D)."""
    posterior_pos: D.Distribution | None = None
    """q(z|x+), for critics that compare codes of positive pairs."""
    z_pos: torch.Tensor | None = None
    """A sample of q(z|x+), (B, L)."""
    dataset_size: int | None = None
    """N, the number of training examples (MWS/MSS need it)."""

    @property
    def size(self) -> int:
        return self.z.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.z.shape[-1]

    @property
    def posterior_loc(self) -> torch.Tensor:
        return _normal_base(self.posterior).loc

    @property
    def posterior_scale(self) -> torch.Tensor:
        return _normal_base(self.posterior).scale


def _normal_base(dist: D.Distribution) -> D.Normal:
    base = dist.base_dist if isinstance(dist, D.Independent) else dist
    if not isinstance(base, D.Normal):
        raise ElbokitError(
            "This estimator needs a diagonal Gaussian posterior "
            "(torch.distributions.Independent(Normal(loc, scale), 1))."
        )
    return base


def gaussian_posterior(loc: torch.Tensor, scale: torch.Tensor) -> D.Independent:
    """q(z|x) as elbokit expects it: a diagonal Gaussian with event shape (L,)."""
    return D.Independent(D.Normal(loc, scale), 1)
