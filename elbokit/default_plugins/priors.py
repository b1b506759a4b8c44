"""Built-in priors: standard-normal, gmm (fitted to prior samples), samples (sample-only)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import distributions as D

from elbokit.errors import ElbokitError
from elbokit.hookspecs import hookimpl
from elbokit.ops import LOG_2PI
from elbokit.priors import Prior


def as_sample_matrix(samples: Any, what: str = "prior samples") -> torch.Tensor:
    """Prior samples given as an (n, dim) array or tensor, checked and as float32."""
    try:
        t = torch.as_tensor(np.asarray(samples, dtype=np.float64) if not torch.is_tensor(samples) else samples)
    except (TypeError, ValueError):
        raise ElbokitError(f"The {what} must be a numeric (n, dim) array.") from None
    t = t.to(torch.float32)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ElbokitError(f"The {what} must be a non-empty (n, dim) array, got shape {tuple(t.shape)}.")
    bad = (~torch.isfinite(t)).any(dim=1).nonzero()
    if len(bad):
        raise ElbokitError(f"The {what} contain NaN or Inf (row {int(bad[0])}).")
    return t


class StandardNormalPrior(Prior):
    """Standard normal N(0, I): analytic KL and cross-entropy."""

    name = "standard-normal"
    has_rsample = True

    def distribution(self) -> D.Distribution:
        # Constant parameters: built once per device and dtype (the kl term asks for it in
        # every step), without torch's argument checks, which could only pass.
        key = (self._anchor.device, self._anchor.dtype)
        cached = self.__dict__.get("_distribution")
        if cached is None or cached[0] != key:
            loc = self._anchor.new_zeros(self.dim)
            dist = D.Independent(D.Normal(loc, torch.ones_like(loc), validate_args=False), 1, validate_args=False)
            self.__dict__["_distribution"] = cached = (key, dist)
        return cached[1]

    def sample(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.dim, device=self.device, dtype=self._anchor.dtype)


class GMMPrior(Prior):
    """Gaussian mixture fitted to prior samples (scikit-learn), differentiable in z.

    `samples` (n, dim) are fitted by `sklearn.mixture.GaussianMixture` with full covariances;
    `n_components` is given, or chosen by BIC over 1..`max_components` when 0 / None. The
    fitted weights, means and Cholesky factors are held as buffers; `distribution()` is
    `MixtureSameFamily(Categorical, MultivariateNormal)` of them (sampling), and `log_prob`,
    differentiable in z, computes its value directly (see there) and equals sklearn's
    `score_samples`.
    """

    name = "gmm"
    needs_samples = True
    option_help = {"n_components": "mixture components; 0 (or unset) chooses by BIC over 1..max_components",
                   "max_components": "the most components the BIC choice tries",
                   "seed": "seed of scikit-learn's fit"}

    def __init__(self, dim: int | None = None, samples: Any = None, n_components: int | None = 3,
                 max_components: int = 8, seed: int = 0):
        if samples is None and dim is None:
            raise ElbokitError(
                "The 'gmm' prior is fitted to prior samples: give samples= an (n, dim) array "
                "(on the command line, --prior-samples FILE.npy)."
            )
        data = as_sample_matrix(samples) if samples is not None else None
        if data is not None and dim is not None and data.shape[1] != int(dim):
            raise ElbokitError(f"The prior samples have dimension {data.shape[1]} but the latent dimension is {dim}.")
        super().__init__(dim if dim is not None else data.shape[1])
        if n_components is not None and int(n_components) < 0:
            raise ElbokitError(f"n_components must be a positive integer (or 0 to choose by BIC), got {n_components}.")
        if data is None:
            k = int(n_components or 1)
            self.register_buffer("logits", torch.zeros(k))
            self.register_buffer("means", torch.zeros(k, self.dim))
            self.register_buffer("scale_tril", torch.eye(self.dim).expand(k, -1, -1).clone())
            return
        weights, means, covs = fit_gmm(data.double().numpy(), n_components, max_components, seed)
        self.register_buffer("logits", torch.as_tensor(np.log(weights), dtype=torch.float32))
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float32))
        self.register_buffer("scale_tril", torch.linalg.cholesky(torch.as_tensor(covs, dtype=torch.float64)).float())

    @property
    def n_components(self) -> int:
        return self.logits.shape[0]

    def distribution(self) -> D.Distribution:
        return D.MixtureSameFamily(
            D.Categorical(logits=self.logits),
            D.MultivariateNormal(self.means, scale_tril=self.scale_tril),
        )

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z of shape (..., dim): the value of `distribution().log_prob(z)`.

        Why not through `distribution()`: building `MixtureSameFamily(Categorical,
        MultivariateNormal)` validates its arguments on every call, and its log_prob broadcasts
        z against every component through several reshapes; in the `ed` objective's per-step
        cross-entropy that was 1.2-1.4 ms of a 512-code batch's forward and backward, against
        0.5-0.9 ms for the same arithmetic written out here (docs/benchmarks.md): the
        differences to the K means whitened by one triangular solve per component, the Gaussian
        log-densities (K, n) and a logsumexp over K with the log-weights. Same maths as torch's (tests/test_priors.py
        compares values and gradients)."""
        shape = z.shape[:-1]
        dtype = torch.promote_types(z.dtype, self.means.dtype)
        flat = z.reshape(-1, z.shape[-1]).to(dtype)
        tril = self.scale_tril.to(dtype)
        diff = flat.T.unsqueeze(0) - self.means.to(dtype).unsqueeze(-1)  # (K, dim, n)
        white = torch.linalg.solve_triangular(tril, diff, upper=False)
        half_log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (K,)
        log_weights = torch.log_softmax(self.logits.to(dtype), 0)
        constant = log_weights - half_log_det - 0.5 * self.dim * LOG_2PI  # (K,)
        per_component = constant.unsqueeze(-1) - 0.5 * white.pow(2).sum(1)  # (K, n)
        return torch.logsumexp(per_component, 0).reshape(shape)

    def sample(self, n: int) -> torch.Tensor:
        return self.distribution().sample((n,))

    def spec(self) -> dict[str, Any]:
        return {"dim": self.dim, "n_components": self.n_components}


def fit_gmm(x: np.ndarray, n_components: int | None, max_components: int, seed: int):
    """Fit a full-covariance GaussianMixture; choose the size by BIC when n_components is 0/None."""
    from sklearn.mixture import GaussianMixture

    if len(x) < 2:
        raise ElbokitError("The 'gmm' prior needs at least 2 prior samples.")

    def fit(k: int) -> GaussianMixture:
        return GaussianMixture(k, covariance_type="full", random_state=seed, reg_covar=1e-6).fit(x)

    if n_components:
        k = int(n_components)
        if k > len(x):
            raise ElbokitError(f"n_components={k} is more than the {len(x)} prior samples.")
        gm = fit(k)
    else:
        candidates = [fit(k) for k in range(1, min(int(max_components), len(x)) + 1)]
        gm = min(candidates, key=lambda g: g.bic(x))
    return gm.weights_, gm.means_, gm.covariances_


class SamplePrior(Prior):
    """Sample-only prior: draws from a bank of prior samples without replacement; has no log_prob.

    `sample(n)` returns n bank rows in random order without replacement; for n larger than the
    bank it goes through the bank in whole random passes, so no row appears more than
    ceil(n / bank) times. `reference_sample(n)` (what the k-NN cross-entropy, `elbokit
    evaluate` and the conformance checks use for a reference set) returns min(n, bank)
    distinct rows. Sampling with replacement would put duplicates at distance zero and bias
    the k-NN cross-entropy low (13.38 against 10.76 on a small bank).
    """

    name = "samples"
    has_log_prob = False
    needs_samples = True
    option_help = {"n_bank": "the bank size of a prior rebuilt from a checkpoint (filled in by elbokit; "
                             "with --prior-samples the bank is the file's rows)"}

    def __init__(self, dim: int | None = None, samples: Any = None, n_bank: int | None = None):
        if samples is None and dim is None:
            raise ElbokitError("The 'samples' prior needs samples= an (n, dim) array of prior samples.")
        data = as_sample_matrix(samples) if samples is not None else None
        if data is not None and dim is not None and data.shape[1] != int(dim):
            raise ElbokitError(f"The prior samples have dimension {data.shape[1]} but the latent dimension is {dim}.")
        super().__init__(dim if dim is not None else data.shape[1])
        if data is None:
            data = torch.zeros(int(n_bank or 1), self.dim)
        self.register_buffer("bank", data)

    @property
    def distinct_samples(self) -> int:
        return self.bank.shape[0]

    def sample(self, n: int) -> torch.Tensor:
        size = self.bank.shape[0]
        passes = [torch.randperm(size, device=self.bank.device) for _ in range(-(-int(n) // size))]
        idx = torch.cat(passes)[:n] if passes else torch.zeros(0, dtype=torch.long, device=self.bank.device)
        return self.bank[idx]

    def reference_sample(self, n: int) -> torch.Tensor:
        return self.sample(min(int(n), self.bank.shape[0]))

    def spec(self) -> dict[str, Any]:
        return {"dim": self.dim, "n_bank": self.bank.shape[0]}


@hookimpl
def register_priors(register):
    register(StandardNormalPrior)
    register(GMMPrior)
    register(SamplePrior)
