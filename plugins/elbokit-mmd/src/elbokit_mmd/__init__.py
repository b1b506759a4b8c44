"""elbokit-mmd: the InfoVAE maximum-mean-discrepancy term (Zhao, Song & Ermon) for elbokit.

Installed, it registers the term `mmd` through the `elbokit` entry-point group:

    pip install ./plugins/elbokit-mmd
    elbokit terms                                       # lists `mmd`
    elbokit train --terms recon,mmd:100 --prior samples --prior-samples z.npy

It imports only elbokit's public API and torch.
"""

from __future__ import annotations

import torch

from elbokit import Batch, ElboTerm, Prior, hookimpl

__version__ = "0.1.0"

KERNELS = ("rbf", "imq")


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2, shape (n, m), by matrix products (no sqrt: smooth where a_i = b_j)."""
    sq = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * a @ b.T
    return sq.clamp_min(0.0)


def kernel_matrix(a: torch.Tensor, b: torch.Tensor, kernel: str, bandwidth: float) -> torch.Tensor:
    """k(a_i, b_j): rbf exp(-||a-b||^2 / (2 s)) or imq C / (C + ||a-b||^2), s = C = bandwidth."""
    sq = squared_distances(a, b)
    if kernel == "rbf":
        return torch.exp(-sq / (2.0 * bandwidth))
    return bandwidth / (bandwidth + sq)


def mmd2_per_example(z: torch.Tensor, y: torch.Tensor, kernel: str = "rbf",
                     bandwidth: float | None = None) -> torch.Tensor:
    """Per-example contributions c_i whose mean is the unbiased MMD^2 between the rows of z
    (B, L) and of y (M, L):

        c_i = 1/(B-1) sum_{j != i} k(z_i, z_j) - 2/M sum_j k(z_i, y_j)
              + 1/(M(M-1)) sum_{j != l} k(y_j, y_l)

    (Gretton et al. 2012, the U-statistic MMD^2_u). Needs B >= 2 and M >= 2.
    """
    b, m = z.shape[0], y.shape[0]
    if b < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 codes and 2 prior samples, got {b} and {m}")
    s = float(bandwidth) if bandwidth is not None else float(z.shape[1])
    k_zz = kernel_matrix(z, z, kernel, s)
    k_yy = kernel_matrix(y, y, kernel, s)
    k_zy = kernel_matrix(z, y, kernel, s)
    within_z = (k_zz.sum(1) - k_zz.diagonal()) / (b - 1)
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within_z - 2.0 * k_zy.mean(1) + within_y


# [docs: term class]
class MMD(ElboTerm):
    """MMD^2 between the aggregate posterior q(z) and the prior (InfoVAE); needs only prior samples.

    The unbiased estimate (Gretton et al. 2012) of the squared maximum mean discrepancy
    between the batch's codes z_i ~ q(z) and M prior samples y_j ~ p(z), returned as
    per-example contributions of shape (B,) whose batch mean is MMD^2_u (see
    `mmd2_per_example`). Only `prior.sample` is used, so it works with the sample-only
    `samples` prior. MMD^2_u can be slightly negative when q(z) = p(z).

    InfoVAE (Zhao, Song & Ermon, AAAI 2019) minimises
        recon + (1 - alpha) * KL(q(z|x) || p(z)) + (alpha + lambda - 1) * MMD^2(q(z), p(z));
    in elbokit the coefficients are the terms' weights: `--terms recon,kl:<1-alpha>,mmd:<alpha+lambda-1>`,
    and the MMD-VAE (alpha = 1) is `--terms recon,mmd:<lambda>`. MMD^2 is not in nats (with
    these kernels it lies in [-2, 2]), so lambda is typically large.

    Options: `kernel` `rbf` (exp(-||a-b||^2 / (2 s))) or `imq` (C / (C + ||a-b||^2),
    the inverse multiquadric of Tolstikhin et al.'s WAE); `bandwidth` s or C (default: the
    latent dimension L, so a standard-normal pair at its typical squared distance 2L gets
    k = e^-1 or 1/3); `n_prior` M (default: the batch size).
    """

    name = "mmd"
    needs = frozenset({"prior_samples"})
    scope = "batch"  # contribution i compares z_i with the other codes of the batch

    def __init__(self, kernel: str = "rbf", bandwidth: float | None = None, n_prior: int | None = None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got '{kernel}'")
        if bandwidth is not None and not float(bandwidth) > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        if n_prior is not None and int(n_prior) < 2:
            raise ValueError(f"n_prior must be >= 2, got {n_prior}")
        self.kernel = kernel
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.n_prior = None if n_prior is None else int(n_prior)

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        y = prior.sample(self.n_prior or batch.size).to(batch.z)
        return mmd2_per_example(batch.z, y, self.kernel, self.bandwidth)
# [/docs: term class]


# [docs: hook]
@hookimpl
def register_terms(register):
    register(MMD)
# [/docs: hook]
