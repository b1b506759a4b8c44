"""Decoder likelihoods p(x|z): log_prob in nats per example, summed over every event dimension.

x and the decoder output have shape (B, *event_shape) ((B, D) vectors or (B, C, H, W)
images); `log_prob` returns (B,). Units: `mse`, `gaussian` and `continuous-bernoulli` are
densities of x in the units the model sees (add the standardiser's log|Jacobian| for original
units, as `elbokit evaluate` does); `bernoulli` on {0, 1} data and `discretized` are
probabilities (mass functions), whose log is not comparable with a density's without a
dequantisation term (docs/evaluation.md, "Units of the likelihoods").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

from .errors import unknown_name


def sum_event(values: torch.Tensor) -> torch.Tensor:
    """(B, *event) -> (B,): the sum over every dimension but the first."""
    return values.reshape(values.shape[0], -1).sum(-1)


class Likelihood(nn.Module):
    """p(x | decoder output). `log_prob(x, out)` -> (B,); `mean(out)` -> the reconstruction."""

    name = ""
    units = "nats (density of x)"
    """What `log_prob` is: a density of x or a probability mass (shown in summaries)."""

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out


class MSELikelihood(Likelihood):
    """Gaussian with fixed variance 1/2: -log p = ||x - x^||^2 + (D/2) log pi (what the paper trains)."""

    name = "mse"

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d = x[0].numel()
        return -sum_event((x - out).pow(2)) - 0.5 * d * math.log(math.pi)


def _event_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


class GaussianLikelihood(Likelihood):
    """Gaussian with a learned per-dimension variance."""

    name = "gaussian"

    def __init__(self, data_dim: int | Sequence[int]):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(_event_shape(data_dim)))

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        z = (x - out) * torch.exp(-self.log_scale)
        return sum_event(-0.5 * z.pow(2) - self.log_scale - 0.5 * math.log(2 * math.pi))


class BernoulliLikelihood(Likelihood):
    """Bernoulli on logits, for data in [0, 1] (continuous values use the cross-entropy form)."""

    name = "bernoulli"
    units = "nats (probability of binary x; for x strictly inside (0, 1) a cross-entropy, not a normalised density)"

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return -sum_event(F.binary_cross_entropy_with_logits(out, x, reduction="none"))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli on logits (Loaiza-Ganem & Cunningham 2019): a density on [0, 1].

    torch.distributions.ContinuousBernoulli: p(x | l) = C(l) s^x (1 - s)^(1 - x), s = sigmoid(l),
    with the normaliser C(l) that the plain Bernoulli cross-entropy omits for x in (0, 1)."""

    name = "continuous-bernoulli"

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return sum_event(D.ContinuousBernoulli(logits=out).log_prob(x))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return D.ContinuousBernoulli(logits=out).mean


class DiscretizedLogisticLikelihood(Likelihood):
    """Discretised logistic on `levels` evenly spaced values in [low, high] (Salimans et al. 2017).

    The decoder gives the location mu of each value, a learned per-dimension log-scale s the
    spread: P(x = l_k) = F((l_k + h - mu) / s) - F((l_k - h - mu) / s) with F the logistic CDF
    and h half the spacing, the first and last bins open to -inf and +inf, so the probabilities
    over the levels sum to one exactly. log_prob is the log-probability (nats of a mass
    function); log_prob - D log(spacing) is the log-density of uniformly dequantised x."""

    name = "discretized"
    units = "nats (probability mass over the levels)"

    def __init__(self, data_dim: int | Sequence[int], levels: int = 256, low: float = 0.0, high: float = 1.0):
        super().__init__()
        if int(levels) < 2 or not high > low:
            raise ValueError(f"discretized needs levels >= 2 and high > low, got levels={levels}, low={low}, high={high}")
        self.levels, self.low, self.high = int(levels), float(low), float(high)
        self.half_bin = 0.5 * (self.high - self.low) / (self.levels - 1)
        # Starts at an eighth of the range: wide enough that no level is far in a tail at first.
        self.log_scale = nn.Parameter(torch.full(_event_shape(data_dim), math.log((self.high - self.low) / 8)))

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        inv_s = torch.exp(-self.log_scale)
        upper = (x + self.half_bin - out) * inv_s
        lower = (x - self.half_bin - out) * inv_s
        # Written by hand (torch has no discretised distribution): log(F(a) - F(b)) computed as
        # log F(a) + log(1 - exp(log F(b) - log F(a))) for stability; the end bins are open.
        # In the right tail the survival functions are the accurate ones: F(a) - F(b) = S(b) - S(a).
        log_f_upper, log_f_lower = F.logsigmoid(upper), F.logsigmoid(lower)
        log_s_upper, log_s_lower = F.logsigmoid(-upper), F.logsigmoid(-lower)
        left = log_f_upper + torch.log(-torch.expm1((log_f_lower - log_f_upper).clamp(max=-1e-12)))
        right = log_s_lower + torch.log(-torch.expm1((log_s_upper - log_s_lower).clamp(max=-1e-12)))
        middle = torch.where(upper + lower > 0, right, left)
        first = log_f_upper                        # P(x <= l_0 + h)
        last = log_s_lower                         # P(x > l_K - h)
        tol = 1e-3 * self.half_bin
        out_lp = torch.where(x <= self.low + tol, first, torch.where(x >= self.high - tol, last, middle))
        return sum_event(out_lp)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out.clamp(self.low, self.high)


LIKELIHOODS = {"mse": MSELikelihood, "gaussian": GaussianLikelihood, "bernoulli": BernoulliLikelihood,
               "continuous-bernoulli": ContinuousBernoulliLikelihood, "discretized": DiscretizedLogisticLikelihood}
NEEDS_SHAPE = ("gaussian", "discretized")


def make_likelihood(name: str, data_dim: int | Sequence[int] | None = None, **options) -> Likelihood:
    """A likelihood by name; `data_dim` (an int or an example's shape) for those with one
    learned scale per data dimension; `options` (levels, low, high) for `discretized`."""
    if name not in LIKELIHOODS:
        raise unknown_name("likelihood", name, LIKELIHOODS)
    if name in NEEDS_SHAPE:
        if data_dim is None:
            raise ValueError(f"the {name} likelihood learns one scale per data dimension: give data_dim")
        return LIKELIHOODS[name](data_dim, **options)
    if options:
        raise ValueError(f"the {name} likelihood takes no options, got {', '.join(options)}")
    return LIKELIHOODS[name]()
