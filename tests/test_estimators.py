"""Estimators against closed forms, Monte Carlo and naive computations (docs/design.md section 3).

Tolerances are stated next to each assertion: a number of standard errors (estimated from the
same draws) plus, where the estimator is biased, a bound on that bias. Seeds are fixed, so a
failure is reproducible rather than a flake.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from elbokit.batch import Batch, gaussian_posterior
from elbokit.errors import ElbokitError, IncompatibleError, UnknownNameError
from elbokit.objective import build_objective
from elbokit.ops import LOG_2PI, log_unit_ball_volume, logsumexp_gaussian_mixture, pairwise_gaussian_log_density

FLOAT32_EPS = torch.finfo(torch.float32).eps


def est(registry, quantity: str, name: str, **options):
    return registry.estimator(quantity, name)(**options)


def value_and_grads(fn, inputs, cot):
    """fn(*inputs) and the gradients of sum(fn(...) * cot) in each input, through fresh leaves
    (so that two calls never share a graph); `cot` a generic cotangent, not just ones."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out * cot).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def naive_pairwise(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """S[i, j] = log N(z_i; loc_j, scale_j^2) through the (R, M, L) broadcast."""
    return D.Normal(loc[None], scale[None]).log_prob(z[:, None]).sum(-1)


def gaussian_entropy(cov_diag_or_full: torch.Tensor) -> float:
    cov = cov_diag_or_full if cov_diag_or_full.ndim == 2 else torch.diag(cov_diag_or_full)
    d = cov.shape[0]
    return 0.5 * (d * (1.0 + LOG_2PI) + torch.logdet(cov.double()).item())


def aggregate_batch(n: int, dim: int, s: float, seed: int, dtype=torch.float32) -> Batch:
    """x ~ N(0, I), q(z|x) = N(x, s^2 I), so that q(z) = N(0, (1 + s^2) I) (the closed form)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    scale = torch.full_like(x, s)
    z = x + scale * torch.randn(n, dim, generator=g, dtype=dtype)
    return Batch(x=x, posterior=gaussian_posterior(x, scale), z=z, dataset_size=n)


# ------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("s, offset", [(1.0, 0.0), (0.1, 3.0), (1e-2, 3.0), (1e-3, 0.0), (1e-3, 3.0)])
def test_pairwise_log_density_is_accurate_in_float32_for_small_scales(s, offset):
    # The matrix-product expansion cancels terms of size |z|^2 / s^2; in plain float32 this
    # loses ~1e-7 * |z|^2 / s^2 nats (10 nats at s = 1e-3, |z| = 3). The entries that matter
    # for a logsumexp are those within ~30 nats of the row maximum; they must match a float64
    # naive computation to float32 rounding of the result (|S| * eps, plus 1e-5 absolute).
    torch.manual_seed(0)
    m, d = 300, 5
    loc = torch.randn(m, d) + offset
    scale = s * torch.exp(0.2 * torch.randn(m, d))
    z = loc + scale * torch.randn(m, d)
    fast = pairwise_gaussian_log_density(z, loc, scale).double()
    exact = naive_pairwise(z.double(), loc.double(), scale.double())
    relevant = exact > exact.max(dim=1, keepdim=True).values - 30.0
    err = (fast - exact).abs()[relevant]
    assert (err <= 1e-5 + 4 * FLOAT32_EPS * exact.abs()[relevant]).all()


def test_pairwise_log_density_matches_naive_in_float64():
    torch.manual_seed(1)
    z, loc = torch.randn(37, 4, dtype=torch.float64), torch.randn(53, 4, dtype=torch.float64)
    scale = torch.rand(53, 4, dtype=torch.float64) + 0.05
    torch.testing.assert_close(pairwise_gaussian_log_density(z, loc, scale), naive_pairwise(z, loc, scale),
                               rtol=1e-12, atol=1e-10)


def _lse_inputs(m: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(m, d, generator=g, dtype=torch.float64)
    scale = 0.3 + torch.rand(m, d, generator=g, dtype=torch.float64)
    z = loc + scale * torch.randn(m, d, generator=g, dtype=torch.float64)
    log_w = torch.log_softmax(torch.randn(m, m, generator=g, dtype=torch.float64), dim=1)
    return z, loc, scale, log_w


@pytest.mark.parametrize("m, chunk", [(96, 32), (96, 96), (97, 32), (97, 1), (97, 7), (50, 256)])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_logsumexp_equals_naive_with_gradients(m, chunk, weighted):
    # chunk sizes that divide M, that do not, of 1 and larger than M.
    z, loc, scale, log_w = _lse_inputs(m, 3, seed=m + chunk)
    log_w = log_w if weighted else None
    cot = torch.randn(m, dtype=torch.float64)  # a generic cotangent, not just ones

    def grads(fn):
        return value_and_grads(fn, (z, loc, scale), cot)

    def naive(zz, ll, ss):
        s = naive_pairwise(zz, ll, ss)
        return torch.logsumexp(s if log_w is None else s + log_w, dim=1)

    out_naive, g_naive = grads(naive)
    out_chunk, g_chunk = grads(lambda zz, ll, ss: logsumexp_gaussian_mixture(zz, ll, ss, log_w, chunk=chunk, max_unchunked=0))
    torch.testing.assert_close(out_chunk, out_naive, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_chunk, g_naive):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        no_grad = logsumexp_gaussian_mixture(z, loc, scale, log_w, chunk=chunk, max_unchunked=0)
    torch.testing.assert_close(no_grad, out_naive, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [16, 29, 200])
def test_chunked_logsumexp_diagonal_override(chunk):
    # With diagonal=, entry (i, i) is replaced by the given value in every chunk (the chunk's
    # diagonal is offset by its first row), and gradients reach that value.
    z, loc, scale, log_w = _lse_inputs(70, 2, seed=chunk)
    diag = torch.randn(70, dtype=torch.float64, requires_grad=True)
    s = naive_pairwise(z, loc, scale) + log_w
    s_replaced = s.clone()
    s_replaced[torch.arange(70), torch.arange(70)] = diag.detach() + log_w.diagonal()
    out = logsumexp_gaussian_mixture(z, loc, scale, log_w, chunk=chunk, diagonal=diag, max_unchunked=0)
    torch.testing.assert_close(out.detach(), torch.logsumexp(s_replaced, dim=1), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    expected = torch.softmax(s_replaced, dim=1).diagonal()  # d lse_i / d S_ii
    torch.testing.assert_close(diag.grad, expected, rtol=1e-10, atol=1e-12)


def test_log_unit_ball_volume():
    assert log_unit_ball_volume(1) == pytest.approx(math.log(2.0))
    assert log_unit_ball_volume(2) == pytest.approx(math.log(math.pi))
    assert log_unit_ball_volume(3) == pytest.approx(math.log(4.0 / 3.0 * math.pi))


# ------------------------------------------------------------------------------------ KL
def _repeated_posterior_batch(loc: torch.Tensor, scale: torch.Tensor, n_samples: int, seed: int):
    """n_samples draws of z for each of B posteriors, as one batch of B * n_samples rows."""
    torch.manual_seed(seed)
    rep_loc, rep_scale = loc.repeat(n_samples, 1), scale.repeat(n_samples, 1)
    q = gaussian_posterior(rep_loc, rep_scale)
    return Batch(x=rep_loc, posterior=q, z=q.sample())


def _make_priors(registry, dim: int):
    """One instance of every built-in prior."""
    torch.manual_seed(5)
    bank = torch.cat([torch.randn(300, dim) - 2.0, 0.5 * torch.randn(300, dim) + 1.5])
    return {
        "standard-normal": registry.prior("standard-normal")(dim=dim),
        "gmm": registry.prior("gmm")(samples=bank, n_components=2),
        "samples": registry.prior("samples")(samples=bank),
    }


def test_every_analytic_kl_agrees_with_monte_carlo(fresh_registry):
    dim, n_samples = 3, 4000
    loc = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-0.3, 0.2, 3.0], [0.1, 0.1, -0.1]])
    scale = torch.tensor([[1.0, 1.0, 1.0], [0.5, 2.0, 0.1], [1.5, 0.3, 0.8], [0.05, 1.0, 0.7]])
    analytic, mc = est(fresh_registry, "kl", "analytic"), est(fresh_registry, "kl", "mc")
    batch = _repeated_posterior_batch(loc, scale, n_samples, seed=0)
    checked = []
    for name, prior in _make_priors(fresh_registry, dim).items():
        if analytic.check_prior(prior) is not None:
            # A refusal says what to use instead, and never something that would fail too.
            assert ("kl.estimator=mc" if prior.has_log_prob else "'gmm'") in analytic.check_prior(prior)
            continue
        exact = analytic(batch, prior).view(n_samples, -1)
        assert torch.allclose(exact, exact[0].expand_as(exact))  # depends on q only, not on z
        draws = mc(batch, prior).view(n_samples, -1).double()
        se = draws.std(0) / math.sqrt(n_samples)
        # Monte Carlo is unbiased: 4.5 standard errors per posterior.
        assert ((draws.mean(0) - exact[0].double()).abs() <= 4.5 * se + 1e-6).all(), name
        checked.append(name)
    assert "standard-normal" in checked
    # And the standard-normal pair against its textbook form.
    closed = 0.5 * (loc.pow(2) + scale.pow(2) - 1.0 - 2.0 * scale.log()).sum(-1)
    torch.testing.assert_close(
        analytic(Batch(x=loc, posterior=gaussian_posterior(loc, scale), z=loc), _make_priors(fresh_registry, dim)["standard-normal"]),
        closed, rtol=1e-5, atol=1e-5)


def test_kl_auto_picks_analytic_for_standard_normal_and_mc_for_gmm(fresh_registry):
    priors = _make_priors(fresh_registry, 3)
    torch.manual_seed(2)
    loc, scale = torch.randn(64, 3), 0.5 + torch.rand(64, 3)
    q = gaussian_posterior(loc, scale)
    batch = Batch(x=loc, posterior=q, z=q.sample())
    auto, analytic, mc = (est(fresh_registry, "kl", n) for n in ("auto", "analytic", "mc"))
    sn, gmm = priors["standard-normal"], priors["gmm"]
    assert torch.equal(auto(batch, sn), analytic(batch, sn))
    assert not torch.allclose(auto(batch, sn), mc(batch, sn))  # the sample's noise is absent
    assert analytic.check_prior(gmm) is not None  # torch has no Gaussian-mixture KL
    assert torch.equal(auto(batch, gmm), mc(batch, gmm))


# ------------------------------------------------------------------------------- entropy
# The running example: x ~ N(0, I_L), q(z|x) = N(x, s^2 I), q(z) = N(0, (1 + s^2) I).
DIM, SCALE = 2, 1.0
H_AGGREGATE = 0.5 * DIM * math.log(2 * math.pi * math.e * (1 + SCALE**2))


def _closed_form_tolerance(batch: Batch, n_se: float = 4.0) -> float:
    """n_se standard errors of the mean of -log q(z_i), from its spread in this batch."""
    log_q = D.Normal(0.0, math.sqrt(1 + SCALE**2)).log_prob(batch.z.double()).sum(-1)
    return n_se * log_q.std().item() / math.sqrt(batch.size)


def test_entropy_mss_with_the_batch_as_the_dataset_matches_closed_form(fresh_registry):
    batch = aggregate_batch(2000, DIM, SCALE, seed=10)
    h = est(fresh_registry, "entropy", "mss")(batch, None).mean().item()
    # With M = N the MSS weights differ from the exact 1/N by O(1/N); the finite data set's
    # mixture differs from q(z) by O(1/N) in expectation: both << the 4-SE allowance (~0.09).
    assert abs(h - H_AGGREGATE) <= _closed_form_tolerance(batch)


def test_entropy_mss_on_minibatches_matches_closed_form(fresh_registry):
    # N = 4096 data, batches of M = 256: MSS's q^ is unbiased for q(z_i), so -log q^ is biased
    # upward only by Jensen, ~Var(q^/q)/2 ~ 1/M ~ 0.004 here.
    n, m = 4096, 256
    data = aggregate_batch(n, DIM, SCALE, seed=11)
    mss = est(fresh_registry, "entropy", "mss")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    values = []
    for idx in perm.view(-1, m):
        q = gaussian_posterior(data.posterior_loc[idx], data.posterior_scale[idx])
        values.append(mss(Batch(x=data.x[idx], posterior=q, z=data.z[idx], dataset_size=n), None))
    h = torch.cat(values).mean().item()
    assert abs(h - H_AGGREGATE) <= _closed_form_tolerance(data) + 0.01


def test_entropy_mws_with_the_batch_as_the_dataset_is_the_exact_mixture_plus_log_n(fresh_registry):
    # Chen et al.'s MWS divides by N*M (docs/design.md section 3). With M = N the sum runs over the
    # whole mixture, whose normaliser is N, so MWS = -log q(z_i) + log N exactly: the estimate
    # of H[q(z)] is offset by log N, a constant that does not move gradients.
    batch = aggregate_batch(2000, DIM, SCALE, seed=12)
    mws = est(fresh_registry, "entropy", "mws")(batch, None)
    h = mws.mean().item() - math.log(batch.size)
    assert abs(h - H_AGGREGATE) <= _closed_form_tolerance(batch)
    # Per example, against the exact mixture density computed the naive way.
    exact = -(torch.logsumexp(naive_pairwise(batch.z.double(), batch.posterior_loc.double(),
                                             batch.posterior_scale.double()), dim=1) - math.log(batch.size))
    torch.testing.assert_close(mws.double() - math.log(batch.size), exact, rtol=1e-5, atol=1e-5)


def test_entropy_knn_matches_closed_form(fresh_registry):
    batch = aggregate_batch(2000, DIM, SCALE, seed=13)
    values = est(fresh_registry, "entropy", "knn", k=3)(batch, None)
    se = values.std().item() / math.sqrt(batch.size)
    # Kozachenko-Leonenko is asymptotically unbiased; for a 2-d Gaussian at M = 2000 its bias is
    # ~0.01 nat (Kraskov et al. 2004). The kNN terms are dependent, so the naive SE is inflated
    # by 1.5: 4 * 1.5 * SE + 0.02.
    assert abs(values.mean().item() - H_AGGREGATE) <= 6 * se + 0.02


@pytest.mark.parametrize("offset", [0.0, 10.0, 100.0])
def test_entropy_knn_keeps_full_precision_away_from_the_origin(fresh_registry, offset):
    # N(c, 0.01^2 I_3), M = 2048: H = 1.5 log(2 pi e 1e-4) = -9.559 wherever c is. float32 cdist
    # (its matrix-product path) gave -65.6 at c = 10. Tolerance 0.05 nats: about 3.5 standard
    # errors of the mean of the kNN terms (sd ~0.63 each) plus the estimator's small bias.
    truth = 1.5 * math.log(2 * math.pi * math.e * 1e-4)
    z = 0.01 * torch.randn(2048, 3, generator=torch.Generator().manual_seed(30)) + offset
    batch = Batch(x=z, posterior=gaussian_posterior(z, torch.ones_like(z)), z=z)
    h = est(fresh_registry, "entropy", "knn", k=3)(batch, None).mean().item()
    assert abs(h - truth) <= 0.05


@pytest.mark.parametrize("offset", [0.0, 10.0, 100.0])
def test_cross_entropy_knn_keeps_full_precision_away_from_the_origin(fresh_registry, offset):
    # q = p = N(c, 0.01^2 I_3): H[q, p] = H[p] = -9.559. The bank is the prior's own samples
    # (without replacement, so the estimate is the kNN cross-entropy at M_p = 4096 reference points).
    truth = 1.5 * math.log(2 * math.pi * math.e * 1e-4)
    g = torch.Generator().manual_seed(31)
    bank = 0.01 * torch.randn(4096, 3, generator=g) + offset
    z = 0.01 * torch.randn(2048, 3, generator=g) + offset
    prior = fresh_registry.prior("samples")(samples=bank)
    batch = Batch(x=z, posterior=gaussian_posterior(z, torch.ones_like(z)), z=z)
    torch.manual_seed(33)
    values = est(fresh_registry, "cross_entropy", "knn", k=3, n_prior=4096)(batch, prior)
    assert abs(values.mean().item() - truth) <= 0.05


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("block_pairs", [1, 700, 1 << 20])
def test_kth_neighbour_distance_equals_float64_cdist_with_gradients(exclude_self, block_pairs):
    # Blocks of 1 row, of a few rows (700 pairs / 97 columns = 7 rows, a remainder) and whole:
    # the same neighbours and the same gradients as the dense float64 computation.
    from elbokit.ops import kth_neighbour_distance

    g = torch.Generator().manual_seed(32)
    ref = torch.randn(97, 4, generator=g, dtype=torch.float64)
    query = ref.clone() if exclude_self else torch.randn(61, 4, generator=g, dtype=torch.float64)

    def dense(q, r):
        d = torch.cdist(q, r)
        if exclude_self:
            d = d + torch.diag(torch.full((q.shape[0],), math.inf, dtype=d.dtype))
        return d.topk(3, dim=1, largest=False).values[:, -1]

    cot = torch.randn(query.shape[0], generator=g, dtype=torch.float64)
    results = []
    for fn in (dense, lambda q, r: kth_neighbour_distance(q, r, 3, exclude_self=exclude_self, block_pairs=block_pairs)):
        q = query.clone().requires_grad_()
        r = q if exclude_self else ref.clone().requires_grad_()
        out = fn(q, r)
        (out * cot).sum().backward()
        results.append((out.detach(), q.grad, None if exclude_self else r.grad))
    (a, ga, ra), (b, gb, rb) = results
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12)
    if rb is not None:
        torch.testing.assert_close(rb, ra, rtol=1e-10, atol=1e-12)


def test_entropy_knn_is_differentiable(fresh_registry):
    batch = aggregate_batch(200, 3, 0.5, seed=14)
    z = batch.z.clone().requires_grad_()
    z_dup = torch.cat([z[:20], z[:20], z[40:]])  # exact duplicates must not give NaN
    h = est(fresh_registry, "entropy", "knn")(Batch(x=batch.x, posterior=batch.posterior, z=z_dup), None).mean()
    h.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_entropy_gaussian_is_tight_on_a_large_gaussian_batch_and_the_max_entropy_value_otherwise(fresh_registry):
    gauss = est(fresh_registry, "entropy", "gaussian")
    batch = aggregate_batch(4000, DIM, SCALE, seed=15)
    h = gauss(batch, None)
    assert torch.equal(h, h[0].expand_as(h))
    # Var(log det of a sample covariance) ~ 2L/M, so SE(H) ~ 0.5 * sqrt(2L/M) = 0.016.
    assert abs(h[0].item() - H_AGGREGATE) <= 4 * 0.5 * math.sqrt(2 * DIM / batch.size)
    # Uniform on [0, 1]^3: H = 0 exactly; the Gaussian with its covariance (1/12) I has
    # H = 1.5 * (1 + log(2 pi / 12)) = 0.53 > 0.
    torch.manual_seed(16)
    u = torch.rand(4000, 3)
    h_u = gauss(Batch(x=u, posterior=gaussian_posterior(u, torch.ones_like(u)), z=u), None)[0].item()
    bound = 1.5 * (1 + math.log(2 * math.pi / 12))
    assert h_u > 0.0
    # A uniform has kurtosis 1.8 < 3, so its log-det SE is below the Gaussian one used here.
    assert abs(h_u - bound) <= 4 * 0.5 * math.sqrt(2 * 3 / 4000)


def test_entropy_gaussian_is_biased_low_by_the_expected_log_det_of_a_sample_covariance(fresh_registry):
    # On a Gaussian q(z) the max-entropy bound is tight, and the batch estimator is biased LOW:
    # E[log det S] = log det Sigma + sum_{i=1..L} psi((M - i)/2) + L log(2/(M - 1)) for the
    # unbiased sample covariance S of M Gaussian points (Wishart). With M = 16, L = 5 that is
    # -0.57 nats on the entropy; the mean over 2000 batches must match it within 4.5 SE and sit
    # below the truth, so the estimator is not an upper bound on a finite batch.
    gauss = est(fresh_registry, "entropy", "gaussian", jitter=0.0)
    m, d, n_batches = 16, 5, 2000
    truth = 0.5 * d * (1 + LOG_2PI)  # H[N(0, I_5)]
    expected_bias = 0.5 * (sum(torch.special.digamma(torch.tensor((m - i) / 2.0, dtype=torch.float64)).item()
                               for i in range(1, d + 1)) + d * math.log(2.0 / (m - 1)))
    g = torch.Generator().manual_seed(40)
    values = torch.tensor([gauss(Batch(x=z, posterior=gaussian_posterior(z, torch.ones_like(z)), z=z), None)[0].item()
                           for z in torch.randn(n_batches, m, d, generator=g, dtype=torch.float64)], dtype=torch.float64)
    se = values.std().item() / math.sqrt(n_batches)
    assert abs(values.mean().item() - (truth + expected_bias)) <= 4.5 * se
    assert values.mean().item() < truth - 10 * se
    assert est(fresh_registry, "entropy", "gaussian").kind != "upper bound"


def test_mws_mutual_information_can_be_negative(fresh_registry):
    # Broad posteriors among narrow ones centred where their codes fell: the narrow ones put far
    # more density at z_i than the broad q(z|x_i) does, so log q(z_i|x_i) - log q^(z_i) < 0 for
    # each broad one (N = M = 10, L = 3: a density ratio of (10 / 0.01)^3 = 1e9 > N M = 100), and
    # with half the batch broad the batch mean is negative too.
    m, d = 10, 3
    loc = torch.zeros(m, d, dtype=torch.float64)
    loc[1:] += 0.001 * torch.randn(m - 1, d, generator=torch.Generator().manual_seed(41), dtype=torch.float64)
    scale = torch.full((m, d), 0.01, dtype=torch.float64)
    scale[:5] = 10.0
    batch = Batch(x=loc, posterior=gaussian_posterior(loc, scale), z=loc.clone(), dataset_size=m)
    mi = est(fresh_registry, "mi", "mws")(batch, None)
    assert (mi[:5] < -10.0).all() and mi.mean().item() < 0.0
    assert (mi <= math.log(m * m) + 1e-9).all()  # the one bound it has: log(N M) per example


def test_entropy_logvar_is_the_conditional_entropy(fresh_registry):
    torch.manual_seed(17)
    loc, scale = torch.randn(50, 4), torch.exp(torch.randn(50, 4))
    q = gaussian_posterior(loc, scale)
    batch = Batch(x=loc, posterior=q, z=q.sample())
    value = est(fresh_registry, "entropy", "logvar")(batch, None)
    torch.testing.assert_close(value, q.entropy(), rtol=1e-6, atol=1e-5)
    by_hand = (0.5 * torch.log(2 * math.pi * math.e * scale.double() ** 2)).sum(-1)
    torch.testing.assert_close(value.double(), by_hand, rtol=1e-6, atol=1e-5)
    # ...which is not H[q(z)]: in the running example they differ by L/2 log((1 + s^2) / s^2).
    running = aggregate_batch(500, DIM, 0.5, seed=18)
    conditional = est(fresh_registry, "entropy", "logvar")(running, None).mean().item()
    h_agg = 0.5 * DIM * math.log(2 * math.pi * math.e * 1.25)
    assert h_agg - conditional == pytest.approx(0.5 * DIM * math.log(1.25 / 0.25), abs=1e-5)


@pytest.mark.parametrize("m, n", [(2, 10), (3, 3), (8, 100), (64, 60000), (17, 17)])
def test_mss_log_weights(m, n):
    from elbokit.default_plugins.estimators import mss_log_weights

    w = mss_log_weights(m, n, dtype=torch.float64).exp()
    assert w.shape == (m, m)
    eye = torch.eye(m, dtype=torch.bool)
    # 1/N on the diagonal (the copied code puts it in column 0).
    torch.testing.assert_close(w.diagonal(), torch.full((m,), 1.0 / n, dtype=torch.float64))
    stratum = (n - m + 1) / (n * (m - 1))
    for i in range(m):
        off = w[i][~eye[i]]
        # One stratum entry, the other M-2 equal to 1/(M-1).
        is_stratum = torch.isclose(off, torch.tensor(stratum, dtype=torch.float64), rtol=1e-12)
        is_other = torch.isclose(off, torch.tensor(1.0 / (m - 1), dtype=torch.float64), rtol=1e-12)
        if stratum != 1.0 / (m - 1):
            assert int(is_stratum.sum()) == 1 and int(is_other.sum()) == m - 2
        assert (is_stratum | is_other).all()
    torch.testing.assert_close(w.sum(1), torch.ones(m, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_mss_log_weights_refuses_a_batch_of_one():
    from elbokit.default_plugins.estimators import mss_log_weights

    with pytest.raises(ElbokitError):
        mss_log_weights(1, 10)


def test_entropy_mss_uses_its_weights(fresh_registry):
    # The estimator = logsumexp_j (log w_ij + log q(z_i|x_j)) with the naive (M, M, L) density.
    from elbokit.default_plugins.estimators import mss_log_weights

    batch = aggregate_batch(40, 3, 0.3, seed=19, dtype=torch.float64)
    batch.dataset_size = 1000
    value = est(fresh_registry, "entropy", "mss", chunk=16)(batch, None)
    s = naive_pairwise(batch.z, batch.posterior_loc, batch.posterior_scale)
    expected = -torch.logsumexp(s + mss_log_weights(40, 1000, dtype=torch.float64), dim=1)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["mws", "mss"])
def test_pairwise_entropies_need_the_dataset_size(fresh_registry, name):
    batch = aggregate_batch(10, 2, 1.0, seed=0)
    batch.dataset_size = None
    with pytest.raises(ElbokitError, match="dataset size"):
        est(fresh_registry, "entropy", name)(batch, None)
    batch.dataset_size = 5
    with pytest.raises(ElbokitError, match="smaller than the batch"):
        est(fresh_registry, "entropy", name)(batch, None)


# ------------------------------------------------------------------------- cross-entropy
def test_cross_entropy_analytic_is_the_closed_form_and_mc_has_its_expectation(fresh_registry):
    # E_q(z|x)[-log N(z; 0, I)] = 0.5 (L log 2pi + ||mu||^2 + sum sigma^2), per example, shape (B,),
    # whatever z was drawn; mc (-log p(z) at the sample) has that expectation: over 20000 draws per
    # posterior its mean is within 4.5 standard errors of the closed form.
    prior = fresh_registry.prior("standard-normal")(dim=3)
    loc = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-0.3, 0.2, 3.0]], dtype=torch.float64)
    scale = torch.tensor([[1.0, 1.0, 1.0], [0.5, 2.0, 0.1], [1.5, 0.3, 0.8]], dtype=torch.float64)
    n_samples = 20000
    batch = _repeated_posterior_batch(loc, scale, n_samples, seed=20)
    analytic = est(fresh_registry, "cross_entropy", "analytic")(batch, prior)
    assert analytic.shape == (3 * n_samples,)
    closed = 0.5 * (3 * LOG_2PI + loc.pow(2).sum(-1) + scale.pow(2).sum(-1))
    torch.testing.assert_close(analytic.view(n_samples, 3), closed.expand(n_samples, 3), rtol=1e-12, atol=1e-12)
    draws = est(fresh_registry, "cross_entropy", "mc")(batch, prior).view(n_samples, 3)
    se = draws.std(0) / math.sqrt(n_samples)
    assert ((draws.mean(0) - closed).abs() <= 4.5 * se).all()
    # auto uses the closed form for the standard normal (zero Monte-Carlo variance)...
    torch.testing.assert_close(est(fresh_registry, "cross_entropy", "auto")(batch, prior), analytic)
    # ...and mc for a prior without one.
    gmm = _make_priors(fresh_registry, 3)["gmm"]
    small = _repeated_posterior_batch(loc.float(), scale.float(), 4, seed=21)
    torch.testing.assert_close(est(fresh_registry, "cross_entropy", "auto")(small, gmm),
                               est(fresh_registry, "cross_entropy", "mc")(small, gmm))


def test_cross_entropy_analytic_batch_mean_estimates_the_aggregate_cross_entropy(fresh_registry):
    # Running example q(z) = N(0, (1 + s^2) I): H[q(z), N(0, I)] = L/2 (log 2pi + 1 + s^2). The
    # per-example closed form varies only through mu = x ~ N(0, I): 4 SE of the batch mean.
    prior = fresh_registry.prior("standard-normal")(dim=4)
    batch = aggregate_batch(4000, 4, 0.7, seed=20)
    analytic = est(fresh_registry, "cross_entropy", "analytic")(batch, prior)
    truth = 0.5 * 4 * (LOG_2PI + 1 + 0.49)
    assert abs(analytic.mean().item() - truth) <= 4 * analytic.std().item() / math.sqrt(4000)


def test_cross_entropy_analytic_refuses_priors_without_a_closed_form(fresh_registry):
    priors = _make_priors(fresh_registry, 2)
    analytic = est(fresh_registry, "cross_entropy", "analytic")
    assert analytic.check_prior(priors["standard-normal"]) is None
    reason = analytic.check_prior(priors["gmm"])
    assert reason and "no closed-form cross-entropy" in reason and "xent.estimator=mc or knn" in reason
    assert "xent.estimator=knn" in analytic.check_prior(priors["samples"])
    with pytest.raises(IncompatibleError, match="no closed-form cross-entropy"):
        build_objective("recon,xent", priors["gmm"], options={"xent": {"estimator": "analytic"}},
                        registry=fresh_registry)


def _two_gaussian_cross_entropy(m1, s1, m2, s2) -> float:
    """H(N(m1, S1), N(m2, S2)) = 0.5 [L log 2pi + log|S2| + tr(S2^-1 S1) + dm^T S2^-1 dm]."""
    s2i = torch.linalg.inv(s2)
    dm = m1 - m2
    return 0.5 * (len(m1) * LOG_2PI + torch.logdet(s2) + torch.trace(s2i @ s1) + dm @ s2i @ dm).item()


@pytest.mark.parametrize("prior_kind", ["samples", "gmm"])
def test_cross_entropy_knn_matches_two_gaussian_closed_form(fresh_registry, prior_kind):
    torch.manual_seed(21)
    m1, s1 = torch.tensor([0.5, -0.3], dtype=torch.float64), torch.tensor([[0.5, 0.0], [0.0, 0.8]], dtype=torch.float64)
    m2, s2 = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([[1.0, 0.3], [0.3, 1.5]], dtype=torch.float64)
    truth = _two_gaussian_cross_entropy(m1, s1, m2, s2)
    bank = D.MultivariateNormal(m2, s2).sample((20000,)).float()
    # `samples` draws from the bank; `gmm` with one component is N(m2, S2) up to fitting error
    # O(1/sqrt(20000)), and draws fresh samples.
    prior = fresh_registry.prior(prior_kind)(samples=bank, **({"n_components": 1} if prior_kind == "gmm" else {}))
    z = D.MultivariateNormal(m1, s1).sample((2000,)).float()
    batch = Batch(x=z, posterior=gaussian_posterior(z, torch.ones_like(z)), z=z)
    values = est(fresh_registry, "cross_entropy", "knn", k=3, n_prior=4096)(batch, prior)
    se = values.std().item() / math.sqrt(batch.size)
    # The kNN cross-entropy's finite-sample bias at 4096 reference points in 2-d is ~0.01 nat:
    # 4 SE + 0.03.
    assert abs(values.mean().item() - truth) <= 4 * se + 0.03


def test_cross_entropy_knn_is_differentiable_in_z(fresh_registry):
    prior = fresh_registry.prior("standard-normal")(dim=2)
    z = torch.randn(100, 2, requires_grad=True)
    batch = Batch(x=z, posterior=gaussian_posterior(z, torch.ones_like(z)), z=z)
    est(fresh_registry, "cross_entropy", "knn", n_prior=500)(batch, prior).mean().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_cross_entropy_auto_uses_knn_for_a_sample_only_prior(fresh_registry):
    prior = _make_priors(fresh_registry, 2)["samples"]
    batch = aggregate_batch(64, 2, 1.0, seed=22)
    torch.manual_seed(3)
    auto = est(fresh_registry, "cross_entropy", "auto", k=3, n_prior=500)(batch, prior)
    torch.manual_seed(3)
    knn = est(fresh_registry, "cross_entropy", "knn", k=3, n_prior=500)(batch, prior)
    torch.testing.assert_close(auto, knn)



def test_cross_entropy_auto_follows_the_kl_rules_torch_has_when_it_is_called(fresh_registry):
    # auto remembers that the gmm prior has no closed form (it does not ask torch every step),
    # and asks again once a KL rule is registered, as a fresh estimator would.
    class Mixture(D.MixtureSameFamily):
        pass

    gmm = _make_priors(fresh_registry, 2)["gmm"]
    gmm.distribution = lambda: Mixture(D.Categorical(logits=gmm.logits),
                                       D.MultivariateNormal(gmm.means, scale_tril=gmm.scale_tril))
    batch = aggregate_batch(64, 2, 0.5, seed=23)
    auto = est(fresh_registry, "cross_entropy", "auto")
    for _ in range(2):  # asked, then remembered: -log p(z) both times
        torch.testing.assert_close(auto(batch, gmm), -gmm.distribution().log_prob(batch.z))

    def fake_rule(q, p):  # a made-up closed form, to see that it is used
        return q.mean.sum(-1) ** 2

    D.register_kl(D.Independent, Mixture)(fake_rule)
    try:
        expected = fake_rule(batch.posterior, None) + batch.posterior.entropy()
        torch.testing.assert_close(auto(batch, gmm), expected)
    finally:
        D.kl._KL_REGISTRY.pop((D.Independent, Mixture))
        D.kl._KL_MEMOIZE.clear()
    torch.testing.assert_close(auto(batch, gmm), -gmm.distribution().log_prob(batch.z))
    import pickle

    again = pickle.loads(pickle.dumps(auto))  # what it remembers is not part of its state
    torch.testing.assert_close(again(batch, gmm), -gmm.distribution().log_prob(batch.z))


# ------------------------------------------------------------------------------- InfoNCE
def _critic_batch(z: torch.Tensor, z_pos: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> Batch:
    scale = torch.ones_like(z) if scale is None else scale
    return Batch(x=z, posterior=gaussian_posterior(z, scale), z=z, z_pos=z_pos, dataset_size=len(z))


def _log_k_float32(k: int) -> float:
    return float(torch.tensor(math.log(k), dtype=torch.float32))


def test_infonce_never_exceeds_log_k(fresh_registry):
    torch.manual_seed(23)
    k, d = 256, 4
    z = torch.randn(k, d)
    # The float32 value of log K is the ceiling, as the per-example value is log K + (<= 0).
    ceiling = _log_k_float32(k)
    cases = {
        "dot, positives far larger than the codes": ("dot", _critic_batch(z, 1e4 * z)),
        "dot, anti-aligned positives": ("dot", _critic_batch(z, -1e3 * z)),
        "dot, random positives": ("dot", _critic_batch(z, torch.randn(k, d))),
        "cosine, tiny temperature": ("cosine", _critic_batch(z, z + 1e-3 * torch.randn(k, d))),
        "encoder, tiny scales far from 0": (
            "encoder", _critic_batch(z + 3.0, scale=torch.full((k, d), 1e-3))),
        "encoder, broad scales": ("encoder", _critic_batch(z, scale=torch.full((k, d), 10.0))),
    }
    for label, (critic, batch) in cases.items():
        if critic == "encoder":  # z_i drawn from its own q(z|x_i)
            batch.z = batch.posterior.sample()
        temperature = 1e-3 if critic == "cosine" else 0.1
        value = est(fresh_registry, "mi", "infonce", critic=critic, temperature=temperature)(batch, None)
        assert torch.isfinite(value).all(), label
        assert (value <= ceiling).all(), label


def test_infonce_reaches_log_k_with_a_perfect_critic(fresh_registry):
    # Orthonormal codes and their positives, cosine critic at temperature 0.01: the positive
    # scores 100 and every negative 0, so the bound is log K - log(1 + (K-1) e^-100) = log K.
    k = 8
    z = torch.eye(k)
    value = est(fresh_registry, "mi", "infonce", critic="cosine", temperature=0.01)(_critic_batch(z, z.clone()), None)
    torch.testing.assert_close(value, torch.full((k,), math.log(k)), rtol=0, atol=1e-6)


def test_infonce_encoder_critic_near_true_mi_of_correlated_gaussians(fresh_registry):
    # x ~ N(0, I_d), z | x ~ N(rho x, (1 - rho^2) I): I(x; z) = -d/2 log(1 - rho^2) = 0.174.
    # With the true conditional as critic, InfoNCE's bias is about (E[r] - 1)/K, r the density
    # ratio, E[r] = (1 - rho^2)^-d = 1.42: 4e-4 at K = 1024, far below the 4-SE allowance.
    d, rho, k, n_batches = 2, 0.4, 1024, 4
    truth = -0.5 * d * math.log(1 - rho**2)
    infonce = est(fresh_registry, "mi", "infonce", critic="encoder")
    g = torch.Generator().manual_seed(24)
    values = []
    for _ in range(n_batches):
        x = torch.randn(k, d, generator=g)
        q = gaussian_posterior(rho * x, torch.full_like(x, math.sqrt(1 - rho**2)))
        z = q.mean + q.stddev * torch.randn(k, d, generator=g)
        values.append(infonce(Batch(x=x, posterior=q, z=z), None))
    values = torch.cat(values)
    se = values.std().item() / math.sqrt(len(values))
    assert abs(values.mean().item() - truth) <= 4 * se + 2 * 0.42 / k
    assert values.mean().item() <= math.log(k)


def test_infonce_critics_need_positives_except_encoder(fresh_registry):
    assert "positives" in est(fresh_registry, "mi", "infonce", critic="dot").needs
    assert "positives" in est(fresh_registry, "mi", "infonce", critic="cosine").needs
    assert not est(fresh_registry, "mi", "infonce", critic="encoder").needs
    batch = aggregate_batch(8, 2, 1.0, seed=0)
    with pytest.raises(ElbokitError, match="positives"):
        est(fresh_registry, "mi", "infonce", critic="dot")(batch, None)


def test_infonce_unknown_critic_suggests_a_close_match(fresh_registry):
    with pytest.raises(UnknownNameError, match="Did you mean 'cosine'") as info:
        est(fresh_registry, "mi", "infonce", critic="cosin")
    assert all(c in str(info.value) for c in ("dot", "cosine", "encoder"))


def test_infonce_dot_critic_is_the_papers_score(fresh_registry):
    # S_ij = z_i . z+_j; the per-example bound is log K + S_ii - logsumexp_j S_ij.
    torch.manual_seed(25)
    z, zp = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    value = est(fresh_registry, "mi", "infonce", critic="dot")(_critic_batch(z, zp), None)
    s = np.asarray(z) @ np.asarray(zp).T
    expected = np.log(16) + np.diag(s) - np.log(np.exp(s).sum(1))
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_small_batches_are_computed_whole_and_large_ones_in_chunks_with_equal_results():
    # The two paths of logsumexp_gaussian_mixture agree (values and gradients).
    z, loc, scale, log_w = _lse_inputs(64, 3, seed=5)

    def run(max_unchunked):
        leaves = [t.detach().clone().requires_grad_() for t in (z, loc, scale)]
        out = logsumexp_gaussian_mixture(*leaves, log_w, chunk=10, max_unchunked=max_unchunked)
        out.sum().backward()
        return out.detach(), [t.grad for t in leaves]

    whole, g_whole = run(64 * 64)
    chunked, g_chunked = run(0)
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_whole, g_chunked):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------- memory linear in the batch: chunked forms
@pytest.mark.parametrize("m, chunk", [(2, 1), (3, 2), (41, 7), (41, 41)])
def test_circulant_mss_weights_equal_the_dense_matrix_with_gradients(m, chunk):
    # The O(1) circulant form of the mss weights gives what the dense (M, M) matrix gives, in
    # every chunk (offset 1 wraps from the last row to column 0), values and gradients.
    from elbokit.default_plugins.estimators import mss_circulant_log_weights, mss_log_weights

    z, loc, scale, _ = _lse_inputs(m, 3, seed=m)
    diag = torch.randn(m, dtype=torch.float64)
    cot = torch.randn(m, dtype=torch.float64)

    def grads(**kw):
        leaves = [t.detach().clone().requires_grad_() for t in (z, loc, scale, diag)]
        out = logsumexp_gaussian_mixture(*leaves[:3], diagonal=leaves[3], chunk=chunk, max_unchunked=0, **kw)
        (out * cot).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    dense, g_dense = grads(log_weights=mss_log_weights(m, 500, dtype=torch.float64))
    circ, g_circ = grads(circulant_log_weights=mss_circulant_log_weights(m, 500))
    torch.testing.assert_close(circ, dense, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_circ, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m, chunk", [(50, 7), (50, 50), (1, 1)])
def test_chunked_score_logsumexp_equals_dense_with_gradients(m, chunk):
    from elbokit.ops import logsumexp_scores

    g = torch.Generator().manual_seed(m + chunk)
    a, b = torch.randn(m, 4, generator=g, dtype=torch.float64), torch.randn(m, 4, generator=g, dtype=torch.float64)
    cot = torch.randn(m, dtype=torch.float64, generator=g)

    def grads(fn):
        return value_and_grads(fn, (a, b), cot)

    dense, g_dense = grads(lambda x, y: torch.logsumexp(3.0 * x @ y.T, dim=1))
    chunked, g_chunked = grads(lambda x, y: logsumexp_scores(x, y, 3.0, chunk=chunk, max_unchunked=0,
                                                             diagonal=3.0 * (x * y).sum(-1)))
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    for u, v in zip(g_chunked, g_dense):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_infonce_in_chunks_stays_below_log_k(fresh_registry):
    # K = 1500 is above the 2^21 pairs formed whole, so the cosine and dot critics go through
    # row blocks; they still give at most log K per example (the diagonal is the same number in
    # the sum and in the positive's score) and the values of the whole score matrix.
    import torch.nn.functional as F

    from elbokit.ops import MAX_UNCHUNKED_PAIRS

    k = 1500
    assert k * k > MAX_UNCHUNKED_PAIRS
    g = torch.Generator().manual_seed(3)
    z, zp = torch.randn(k, 5, generator=g), torch.randn(k, 5, generator=g)
    batch = _critic_batch(z, zp)
    for critic, s in (("cosine", F.normalize(z, dim=-1) @ F.normalize(zp, dim=-1).T / 0.1), ("dot", z @ zp.T)):
        chunked = est(fresh_registry, "mi", "infonce", critic=critic, chunk=64)(batch, None)
        assert (chunked <= math.log(k)).all()
        expected = math.log(k) + s.diagonal() - torch.logsumexp(s, dim=1)
        torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- the hand-written logsumexp and its backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_logsumexp_with_far_pairs_equals_torch_with_gradients(dtype):
    # Narrow posteriors far apart: most entries of S lie hundreds of nats below their row's
    # maximum (exp underflows; elbokit.ops clamps them before exp for speed). Values and
    # gradients must be torch's own logsumexp of the same matrix, to the rounding of the dtype.
    g = torch.Generator().manual_seed(11)
    m, d = 200, 3
    loc = 3.0 * torch.randn(m, d, generator=g, dtype=dtype)
    scale = 0.05 + 0.1 * torch.rand(m, d, generator=g, dtype=dtype)
    z = loc + scale * torch.randn(m, d, generator=g, dtype=dtype)
    cot = torch.randn(m, generator=g, dtype=dtype)

    def grads(fn):
        return value_and_grads(fn, (z, loc, scale), cot)

    def reference(zz, ll, ss):
        return torch.logsumexp(pairwise_gaussian_log_density(zz, ll, ss), dim=1)

    ref, g_ref = grads(reference)
    s = pairwise_gaussian_log_density(z, loc, scale)
    assert (s < s.max(1, keepdim=True).values - 200).float().mean() > 0.5  # the case in question
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for max_unchunked in (m * m, 0):
        out, g_out = grads(lambda zz, ll, ss: logsumexp_gaussian_mixture(zz, ll, ss, chunk=64, max_unchunked=max_unchunked))
        torch.testing.assert_close(out, ref, **tol)
        for a, b in zip(g_out, g_ref):
            torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * b.abs().max().item())


def test_logsumexp_of_a_row_of_minus_infinity_is_minus_infinity():
    from elbokit.ops import _logsumexp_rows_

    s = torch.tensor([[0.0, -math.inf, 1.0], [-math.inf, -math.inf, -math.inf], [-1000.0, 0.0, -2000.0]])
    out, _ = _logsumexp_rows_(s.clone(), softmax=False)
    torch.testing.assert_close(out, torch.logsumexp(s, dim=1))
    assert out[1] == -math.inf


@pytest.mark.parametrize("factor", [1.0, 10.0])
def test_score_logsumexp_in_float32_matches_autograd_with_gradients(factor):
    # The InfoNCE dot/cosine path in float32: the written-out backward is as close to the
    # float64 truth as autograd's float32 backward of the dense matrix (within 2x its error,
    # or float32 rounding of the largest gradient).
    from elbokit.ops import logsumexp_scores

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(300, 5, generator=g), torch.randn(300, 5, generator=g)
    cot = torch.randn(300, generator=g)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (a, b)]
        out = fn(*leaves)
        (out * cot.to(dtype)).sum().backward()
        return out.detach().double(), [t.grad.double() for t in leaves]

    def dense(x, y):
        s = factor * x @ y.T
        return torch.logsumexp(torch.diagonal_scatter(s, factor * (x * y).sum(-1)), dim=1)

    def ours(x, y):
        return logsumexp_scores(x, y, factor, diagonal=factor * (x * y).sum(-1))

    truth, g_truth = grads(dense, torch.float64)
    ref, g_ref = grads(dense, torch.float32)
    out, g_out = grads(ours, torch.float32)
    torch.testing.assert_close(grads(ours, torch.float64)[0], truth, rtol=1e-12, atol=1e-12)
    assert (out - truth).abs().max() <= max(2 * (ref - truth).abs().max(), 8 * FLOAT32_EPS * truth.abs().max())
    for u, v, t in zip(g_out, g_ref, g_truth):
        assert (u - t).abs().max() <= max(2 * (v - t).abs().max(), 8 * FLOAT32_EPS * t.abs().max())


@pytest.mark.parametrize("dtype, s", [(torch.float64, 0.5), (torch.float32, 0.5), (torch.float32, 1e-3)])
@pytest.mark.parametrize("circulant", [False, True])
def test_gaussian_mixture_logsumexp_backward_equals_autograd_through_the_factors(dtype, s, circulant):
    # The written-out gradients in z, loc, scale and the diagonal (elbokit.ops
    # _LogSumExpGaussianMixture) against autograd through the same factors (_gaussian_factors
    # then _LogSumExpOfProduct): the same numbers to the rounding of the inputs' dtype.
    from elbokit.ops import _gaussian_factors, _lse_product

    g = torch.Generator().manual_seed(3)
    m, d = 120, 4
    loc = (2.0 * torch.randn(m, d, generator=g, dtype=torch.float64) + 1.0).to(dtype)
    scale = (s * torch.exp(0.3 * torch.randn(m, d, generator=g, dtype=torch.float64))).to(dtype)
    z = loc + scale * torch.randn(m, d, generator=g, dtype=dtype)
    diag = D.Normal(loc, scale).log_prob(z).sum(-1)
    cot = torch.randn(m, generator=g, dtype=dtype)
    weights = (-math.log(m - 1), {0: -math.log(1000), 1: -2.0}) if circulant else None

    def grads(fn):
        return value_and_grads(fn, (z, loc, scale, diag), cot)

    def through_factors(zz, ll, ss, dd):
        left, right, out_dtype = _gaussian_factors(zz, ll, ss)
        return _lse_product(left, right, 1.0, out_dtype, dd, 0, None, weights)

    ref, g_ref = grads(through_factors)
    for max_unchunked in (m * m, 0):  # whole, and in checkpointed chunks of 50 rows
        out, g_out = grads(lambda zz, ll, ss, dd: logsumexp_gaussian_mixture(
            zz, ll, ss, chunk=50, diagonal=dd, max_unchunked=max_unchunked, circulant_log_weights=weights))
        # float64: the sums are formed in another order (1e-12); float32: the result's rounding.
        eps = 1e-12 if dtype == torch.float64 else 4 * FLOAT32_EPS
        torch.testing.assert_close(out, ref, rtol=eps, atol=eps)
        for a, b in zip(g_out, g_ref):
            assert (a - b).abs().max() <= 4 * eps * b.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_own_log_density_is_torchs_posterior_log_prob_bit_for_bit(dtype):
    from elbokit.default_plugins.estimators import own_log_density

    g = torch.Generator().manual_seed(4)
    loc = torch.randn(300, 5, generator=g, dtype=dtype)
    scale = 1e-3 + torch.rand(300, 5, generator=g, dtype=dtype)
    posterior = gaussian_posterior(loc, scale)
    z = loc + scale * torch.randn(300, 5, generator=g, dtype=dtype)
    assert torch.equal(own_log_density(Batch(x=loc, posterior=posterior, z=z)), posterior.log_prob(z))


@pytest.mark.parametrize("normalize, factor", [(True, 10.0), (True, 30.0), (False, 1.0), (False, 0.5)])
def test_paired_scores_logsumexp_equals_autograd_with_gradients(normalize, factor):
    # The InfoNCE critics' written-out function (normalisation, diagonal and logsumexp in one
    # backward) against autograd through F.normalize, the diagonal's product and
    # torch.logsumexp of the dense matrix: float64 to 1e-12; float32 within 2x autograd's own
    # float32 error (or float32 rounding of the largest value). One row of zeros checks the
    # normalisation's clamp.
    import torch.nn.functional as F

    from elbokit.ops import paired_scores_logsumexp

    g = torch.Generator().manual_seed(6)
    z, zp = torch.randn(200, 5, generator=g, dtype=torch.float64), torch.randn(200, 5, generator=g, dtype=torch.float64)
    z[7] = 0.0
    cot_d = torch.randn(200, generator=g, dtype=torch.float64)
    cot_l = torch.randn(200, generator=g, dtype=torch.float64)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (z, zp)]
        diag, lse = fn(*leaves)
        (diag * cot_d.to(dtype) + lse * cot_l.to(dtype)).sum().backward()
        return [diag.detach().double(), lse.detach().double()], [t.grad.double() for t in leaves]

    def dense(x, y):
        a, b = (F.normalize(x, dim=-1), F.normalize(y, dim=-1)) if normalize else (x, y)
        diag = (a * b).sum(-1) * factor
        return diag, torch.logsumexp(torch.diagonal_scatter(factor * a @ b.T, diag), dim=1)

    def ours(x, y):
        return paired_scores_logsumexp(x, y, factor, normalize=normalize)

    truth, g_truth = grads(dense, torch.float64)
    out64, g64 = grads(ours, torch.float64)
    for u, t in zip(out64 + g64, truth + g_truth):
        torch.testing.assert_close(u, t, rtol=1e-12, atol=1e-12 * t.abs().max().item())
    ref, g_ref = grads(dense, torch.float32)
    out, g_out = grads(ours, torch.float32)
    for u, v, t in zip(out + g_out, ref + g_ref, truth + g_truth):
        assert (u - t).abs().max() <= max(2 * (v - t).abs().max(), 8 * FLOAT32_EPS * t.abs().max())
