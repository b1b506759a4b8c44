"""Honest held-out evaluation of a trained VAE, whatever objective trained it (docs/design.md section 5).

The training loss is never the metric: a model is scored against its own prior with

- `elbo`: E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z)), a lower bound on log p(x);
- `iwae`: log (1/K) sum_k p(x, z_k) / q(z_k|x) with K importance samples (Burda et al. 2016),
  a tighter lower bound: E[elbo] <= E[iwae_K] <= E[iwae_{K+1}] <= log p(x);
- the ELBO-surgery terms (Hoffman & Johnson 2016) of the aggregate posterior of the
  evaluated set, q(z) = (1/N) sum_n q(z|x_n): KL_x = I_q(x;z) + KL(q(z) || p(z)), and
  KL(q(z) || p(z)) = -H[q(z)] + H[q(z), p(z)]; the exact mixture up to SURGERY_EXACT_MAX
  examples, a subsampled estimate with its standard error above (docs/evaluation.md);
- `exact_loglik` when the data came from the `gaussian` generator (x ~ N(0, W^T W + s^2 I));
- the paper's Table II metrics, which are not a bound (docs/design.md section 6).

Everything is in nats per example (sums over data and latent dimensions, means over
examples). Log-likelihoods are reported in the original data units: a model trained on
standardised features gives log-densities of standardised x, and log p(x) = log p(x_std) +
log|d x_std / d x| = log p(x_std) - sum_d log std_d (`Standardizer.log_abs_det_jacobian`).

`evaluate_model` needs only a model with `encode(x) -> q(z|x)` (a torch Distribution with
event shape (L,)) and `decode(z)` (or a `decoder` module), a prior and a likelihood; it
returns a JSON-able dict. `evaluate_run` does the same for a run directory loaded by
`elbokit.run.load_run`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from torch import distributions as D

from .errors import ElbokitError
from .metrics import EVALUATION, range_notes
from .ops import kth_neighbour_distance, log_unit_ball_volume, logsumexp_gaussian_mixture

DEFAULT_IW_SAMPLES = 1000
"""K for `elbokit evaluate` and for the end-of-training call: about 2.5 s for 1000 points with
the paper's 2 x 400 MLP on 2 CPU cores (docs/evaluation.md has the measurements)."""

DEFAULT_ROWS = 4096
"""(example, sample) pairs decoded at once: bounds the memory of the importance-sampling pass
(activations are rows x widest layer) independently of N and K. From 1024 to 16384 the time
is the same on 2 CPU cores; larger blocks only cost memory."""

SURGERY_DRAWS = 10000
"""Total samples z ~ q(z|x_n) for the aggregate-posterior (surgery) terms: ceil(10000 / N) per
example (at least 1), so their cost, O(draws x N), stays near 10^4 N pair evaluations."""

SURGERY_BLOCK = 1 << 20
"""(sample, component) pairs per block of the aggregate density: 8 MB of float64 each."""

SURGERY_EXACT_MAX = 10000
"""Up to this many evaluated examples the aggregate posterior is the exact N-component mixture
(about 10^4 N pair evaluations, 1.5 s at N = 10^4 on 2 CPU cores); above it the
subsampled estimator of `aggregate_posterior_terms` runs instead (cost independent of N)."""

SURGERY_COMPONENTS = 1024
"""Mixture components drawn per evaluation point by the subsampled estimator (besides the
point's own component): its Jensen bias on log q(z) shrinks as 1 / SURGERY_COMPONENTS; its
cost is SURGERY_DRAWS x SURGERY_COMPONENTS pairs (about 1 s on 2 busy CPU cores at L = 2)."""

ACTIVE_UNIT_THRESHOLD = 0.01
"""Burda et al. (2016): a latent dimension is active if Cov_x(E[z|x]) > 0.01."""

KNN_K = 3
KNN_PRIOR_SAMPLES = 10000
"""k and the number of prior samples of the k-NN cross-entropy for a sample-only prior."""

def _bounds() -> dict[str, str]:
    """{name: what it bounds} of the evaluation metrics that are bounds or not-bounds, from
    the table of metric names (`elbokit.metrics`)."""
    return {m.name: m.note or m.kind for m in EVALUATION.values()
            if m.kind in ("lower bound", "exact", "not a bound")}


def _units() -> dict[str, str]:
    """{name: units} of every evaluation metric, from `elbokit.metrics`."""
    return {m.name: m.units for m in EVALUATION.values()}


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator for the block and restore the caller's state afterwards, so
    that evaluation is reproducible and does not perturb a training run's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def _eval_mode(*modules: Any):
    """model.eval() (no dropout, batch-norm statistics frozen) for the block, then restore."""
    modes = [(m, m.training) for m in modules if isinstance(m, torch.nn.Module)]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def _decoder(model: Any):
    if hasattr(model, "decode"):
        return model.decode
    if hasattr(model, "decoder"):
        return model.decoder
    raise ElbokitError("The model needs a decode(z) method or a decoder module to be evaluated.")


def _device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters() if isinstance(model, torch.nn.Module) else ():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _normal_parts(q: D.Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    base = q.base_dist if isinstance(q, D.Independent) else q
    if not isinstance(base, D.Normal):
        raise ElbokitError("Evaluating the aggregate posterior needs a diagonal Gaussian q(z|x) "
                           "(torch.distributions.Independent(Normal(loc, scale), 1)).")
    return base.loc, base.scale


def analytic_kl(q: D.Distribution, prior: Any) -> torch.Tensor | None:
    """KL(q(z|x) || p(z)) per example by torch's registry resolved to the base distributions
    (`elbokit.estimators.analytic_kl`, the decision every KL to the prior uses), or None where
    there is no closed form or no density."""
    from .estimators import analytic_kl as closed_form

    dist = prior.distribution() if getattr(prior, "has_log_prob", True) else None
    return closed_form(q, dist)


def mean_and_se(values: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """Mean over examples and its standard error, std (ddof=1) / sqrt(N)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        return float("nan"), float("nan")
    se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
    return float(v.mean()), se


# --------------------------------------------------------------- importance-sampling pass
@torch.no_grad()
def importance_sampled_terms(model: Any, prior: Any, likelihood: Any, x: torch.Tensor, *,
                             iw_samples: int = DEFAULT_IW_SAMPLES, seed: int = 0,
                             chunk: int = DEFAULT_ROWS, std: torch.Tensor | None = None,
                             progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor | None]:
    """Per-example estimates (each (N,), model space) from K = `iw_samples` samples z_k ~ q(z|x):

    - `iwae`: logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K (None without a
      prior log_prob);
    - `log_lik`: mean_k log p(x|z_k), so `-log_lik` is the reconstruction term;
    - `kl`: analytic where torch registers the pair, else mean_k [log q(z_k|x) - log p(z_k)]
      (then with K = 1, elbo and iwae are the same number); None without a prior log_prob;
    - `sq_err`: mean_k ||x - E[x|z_k]||^2, and `sq_err_original` with the difference scaled
      by `std` (the standardiser's) when given.

    Exactly K samples per example. Memory is bounded by `chunk` (example, sample) pairs at
    once: examples are taken `chunk // K` at a time, and when K exceeds `chunk` the samples of
    one example are drawn in blocks whose log-sum-exps are combined, so N and K can be large.
    `progress(done, total)` is called after each block with the (example, sample) pairs done.
    """
    K = int(iw_samples)
    if K <= 0:
        raise ElbokitError(f"The number of importance samples must be a positive integer, got {iw_samples}.")
    rows = _streamed_rows(x, chunk)
    k_block = min(K, rows)
    per_chunk = max(1, rows // k_block)
    decode = _decoder(model)
    has_log_prob = bool(getattr(prior, "has_log_prob", True))
    n = x.shape[0]
    # Results go straight into preallocated (N,) tensors: a list of per-chunk results, each
    # allocated while the chunk's large temporaries are alive, pins heap pages (glibc) and makes
    # resident memory grow with N.
    names = ["log_lik", "sq_err"] + (["sq_err_original"] if std is not None else []) + (["iwae", "kl"] if has_log_prob else [])
    # torch.empty, not x.new_empty: x may be streamed rows of a memory-mapped file (StreamedRows).
    out = {name: torch.empty(n, dtype=x.dtype, device=x.device) for name in names}
    kl_kind = None
    with _seeded(seed):
        for start in range(0, n, per_chunk):
            stop = min(start + per_chunk, n)
            xb = x[start:stop]
            b, event = xb.shape[0], xb.shape[1:]
            q = model.encode(xb)
            kl_exact = analytic_kl(q, prior) if has_log_prob else None
            kl_kind = kl_kind or ("analytic" if kl_exact is not None else "mc")
            lse = xb.new_full((b,), -math.inf)
            log_lik_sum, log_ratio_sum, sq_sum, sq_orig_sum = (xb.new_zeros(b) for _ in range(4))
            for k0 in range(0, K, k_block):
                kb = min(k_block, K - k0)
                z = q.sample((kb,))  # (kb, b, L)
                flat_z = z.reshape(kb * b, -1)
                dec = decode(flat_z)
                flat_x = xb.expand(kb, *xb.shape).reshape(kb * b, *event)
                log_lik = likelihood.log_prob(flat_x, dec).reshape(kb, b)
                log_lik_sum += log_lik.sum(0)
                diff = xb - likelihood.mean(dec).reshape(kb, b, *event)
                sq_sum += diff.pow(2).reshape(kb, b, -1).sum(-1).sum(0)
                if std is not None:
                    sq_orig_sum += (diff * std).pow(2).reshape(kb, b, -1).sum(-1).sum(0)
                if has_log_prob:
                    # log p(z) - log q(z|x); q.log_prob broadcasts over the sample dimension.
                    log_ratio = prior.log_prob(flat_z).reshape(kb, b) - q.log_prob(z)
                    log_ratio_sum += log_ratio.sum(0)
                    # Blocks of samples combine exactly: logsumexp over all K = logaddexp of the blocks'.
                    lse = torch.logaddexp(lse, torch.logsumexp(log_lik + log_ratio, dim=0))
                if progress is not None:
                    progress(start * K + (k0 + kb) * b, n * K)
            out["log_lik"][start:stop] = log_lik_sum / K
            out["sq_err"][start:stop] = sq_sum / K
            if std is not None:
                out["sq_err_original"][start:stop] = sq_orig_sum / K
            if has_log_prob:
                out["iwae"][start:stop] = lse - math.log(K)
                out["kl"][start:stop] = kl_exact if kl_exact is not None else -log_ratio_sum / K
    result: dict[str, Any] = {name: out.get(name) for name in ("iwae", "log_lik", "kl", "sq_err", "sq_err_original")}
    result["kl_estimator"] = kl_kind if has_log_prob else None
    return result


def _streamed_rows(x: Any, chunk: int) -> int:
    """`chunk`, or for streamed rows of a memory-mapped file (`StreamedRows`) at most as many
    rows as make CHUNK_VALUES values, so that wide examples never make blocks of hundreds of
    MB (data in memory keep `chunk`, on which their random draws, hence their numbers, depend)."""
    from .data import StreamedRows, chunk_rows

    rows = max(1, int(chunk))
    if isinstance(x, StreamedRows):
        rows = min(rows, chunk_rows(int(np.prod(x.shape[1:]))))
    return rows


@torch.no_grad()
def estimate_iw_seconds(model: Any, prior: Any, likelihood: Any, x: torch.Tensor, *, iw_samples: int,
                        chunk: int = DEFAULT_ROWS) -> float:
    """The time `importance_sampled_terms` will take on `x` with K = `iw_samples`, measured:
    one block of `chunk` (example, sample) pairs is timed (after one untimed warm-up block) and
    scaled to the N x K pairs, which cost the same per pair. Memory does not grow with K (the
    pass works in blocks), so time is what a large K costs. The random state is left as it was."""
    K = int(iw_samples)
    n = x.shape[0]
    chunk = _streamed_rows(x, chunk)
    probe_k = max(1, min(K, int(chunk)))
    probe_rows = max(1, min(n, int(chunk) // probe_k))
    xb = x[:probe_rows]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        importance_sampled_terms(model, prior, likelihood, xb[:1], iw_samples=min(probe_k, 64), chunk=chunk)
        started = time.perf_counter()
        importance_sampled_terms(model, prior, likelihood, xb, iw_samples=probe_k, chunk=chunk)
        seconds = time.perf_counter() - started
    return seconds * (n * K) / (probe_rows * probe_k)


# ------------------------------------------------------------ the aggregate posterior
def knn_cross_entropy_terms(z: torch.Tensor, prior_samples: torch.Tensor, k: int = KNN_K,
                            chunk: int = 1024) -> torch.Tensor:
    """Per-sample terms of the k-NN cross-entropy H[q(z), p(z)] to prior samples (docs/design.md
    section 3): psi(M_p) - psi(k) + log c_d + d log rho_k(z_i); their mean is the estimate."""
    m, d = prior_samples.shape
    if m <= k:
        raise ElbokitError(f"The k-NN cross-entropy needs more than k={k} prior samples.")
    # Full precision away from the origin, memory linear in the number of points (elbokit.ops).
    rho = kth_neighbour_distance(z, prior_samples, k)
    const = float(torch.special.digamma(torch.tensor(float(m))) - torch.special.digamma(torch.tensor(float(k))))
    return const + log_unit_ball_volume(d) + d * rho.clamp_min(1e-12).log()


@torch.no_grad()
def aggregate_posterior_terms(loc: torch.Tensor, scale: torch.Tensor, prior: Any, *,
                              samples_per_point: int | None = None, seed: int = 0,
                              n_prior_samples: int = KNN_PRIOR_SAMPLES, exact_max: int | None = None,
                              points: int | None = None, components: int | None = None) -> dict[str, Any]:
    """Per-point Monte-Carlo terms of the ELBO surgery with the aggregate posterior
    q(z) = (1/N) sum_m q(z|x_m) of the N given posteriors (diagonal Gaussians):

    with z_ns ~ q(z|x_n), s = 1..S, each entry is a mean over s of
    - `mi`: log q(z_ns|x_n) - log q(z_ns)          (mean: I_q(x;z), at most log N)
    - `entropy`: -log q(z_ns)                       (mean: H[q(z)])
    - `cross_entropy`: -log p(z_ns), or the k-NN term to prior samples for a prior without
      log_prob (mean: H[q(z), p(z)])
    - `kl_mc`: log q(z_ns|x_n) - log p(z_ns) = mi + (cross_entropy - entropy), the Monte-Carlo
      KL_x the identity compares with (None without log_prob).

    N <= `exact_max`: every point, S = ceil(SURGERY_DRAWS / N), and log q(z) is the exact
    N-component mixture density, evaluated by `elbokit.ops` (matrix products) in float64
    blocks of SURGERY_BLOCK pairs: memory linear in N, time O(10^4 N). `points` is None.

    N > `exact_max` (subsampled; cost O(points x components), whatever N): `points` examples
    drawn uniformly without replacement (their indices are returned as `points`, so the
    caller pairs them with its own per-example values), S = `samples_per_point` or 1, and
    q(z_ns) replaced by

        q^(z) = (1/N) [q(z|x_n) + (N - 1)/M sum_{j=1..M} q(z|x_{m_j})],

    m_j drawn uniformly with replacement from the other N - 1 examples, afresh for every
    point: an unbiased estimate of q(z). Its log is biased low (Jensen), by about
    Var[q^] / (2 q^2) = O(1/M), so `entropy` and `mi` read slightly high and `marginal_kl`
    slightly low; keeping the point's own component exactly keeps mi <= log N. Each point has
    its own components, so the points' terms are independent and the usual standard error
    over points covers both sources of randomness. Tested against the exact mixture
    (tests/test_streaming.py).
    """
    n, latent = loc.shape
    # None: the module's settings, read now (SURGERY_EXACT_MAX, SURGERY_DRAWS, SURGERY_COMPONENTS).
    exact_max = SURGERY_EXACT_MAX if exact_max is None else int(exact_max)
    points = SURGERY_DRAWS if points is None else int(points)
    components = SURGERY_COMPONENTS if components is None else int(components)
    loc64, scale64 = loc.double(), scale.double()
    subsample = n > exact_max
    with _seeded(seed):
        if subsample:
            S = int(samples_per_point) if samples_per_point else 1
            pick = torch.randperm(n, device=loc.device)[:min(n, int(points))].sort().values
            p_loc, p_scale = loc64[pick], scale64[pick]
        else:
            S = int(samples_per_point) if samples_per_point else max(1, math.ceil(SURGERY_DRAWS / n))
            pick, p_loc, p_scale = None, loc64, scale64
        n_points = p_loc.shape[0]
        z = p_loc + p_scale * torch.randn(S, n_points, latent, dtype=torch.float64, device=loc.device)  # (S, P, L)
        prior_samples = None
        if not getattr(prior, "has_log_prob", True):
            # Distinct points (a bank prior gives min(n, bank) rows, never duplicates).
            prior_samples = prior.reference_sample(int(n_prior_samples)).double()
        log_cond = D.Normal(p_loc, p_scale).log_prob(z).sum(-1)  # (S, P): log q(z_ns | x_n)
        if subsample:
            log_agg = _subsampled_log_aggregate(z, log_cond, pick, loc64, scale64, int(components))
        else:
            log_agg = _exact_log_aggregate(z, loc64, scale64)
    flat = z.reshape(S * n_points, latent)
    if prior_samples is not None:
        xent = knn_cross_entropy_terms(flat, prior_samples).reshape(S, n_points)
        kl_mc, xent_kind = None, f"knn (k={KNN_K}, {prior_samples.shape[0]} prior samples)"
    else:
        log_p = prior.log_prob(flat.to(loc.dtype)).double().reshape(S, n_points)
        xent, kl_mc, xent_kind = -log_p, (log_cond - log_p).mean(0), "mc"
    if subsample:
        how = {"kind": "subsampled", "points": n_points, "samples_per_point": S, "components": int(components),
               "bias": "log q(z) from an unbiased estimate of q(z): biased low by O(1/components) (Jensen), "
                       "so aggregate_entropy and mi read slightly high, marginal_kl slightly low"}
    else:
        how = {"kind": "exact", "points": n_points, "samples_per_point": S, "components": n}
    return {"mi": (log_cond - log_agg).mean(0), "entropy": (-log_agg).mean(0),
            "cross_entropy": xent.mean(0), "kl_mc": kl_mc, "cross_entropy_estimator": xent_kind,
            "points": pick, "estimator": how}


def _exact_log_aggregate(z: torch.Tensor, loc64: torch.Tensor, scale64: torch.Tensor) -> torch.Tensor:
    """log q(z) = log (1/N) sum_m q(z|x_m) at every z (S, N, L), by matrix products in blocks."""
    S, n, latent = z.shape
    flat = z.reshape(S * n, latent)
    rows = max(1, SURGERY_BLOCK // n)
    # Written into one preallocated tensor: keeping a list of small per-block results, each
    # allocated while the block's large temporaries were alive, pins those temporaries' heap
    # pages (glibc), and resident memory then grew by a block per block (2 GB at N = 5000).
    log_agg = torch.empty(S * n, dtype=torch.float64, device=z.device)
    for start in range(0, S * n, rows):
        log_agg[start:start + rows] = logsumexp_gaussian_mixture(flat[start:start + rows], loc64, scale64, chunk=rows)
    return (log_agg - math.log(n)).reshape(S, n)


def _subsampled_log_aggregate(z: torch.Tensor, log_cond: torch.Tensor, pick: torch.Tensor, loc64: torch.Tensor,
                              scale64: torch.Tensor, components: int) -> torch.Tensor:
    """log q^(z) of `aggregate_posterior_terms` (subsampled) at z (S, P, L) drawn from the
    posteriors of rows `pick` (P,), whose own log-densities are `log_cond` (S, P). Each point
    gathers its own M components, in blocks of about 2^20 values. The diagonal Gaussian
    log-density is written out (as `Normal.log_prob` computes it, without its argument checks,
    which cost more than the arithmetic here), with each component's sum of log scales once."""
    S, P, latent = z.shape
    n, M = loc64.shape[0], max(1, int(components))
    log_norm = -scale64.log().sum(-1) - 0.5 * latent * math.log(2 * math.pi)  # (n,)
    inv_scale = scale64.reciprocal()
    block = max(1, (1 << 20) // (S * M * latent))  # 8 MB of float64 per gathered (S, b, M, L) tensor
    log_rest = torch.empty(S, P, dtype=torch.float64, device=z.device)
    for start in range(0, P, block):
        own = pick[start:start + block]  # (b,)
        draw = torch.randint(0, n - 1, (S, own.shape[0], M), device=z.device)
        draw += draw >= own[None, :, None]  # uniform over the other n - 1 rows
        u = (z[:, start:start + block, None, :] - loc64[draw]) * inv_scale[draw]  # (S, b, M, L)
        log_rest[:, start:start + block] = torch.logsumexp(log_norm[draw] - 0.5 * u.square().sum(-1), -1)
    rest = log_rest + math.log(n - 1) - math.log(M)
    return torch.logaddexp(log_cond, rest) - math.log(n)


@torch.no_grad()
def encode_all(model: Any, x: torch.Tensor, chunk: int = DEFAULT_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """loc and scale of q(z|x) for every row of x, (N, L) each."""
    chunk = _streamed_rows(x, chunk)
    locs, scales = [], []
    for start in range(0, x.shape[0], chunk):
        loc, scale = _normal_parts(model.encode(x[start:start + chunk]))
        locs.append(loc)
        scales.append(scale.expand_as(loc))
    return torch.cat(locs), torch.cat(scales)


# -------------------------------------------------------------------- known truths
def gaussian_generator_loglik(x_original: np.ndarray, W: np.ndarray, noise_std: float) -> np.ndarray:
    """Exact log p(x) per example for x = z W + N(0, s^2 I), z ~ N(0, I): x ~ N(0, W^T W + s^2 I)."""
    W = np.asarray(W, dtype=np.float64)
    cov = torch.as_tensor(W.T @ W + float(noise_std) ** 2 * np.eye(W.shape[1]), dtype=torch.float64)
    dist = D.MultivariateNormal(torch.zeros(W.shape[1], dtype=torch.float64), covariance_matrix=cov)
    return dist.log_prob(torch.as_tensor(np.asarray(x_original), dtype=torch.float64)).numpy()


def latent_r2(code_means: np.ndarray, z_true: np.ndarray, folds: int = 5, seed: int = 0) -> float | None:
    """R^2 of a linear least-squares map from E[z|x] to the true z, cross-validated: each
    example is predicted by a fit on the other folds (so extra code dimensions cannot inflate
    it), averaged uniformly over the true latent dimensions. None for fewer than 2*folds points."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict

    code_means, z_true = np.asarray(code_means, dtype=np.float64), np.asarray(z_true, dtype=np.float64)
    if len(code_means) < 2 * folds:
        return None
    pred = cross_val_predict(LinearRegression(), code_means, z_true,
                             cv=KFold(folds, shuffle=True, random_state=seed))
    return float(r2_score(z_true, pred))


def _no_exact_reason(meta: Mapping[str, Any] | None) -> str:
    if meta and "W" in meta and "noise_std" in meta:
        return ("the data have W and noise_std but do not say they came from the 'gaussian' generator "
                "(meta generator='gaussian'), whose latents are N(0, I)")
    return "the data did not come from the 'gaussian' generator (no W and noise_std)"


def _is_gaussian_generator(meta: Mapping[str, Any] | None) -> bool:
    """True for data of the `gaussian` generator: W and noise_std alone are not enough, since
    the `mixture` generator has them too but non-Gaussian latents."""
    if not meta or "W" not in meta or "noise_std" not in meta:
        return False
    return str(np.asarray(meta.get("generator", ""))) == "gaussian"


# ------------------------------------------------------------------------ the report
def evaluate_model(model: Any, prior: Any, likelihood: Any, x: Any, *, z_true: Any = None,
                   meta: Mapping[str, Any] | None = None, standardizer: Any = None,
                   iw_samples: int = DEFAULT_IW_SAMPLES, seed: int = 0, chunk: int = DEFAULT_ROWS,
                   surgery_samples: int | None = None, progress: Callable[[int, int], None] | None = None,
                   check_cost: Callable[[float, int], None] | None = None) -> dict[str, Any]:
    """Every held-out metric of docs/design.md section 5 for data `x` in model (standardised) space.

    `z_true` (N, L') gives `latent_r2`; `meta` from the `gaussian` generator (W, noise_std)
    gives `exact_loglik`; `standardizer` (mean/std/log_abs_det_jacobian) turns log-likelihoods
    and `mse` into original data units. Returns a JSON-able dict: each estimate as a float
    with `<name>_se` its standard error over examples; what cannot be computed is None, with
    the reason under `unavailable`. See docs/evaluation.md.

    `check_cost(seconds, pairs)`, when given, is called before the importance-sampling pass
    with its estimated time (`estimate_iw_seconds`) and its N x K (example, sample) pairs: it
    may raise to refuse a request that would take too long. `progress`: see
    `importance_sampled_terms`.
    """
    started = time.perf_counter()
    K = int(iw_samples)
    if K <= 0:
        raise ElbokitError(f"--iw-samples must be a positive integer, got {iw_samples}.")
    from .data import StreamedRows

    device, dtype = _device_dtype(model)
    if not isinstance(x, StreamedRows):  # streamed rows are read a chunk at a time by every pass below
        x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(device=device, dtype=dtype)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ElbokitError(f"Evaluation needs at least 2 examples as an (N, D) or (N, C, H, W) array, got shape {tuple(x.shape)}.")
    n = int(x.shape[0])
    ladj = float(standardizer.log_abs_det_jacobian) if standardizer is not None else 0.0
    std = (torch.as_tensor(np.asarray(standardizer.std), dtype=dtype, device=device).reshape(x.shape[1:])
           if standardizer is not None else None)
    unavailable: dict[str, str] = {}
    report: dict[str, Any] = {"n": n, "iw_samples": K, "seed": int(seed)}

    with _eval_mode(model, prior, likelihood):
        if check_cost is not None:
            check_cost(estimate_iw_seconds(model, prior, likelihood, x, iw_samples=K, chunk=chunk), n * K)
        iw = importance_sampled_terms(model, prior, likelihood, x, iw_samples=K, seed=seed, chunk=chunk, std=std,
                                      progress=progress)
        loc, scale = encode_all(model, x)
        surgery = aggregate_posterior_terms(loc, scale, prior, samples_per_point=surgery_samples, seed=seed + 1)

    def put(name: str, values: torch.Tensor | None, shift: float = 0.0, reason: str | None = None) -> None:
        if values is None:
            report[name], report[f"{name}_se"] = None, None
            if reason:
                unavailable[name] = reason
            return
        mean, se = mean_and_se(values)
        report[name], report[f"{name}_se"] = mean + shift, se

    no_density = (f"prior '{getattr(prior, 'name', type(prior).__name__)}' is sample-only (no log_prob), "
                  "so log p(z) and hence this bound cannot be evaluated")
    elbo = iw["log_lik"] - iw["kl"] if iw["kl"] is not None else None
    put("elbo", elbo, ladj, no_density)
    put("iwae", iw["iwae"], ladj, no_density)
    put("recon", -iw["log_lik"], -ladj)  # -E log p(x|z) in original units: the Jacobian enters with -
    put("kl", iw["kl"], 0.0, no_density)
    report["kl_estimator"] = iw["kl_estimator"]
    if iw["sq_err_original"] is not None:
        put("mse", iw["sq_err_original"])
    else:
        put("mse", iw["sq_err"])

    put("mi", surgery["mi"])
    report["mi_max"] = math.log(n)  # I_q(x;z) of an N-point mixture is at most log N
    report["aggregate_estimator"] = surgery["estimator"]
    put("aggregate_entropy", surgery["entropy"])
    put("aggregate_cross_entropy", surgery["cross_entropy"])
    report["aggregate_cross_entropy_estimator"] = surgery["cross_entropy_estimator"]
    put("marginal_kl", surgery["cross_entropy"] - surgery["entropy"])
    if iw["kl"] is not None and surgery["kl_mc"] is not None:
        # kl - (mi + marginal_kl) = kl - kl_mc per example: zero in expectation; the SE is the
        # Monte-Carlo error of the surgery terms (and of kl when that is itself MC).
        kl_points = iw["kl"] if surgery["points"] is None else iw["kl"][surgery["points"].to(iw["kl"].device)]
        put("identity_gap", kl_points.double() - surgery["kl_mc"])
    else:
        put("identity_gap", None, reason=no_density)

    variances = loc.double().var(0, unbiased=False)
    report["active_units"] = int((variances > ACTIVE_UNIT_THRESHOLD).sum())
    report["latent_dim"] = int(loc.shape[1])

    report["latent_r2"] = None
    if z_true is not None:
        z_np = np.asarray(z_true, dtype=np.float64).reshape(n, -1)
        report["latent_r2"] = latent_r2(loc.double().cpu().numpy(), z_np, seed=seed)
        if report["latent_r2"] is None:
            unavailable["latent_r2"] = "fewer than 10 examples for the 5-fold cross-validated fit"
    else:
        unavailable["latent_r2"] = "the data carry no true latents"
    report["latent_r2_method"] = ("5-fold cross-validated linear least squares from E[z|x] to the true z on the "
                                  "evaluated set; R^2 averaged over true latent dimensions")

    if _is_gaussian_generator(meta) and not isinstance(x, StreamedRows):
        x_orig = x.double().cpu().numpy()
        if standardizer is not None:
            x_orig = standardizer.inverse(x_orig)
        exact = gaussian_generator_loglik(x_orig, meta["W"], meta["noise_std"])
        put("exact_loglik", torch.as_tensor(exact))
    else:
        put("exact_loglik", None, reason=_no_exact_reason(meta))

    # The paper's Table II (docs/design.md section 6): MSE = E||x - x^||^2 on the normalised
    # features it trains on, KLD = the per-example KL, "ELBO" = -MSE - KLD. Not a bound.
    put("paper_mse", iw["sq_err"])
    report["paper_kld"] = report["kl"]
    report["paper_elbo"] = -report["paper_mse"] - report["kl"] if report["kl"] is not None else None
    if report["kl"] is None:
        unavailable["paper_kld"] = unavailable["paper_elbo"] = no_density

    report["units"] = {**_units(), "log_abs_det_jacobian": ladj,
                       "space": "standardised model space mapped to original units" if standardizer is not None
                       else "original data units (no standardiser)"}
    report["bounds"] = _bounds()
    report["unavailable"] = unavailable
    # Estimates that left their quantity's true range (a marginal KL below 0, ...), with their SE.
    report["notes"] = range_notes(report)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


# ------------------------------------------------------------------------- run dirs
def evaluate_run(run: Any, split: str = "test", data: Any = None, iw_samples: int = DEFAULT_IW_SAMPLES,
                 seed: int = 0, chunk: int = DEFAULT_ROWS, progress: Callable[[int, int], None] | None = None,
                 check_cost: Callable[[float, int], None] | None = None) -> dict[str, Any]:
    """`evaluate_model` for a run loaded by `elbokit.run.load_run`, on its `split` or on `data`
    (an `elbokit.data.Dataset` in original units, standardised here with the run's
    standardiser). The trainer stores the result in summary.json."""
    part = _run_split(run, split) if data is None else None
    dataset = data if data is not None else getattr(part, "data", part)
    standardizer = getattr(run, "standardizer", None)
    streamed = part.x if getattr(part, "streamed", False) else None
    if streamed is None and getattr(dataset, "streamed", False):
        from .data import Standardizer, StreamedRows

        streamed = StreamedRows(dataset.x, standardizer or Standardizer.identity(dataset.event_shape), run.device)
    if streamed is not None:  # a memory-mapped file: its standardised rows, read as needed
        expected = getattr(run.model, "event_shape", None)
        if expected is not None and tuple(streamed.shape[1:]) != tuple(expected):
            raise ElbokitError(f"The data to evaluate have examples of shape {tuple(streamed.shape[1:])}, but the model "
                               f"takes examples of shape {tuple(expected)}.")
        report = evaluate_model(run.model, run.prior, run.likelihood, streamed, z_true=None,
                                meta=getattr(dataset, "meta", None), standardizer=standardizer,
                                iw_samples=iw_samples, seed=seed, chunk=chunk, progress=progress, check_cost=check_cost)
        report["split"] = split if data is None else None
        report["data"] = getattr(dataset, "name", None)
        return report
    x = np.asarray(dataset.x, dtype=np.float64)
    expected = getattr(run.model, "event_shape", None)
    if expected is None and getattr(run.model, "data_dim", None) is not None:
        expected = (int(run.model.data_dim),)
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        if x.ndim >= 2 and int(np.prod(x.shape[1:])) == int(np.prod(expected)):
            x = x.reshape(x.shape[0], *expected)  # the same values laid out as the model's examples
        else:
            raise ElbokitError(f"The data to evaluate have shape {tuple(x.shape)}, but the model takes "
                               f"{int(np.prod(expected))} features (examples of shape {tuple(expected)}).")
    if standardizer is not None:
        x = standardizer.transform(x)
    report = evaluate_model(run.model, run.prior, run.likelihood, x, z_true=getattr(dataset, "z", None),
                            meta=getattr(dataset, "meta", None), standardizer=standardizer,
                            iw_samples=iw_samples, seed=seed, chunk=chunk, progress=progress, check_cost=check_cost)
    report["split"] = split if data is None else None
    report["data"] = getattr(dataset, "name", None)
    return report


def _run_split(run: Any, split: str):
    """The run's `split` (`Run.load_split(name)`: `.data` in original units, `.x` standardised)."""
    load = getattr(run, "load_split", None)
    if not callable(load):
        raise ElbokitError("This run cannot load its data splits; give the data to evaluate explicitly (--data).")
    return load(split)
