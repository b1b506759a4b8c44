"""Decoder likelihoods p(x|z): log_prob in nats per example (summed over data dimensions)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import unknown_name


class Likelihood(nn.Module):
    """p(x | decoder output). `log_prob(x, out)` -> (B,); `mean(out)` -> the reconstruction."""

    name = ""

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out


class MSELikelihood(Likelihood):
    """Gaussian with fixed variance 1/2: -log p = ||x - x^||^2 + (D/2) log pi (what the paper trains)."""

    name = "mse"

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return -(x - out).pow(2).sum(-1) - 0.5 * x.shape[-1] * math.log(math.pi)


class GaussianLikelihood(Likelihood):
    """Gaussian with a learned per-dimension variance."""

    name = "gaussian"

    def __init__(self, data_dim: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(int(data_dim)))

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        z = (x - out) * torch.exp(-self.log_scale)
        return (-0.5 * z.pow(2) - self.log_scale - 0.5 * math.log(2 * math.pi)).sum(-1)


class BernoulliLikelihood(Likelihood):
    """Bernoulli on logits, for data in [0, 1] (continuous values use the cross-entropy form)."""

    name = "bernoulli"

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


LIKELIHOODS = {"mse": MSELikelihood, "gaussian": GaussianLikelihood, "bernoulli": BernoulliLikelihood}


def make_likelihood(name: str, data_dim: int | None = None) -> Likelihood:
    if name not in LIKELIHOODS:
        raise unknown_name("likelihood", name, LIKELIHOODS)
    if name == "gaussian":
        if data_dim is None:
            raise ValueError("the gaussian likelihood learns one variance per data dimension: give data_dim")
        return GaussianLikelihood(data_dim)
    return LIKELIHOODS[name]()
