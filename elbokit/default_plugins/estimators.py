"""Built-in estimators of KL, aggregate entropy, cross-entropy and mutual information.

All return per-example contributions of shape (B,) in nats (docs/design.md section 3).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from elbokit.batch import Batch
from elbokit.errors import ElbokitError, IncompatibleError
from elbokit.estimators import Estimator, analytic_kl, has_analytic_kl, kl_to_prior, no_analytic_kl_sentence
from elbokit.hookspecs import hookimpl
from elbokit.ops import (LOG_2PI, kth_neighbour_distance, log_unit_ball_volume, logsumexp_gaussian_mixture,
                         paired_scores_logsumexp, pairwise_gaussian_log_density)
from elbokit.priors import Prior


def _require_dataset_size(batch: Batch, who: str) -> int:
    if batch.dataset_size is None:
        raise ElbokitError(f"The {who} estimator needs the dataset size N: pass dataset_size= to build_objective or the Batch.")
    if batch.dataset_size < batch.size:
        raise ElbokitError(f"The dataset size N={batch.dataset_size} is smaller than the batch ({batch.size}).")
    return batch.dataset_size


def own_log_density(batch: Batch) -> torch.Tensor:
    """log q(z_i|x_i), shape (B,), for the diagonal Gaussian posterior the pairwise estimators
    need: `batch.posterior.log_prob(batch.z)` in torch's own formula (Normal.log_prob summed over
    the latent dimensions), without its check of the sample. Why: with argument validation on
    (torch's default) every call compares z with itself and reads the answer back to Python;
    z is the batch's own sample of the posterior, whose parameters torch checked when the
    posterior was built."""
    loc, scale = batch.posterior_loc, batch.posterior_scale
    return (-((batch.z - loc) ** 2) / (2 * scale**2) - scale.log() - math.log(math.sqrt(2 * math.pi))).sum(-1)


CHUNK_HELP = ("rows per block of the pairwise log-density (unset: blocks sized to keep memory linear in the "
              "batch); changes memory and speed, not the value")


def _chunk(chunk: int | None) -> int | None:
    """The rows per block of a pairwise log-density (None: blocks of elbokit.ops.BLOCK_PAIRS
    pairs, which keeps resident memory linear in the batch); checked when the estimator is built."""
    if chunk is None:
        return None
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive integer (rows per block, e.g. 256), got {chunk}")
    return int(chunk)


# ----------------------------------------------------------------------------- KL(q(z|x)||p)
# All three go through elbokit.estimators.kl_to_prior, the one decision "closed form or Monte
# Carlo" that validation, evaluation and the summary use too.
class AnalyticKL(Estimator):
    """Closed-form KL(q(z|x) || p(z)) by torch.distributions.kl_divergence, resolved to the base distributions."""

    quantity, name, kind = "kl", "analytic", "exact"
    scope = "example"

    def check_prior(self, prior: Prior) -> str | None:
        if not prior.has_log_prob:
            # mc and auto need the density too: point at what does work.
            return (f"prior '{prior.name}' has no density, so no KL to it can be computed; use a prior "
                    "with a density such as 'gmm', or the 'ed' terms with xent.estimator=knn.")
        if not has_analytic_kl(prior):
            return no_analytic_kl_sentence(prior)
        return None

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        return kl_to_prior(batch.posterior, batch.z, prior, "analytic")[0]


class MonteCarloKL(Estimator):
    """Monte-Carlo KL: log q(z|x) - log p(z) at the batch's sample z (unbiased)."""

    quantity, name = "kl", "mc"
    scope = "example"
    needs = frozenset({"prior_log_prob"})

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        return kl_to_prior(batch.posterior, batch.z, prior, "mc")[0]


class AutoKL(Estimator):
    """Analytic KL where torch has a rule for the pair down to the base distributions, else Monte Carlo."""

    quantity, name = "kl", "auto"
    scope = "example"
    needs = frozenset({"prior_log_prob"})

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        return kl_to_prior(batch.posterior, batch.z, prior, "auto")[0]


# ------------------------------------------------------------------------------- H[q(z)]
def mss_log_weights(m: int, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """log w for minibatch stratified sampling (Chen et al. 2018), shape (M, M).

    Row i: w_ii = 1/N (z_i's own posterior), one stratum entry (N-M+1)/(N(M-1)) at column
    (i+1) mod M, and 1/(M-1) for the other M-2 columns; every row sums to 1. (Widely copied
    code puts the 1/N in column 0 instead of on the diagonal.)
    """
    if m < 2:
        raise ElbokitError("The mss estimator needs a batch of at least 2.")
    base, special = mss_circulant_log_weights(m, n)
    w = torch.full((m, m), base, dtype=torch.float64)
    idx = torch.arange(m)
    for shift, value in special.items():
        w[idx, (idx + shift) % m] = value
    return w.to(device=device, dtype=dtype)


def mss_circulant_log_weights(m: int, n: int) -> tuple[float, dict[int, float]]:
    """The same weights as `mss_log_weights` in O(1) memory: (log 1/(M-1), {0: log 1/N,
    1: log of the stratum weight}), see `elbokit.ops.CirculantLogWeights`. For M = 2 the two
    special offsets cover every column and the base is unused."""
    if m < 2:
        raise ElbokitError("The mss estimator needs a batch of at least 2.")
    special = {1: math.log((n - m + 1) / (n * (m - 1))), 0: -math.log(n)}
    return -math.log(m - 1), special


class EntropyMWS(Estimator):
    """Minibatch weighted sampling: log q^(z_i) = logsumexp_j log q(z_i|x_j) - log(N M)."""

    quantity, name = "entropy", "mws"
    option_help = {"chunk": CHUNK_HELP}
    scope = "batch"
    needs = frozenset({"dataset_size"})

    def __init__(self, chunk: int | None = None):
        super().__init__()
        self.chunk = _chunk(chunk)

    def log_aggregate(self, batch: Batch, log_q_own: torch.Tensor | None = None) -> torch.Tensor:
        """log q^(z_i), (B,). `log_q_own` is log q(z_i|x_i) if the caller already has it."""
        n = _require_dataset_size(batch, "mws")
        if log_q_own is None:
            log_q_own = own_log_density(batch)
        lse = logsumexp_gaussian_mixture(batch.z, batch.posterior_loc, batch.posterior_scale,
                                         chunk=self.chunk, diagonal=log_q_own)
        return lse - math.log(n * batch.size)

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        return -self.log_aggregate(batch)


class EntropyMSS(Estimator):
    """Minibatch stratified sampling: log q^(z_i) = logsumexp_j (log w_ij + log q(z_i|x_j))."""

    quantity, name = "entropy", "mss"
    option_help = {"chunk": CHUNK_HELP}
    scope = "batch"
    needs = frozenset({"dataset_size"})

    def __init__(self, chunk: int | None = None):
        super().__init__()
        self.chunk = _chunk(chunk)

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        n = _require_dataset_size(batch, "mss")
        # Circulant weights, not a dense (M, M) matrix: memory stays linear in the batch.
        lse = logsumexp_gaussian_mixture(batch.z, batch.posterior_loc, batch.posterior_scale,
                                         chunk=self.chunk, diagonal=own_log_density(batch),
                                         circulant_log_weights=mss_circulant_log_weights(batch.size, n))
        return -lse


class EntropyGaussian(Estimator):
    """Entropy of a Gaussian with the batch's sample covariance: biased low, tends to an upper bound on H[q(z)] as M grows.

    The Gaussian with q(z)'s covariance Sigma has the largest entropy of all laws with that
    covariance, so H[N(Sigma)] >= H[q(z)], with equality when q(z) is Gaussian. This estimator
    plugs in the batch's sample covariance S instead, and E[log det S] < log det Sigma:
    E[log det S] = log det Sigma + sum_{i=1..L} psi((M - i)/2) + L log(2/(M - 1)), about
    -L(L+1)/(2M), so the value is biased low by about L(L+1)/(4M) nats and is not a bound on a
    finite batch (tests/test_estimators.py checks the expectation).
    """

    quantity, name, kind = "entropy", "gaussian", "estimate"
    option_help = {"jitter": "added to the diagonal of the sample covariance before its log-determinant"}
    scope = "batch"

    def __init__(self, jitter: float = 1e-6):
        super().__init__()
        self.jitter = float(jitter)

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        z = batch.z
        if batch.size < 2:
            raise ElbokitError("The gaussian entropy estimator needs a batch of at least 2.")
        cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
        cov = cov + self.jitter * torch.eye(z.shape[1], device=z.device, dtype=z.dtype)
        h = 0.5 * (z.shape[1] * (1.0 + LOG_2PI) + torch.logdet(cov))
        return h.expand(batch.size)


class ConditionalEntropyLogvar(Estimator):
    """The paper's 0.5*sum(1 + log 2pi + log s^2): the CONDITIONAL entropy E_x H[q(z|x)], not H[q(z)]."""

    quantity, name, kind = "entropy", "logvar", "estimate"
    scope = "example"

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        scale = batch.posterior_scale
        return 0.5 * (1.0 + LOG_2PI + 2.0 * scale.log()).sum(-1)


class EntropyKNN(Estimator):
    """Kozachenko-Leonenko k-nearest-neighbour entropy of the batch's z; needs no density."""

    quantity, name = "entropy", "knn"
    option_help = {"k": "the neighbour whose distance is used (k >= 1, less than the batch size)"}
    scope = "batch"

    def __init__(self, k: int = 3):
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        m, d = batch.z.shape
        if m <= self.k:
            raise ElbokitError(f"The knn entropy estimator needs a batch larger than k={self.k}.")
        rho = kth_neighbour_distance(batch.z, batch.z, self.k, exclude_self=True).clamp_min(1e-12)
        const = torch.special.digamma(torch.tensor(float(m))) - torch.special.digamma(torch.tensor(float(self.k)))
        return float(const) + log_unit_ball_volume(d) + d * rho.log()


# --------------------------------------------------------------------------- H[q(z), p(z)]
def _closed_form_cross_entropy(batch: Batch, prior: Prior) -> torch.Tensor | None:
    """E_q(z|x_i)[-log p(z)] = KL(q(z|x_i) || p) + H[q(z|x_i)] per example where torch has the KL
    in closed form (the one decision of `elbokit.estimators.analytic_kl`), else None. For the
    standard normal this is 0.5 * (L log 2pi + ||mu_i||^2 + sum sigma_i^2)."""
    if not prior.has_log_prob:
        return None
    kl = analytic_kl(batch.posterior, prior.distribution())
    return None if kl is None else kl + batch.posterior.entropy()


def _kl_pair_key(posterior: torch.distributions.Distribution) -> tuple:
    """What decides whether `_closed_form_cross_entropy` finds a closed form, besides the prior:
    the posterior's type (and its base distribution's) and the KL rules registered in
    torch.distributions (`register_kl` adds one)."""
    base = posterior.base_dist if isinstance(posterior, torch.distributions.Independent) else None
    return type(posterior), type(base), len(torch.distributions.kl._KL_REGISTRY)


class CrossEntropyAnalytic(Estimator):
    """Closed form E_q(z|x)[-log p(z)] per example (standard-normal, any prior with a closed-form KL; not gmm or samples)."""

    quantity, name, kind = "cross_entropy", "analytic", "exact"
    scope = "example"

    def check_prior(self, prior: Prior) -> str | None:
        if not has_analytic_kl(prior):
            instead = "mc or knn" if prior.has_log_prob else "knn"
            return (f"no closed-form cross-entropy exists between a Gaussian posterior and prior '{prior.name}' "
                    "(there is one for standard-normal and any prior with a closed-form KL); "
                    f"use xent.estimator={instead}.")
        return None

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        value = _closed_form_cross_entropy(batch, prior)
        if value is None:
            raise IncompatibleError(self.check_prior(prior) or "no closed-form cross-entropy for this prior.")
        return value


class CrossEntropyMC(Estimator):
    """Monte Carlo: -log p(z_i) at the batch's codes."""

    quantity, name = "cross_entropy", "mc"
    scope = "example"
    needs = frozenset({"prior_log_prob"})

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        return -prior.log_prob(batch.z)


def knn_reference_refusal(prior: Prior, k: int) -> str | None:
    """One sentence if `prior` cannot give more than k distinct reference points, else None."""
    size = prior.distinct_samples
    if size is not None and size <= k:
        return (f"prior '{prior.name}' holds only {size} distinct samples, and the k-NN cross-entropy needs "
                f"more than k={k}; give more prior samples (a few thousand keep its bias small) or lower xent.k.")
    return None


class CrossEntropyKNN(Estimator):
    """k-NN cross-entropy to prior samples: psi(Mp) - psi(k) + log c_d + d log rho_k(z_i); biased (docs/design.md)."""

    quantity, name = "cross_entropy", "knn"
    option_help = {"k": "the neighbour whose distance is used (k >= 1)",
                   "n_prior": "prior samples drawn as the reference set (more than k)"}
    scope = "batch"
    needs = frozenset({"prior_samples"})

    def __init__(self, k: int = 3, n_prior: int = 2048):
        super().__init__()
        if int(k) < 1 or int(n_prior) <= int(k):
            raise ValueError(f"need k >= 1 and n_prior > k, got k={k}, n_prior={n_prior}")
        self.k, self.n_prior = int(k), int(n_prior)

    def check_prior(self, prior: Prior) -> str | None:
        return knn_reference_refusal(prior, self.k)

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        d = batch.latent_dim
        # Distinct points only (a bank prior gives min(n_prior, bank) rows); M_p is what came back.
        ref = prior.reference_sample(self.n_prior).to(batch.z)
        m_p = ref.shape[0]
        if m_p <= self.k:
            raise ElbokitError(knn_reference_refusal(prior, self.k)
                               or f"The k-NN cross-entropy got {m_p} prior samples and needs more than k={self.k}.")
        rho = kth_neighbour_distance(batch.z, ref, self.k).clamp_min(1e-12)
        const = torch.special.digamma(torch.tensor(float(m_p))) - torch.special.digamma(torch.tensor(float(self.k)))
        return float(const) + log_unit_ball_volume(d) + d * rho.log()


class CrossEntropyAuto(Estimator):
    """analytic where there is a closed form (standard-normal), else mc for priors with log_prob, else knn."""

    quantity, name = "cross_entropy", "auto"
    option_help = {"k": "the k-NN fallback (priors without log_prob): the neighbour whose distance is used",
                   "n_prior": "the k-NN fallback: prior samples drawn as the reference set (more than k)"}
    scope = "batch"  # its knn fallback is; analytic and mc are per-example

    def __init__(self, k: int = 3, n_prior: int = 2048):
        super().__init__()
        self.knn = CrossEntropyKNN(k=k, n_prior=n_prior)
        # prior -> the (posterior types, torch KL rules) for which torch has no closed form.
        # Asking torch means building the prior's distribution (validated) and dispatching
        # kl_divergence: building the gmm prior's alone took 0.4 ms of every step, for an answer
        # that depends only on the types and the rules registered (see _kl_pair_key).
        self._no_closed_form: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self):  # the remembered answers are derived and hold weak references: not pickled
        state = self.__dict__.copy()
        state.pop("_no_closed_form", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._no_closed_form = weakref.WeakKeyDictionary()

    def check_prior(self, prior: Prior) -> str | None:
        return None if prior.has_log_prob else self.knn.check_prior(prior)

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        if prior.has_log_prob:
            # The closed form has the same expectation as mc with no Monte-Carlo variance.
            key = _kl_pair_key(batch.posterior)
            if key not in self._no_closed_form.get(prior, ()):
                value = _closed_form_cross_entropy(batch, prior)
                if value is not None:
                    return value
                self._no_closed_form.setdefault(prior, set()).add(key)
            return -prior.log_prob(batch.z)
        return self.knn(batch, prior)


# ------------------------------------------------------------------------------- I(x; z)
CRITICS = ("dot", "cosine", "encoder")


class InfoNCE(Estimator):
    """InfoNCE lower bound on I(x;z): log K - L_InfoNCE per example (<= log K).

    Critics: `cosine` (cosine similarity / temperature, default; the authors' CR-VAE used
    0.1), `dot` (z_i . z+_j, the paper's formula) and `encoder` (log q(z_i|x_j), needs no
    positives; then the bound equals mi_mws - log N).

    Why `cosine` is the default: the ELBO sign *penalises* I, so training minimises this lower
    bound, and with the unbounded `dot` critic it has no minimum (scores of positive pairs can go
    to -inf): on the paper's dataset 2 the `ed` loss diverged to about -1e11 within 20 epochs.
    The cosine critic is bounded by 1/temperature, so the term is too.
    """

    quantity, name, kind = "mi", "infonce", "lower bound"
    option_help = {"critic": "the score of a pair: cosine (cosine similarity / temperature), dot (z . z+) or "
                             "encoder (log q(z_i|x_j); needs no positives)",
                   "temperature": "divides the cosine critic's scores (> 0)",
                   "chunk": CHUNK_HELP}
    scope = "batch"
    needs = frozenset({"positives"})  # of the default critic; `encoder` needs none

    def __init__(self, critic: str = "cosine", temperature: float = 0.1, chunk: int | None = None):
        super().__init__()
        if critic not in CRITICS:
            from elbokit.errors import unknown_name

            raise unknown_name("InfoNCE critic", critic, CRITICS)
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.critic, self.temperature, self.chunk = critic, float(temperature), _chunk(chunk)
        self.needs = frozenset() if critic == "encoder" else frozenset({"positives"})

    def scores(self, batch: Batch) -> torch.Tensor:
        """Critic matrix S (K, K); row i scores z_i against every candidate j, the positive at j = i."""
        if self.critic == "encoder":
            return pairwise_gaussian_log_density(batch.z, batch.posterior_loc, batch.posterior_scale)
        if batch.z_pos is None:
            raise ElbokitError(f"The InfoNCE '{self.critic}' critic needs positives (x_pos) in the batch.")
        if self.critic == "dot":
            return batch.z @ batch.z_pos.T
        return F.normalize(batch.z, dim=-1) @ F.normalize(batch.z_pos, dim=-1).T / self.temperature

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        if self.critic == "encoder":
            diag = own_log_density(batch)
            lse = logsumexp_gaussian_mixture(batch.z, batch.posterior_loc, batch.posterior_scale,
                                             chunk=self.chunk, diagonal=diag)
        else:
            if batch.z_pos is None:
                raise ElbokitError(f"The InfoNCE '{self.critic}' critic needs positives (x_pos) in the batch.")
            cosine = self.critic == "cosine"
            # The positive's score computed directly and put on the diagonal of every block, so
            # the same number enters both diag and lse; the (K, K) matrix is never kept whole
            # for large K (see paired_scores_logsumexp).
            diag, lse = paired_scores_logsumexp(batch.z, batch.z_pos, 1.0 / self.temperature if cosine else 1.0,
                                                normalize=cosine, chunk=self.chunk)
        # diag - lse <= 0 exactly (lse includes the diagonal), so the value never exceeds log K.
        return math.log(batch.size) + (diag - lse)


class MutualInformationMWS(Estimator):
    """MWS estimate of I(x;z): log q(z_i|x_i) - log q^(z_i); offset like entropy/mws, at most log(NM), can be negative.

    Not a bound: the value carries the same constant offset as the `mws` entropy (about log M
    up to log N above I), is at most log(N M) per example, and is negative when other
    posteriors of the batch put far more density at z_i than z_i's own (a broad posterior among
    narrow ones); tests/test_estimators.py shows such a batch.
    """

    quantity, name = "mi", "mws"
    option_help = {"chunk": CHUNK_HELP}
    scope = "batch"
    needs = frozenset({"dataset_size"})

    def __init__(self, chunk: int | None = None):
        super().__init__()
        self.entropy = EntropyMWS(chunk=chunk)

    def forward(self, batch: Batch, prior: Prior) -> torch.Tensor:
        log_q_own = own_log_density(batch)
        return log_q_own - self.entropy.log_aggregate(batch, log_q_own)


@hookimpl
def register_estimators(register):
    for cls in (AnalyticKL, MonteCarloKL, AutoKL,
                EntropyMWS, EntropyMSS, EntropyGaussian, ConditionalEntropyLogvar, EntropyKNN,
                CrossEntropyAnalytic, CrossEntropyMC, CrossEntropyKNN, CrossEntropyAuto,
                InfoNCE, MutualInformationMWS):
        register(cls)
