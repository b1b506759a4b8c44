"""Priors (docs/design.md, "Priors"): the `gmm` prior against scikit-learn, BIC, gradients, samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from elbokit.errors import ElbokitError

LOG_2PI = math.log(2 * math.pi)


def three_blobs(n: int = 1500, seed: int = 0) -> np.ndarray:
    """Three overlapping, correlated 2-d Gaussian blobs with unequal weights."""
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(n, [0.5, 0.3, 0.2])
    means = [(-2.0, 0.0), (1.5, 1.0), (0.5, -2.5)]
    covs = [[[1.0, 0.6], [0.6, 0.8]], [[0.4, -0.1], [-0.1, 0.6]], [[0.3, 0.0], [0.0, 1.2]]]
    return np.concatenate([rng.multivariate_normal(m, c, size=k) for m, c, k in zip(means, covs, sizes)])


def sklearn_from_prior(prior) -> GaussianMixture:
    """A scikit-learn GaussianMixture holding the prior's own parameters (float64)."""
    weights = torch.softmax(prior.logits.double(), 0).numpy()
    chol = prior.scale_tril.double().numpy()
    gm = GaussianMixture(prior.n_components, covariance_type="full")
    gm.weights_ = weights
    gm.means_ = prior.means.double().numpy()
    gm.covariances_ = chol @ np.swapaxes(chol, 1, 2)
    # sklearn keeps P with precision = P P^T; for Sigma = L L^T that is P = L^-T.
    gm.precisions_cholesky_ = np.swapaxes(np.linalg.inv(chol), 1, 2)
    gm.n_features_in_ = prior.dim
    return gm


@pytest.fixture
def gmm(fresh_registry):
    return fresh_registry.prior("gmm")(samples=three_blobs(), n_components=3, seed=0)


def test_gmm_log_prob_equals_sklearn_score_samples_of_the_same_mixture(gmm):
    prior = gmm.double()
    z = np.random.default_rng(1).normal(scale=3.0, size=(400, 2))  # in and far outside the data
    ours = prior.log_prob(torch.as_tensor(z)).numpy()
    np.testing.assert_allclose(ours, sklearn_from_prior(prior).score_samples(z), rtol=1e-10, atol=1e-10)


def test_gmm_log_prob_equals_an_independent_sklearn_fit(gmm):
    # Refit with scikit-learn's defaults and the same seed on the same (float32-stored)
    # samples: the same EM run, so the two densities agree to the float32 rounding of the
    # parameters and of log_prob (1e-4 on values of size 1-30).
    data = three_blobs().astype(np.float32).astype(np.float64)
    reference = GaussianMixture(3, covariance_type="full", random_state=0).fit(data)
    z = np.random.default_rng(2).normal(scale=2.0, size=(400, 2))
    ours = gmm.log_prob(torch.as_tensor(z, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(ours, reference.score_samples(z), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("true_count, n_components", [(1, None), (4, 0)])  # 0 and None both mean BIC
def test_gmm_bic_recovers_the_number_of_well_separated_clusters(fresh_registry, true_count, n_components):
    rng = np.random.default_rng(3)
    centres = np.array([(-6.0, -6.0), (6.0, -6.0), (-6.0, 6.0), (6.0, 6.0)])[:true_count]
    data = np.concatenate([c + 0.7 * rng.normal(size=(400, 2)) for c in centres])
    prior = fresh_registry.prior("gmm")(samples=data, n_components=n_components, max_components=6)
    assert prior.n_components == true_count
    assert prior.spec()["n_components"] == true_count


def test_gmm_log_prob_is_differentiable_in_z(gmm):
    prior = gmm.double()
    z = torch.tensor(np.random.default_rng(4).normal(scale=2.0, size=(50, 2)), requires_grad=True)
    prior.log_prob(z).sum().backward()
    # d/dz log sum_k pi_k N(z; mu_k, S_k) = -sum_k gamma_k(z) S_k^-1 (z - mu_k), with the
    # responsibilities gamma from scikit-learn.
    gm = sklearn_from_prior(prior)
    zn = z.detach().numpy()
    gamma = gm.predict_proba(zn)  # (n, K)
    precision = np.linalg.inv(gm.covariances_)  # (K, d, d)
    diff = zn[:, None, :] - gm.means_[None]  # (n, K, d)
    expected = -np.einsum("nk,kde,nke->nd", gamma, precision, diff)
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: prior.log_prob(t), (z[:5].detach().clone().requires_grad_(),))


def test_gmm_samples_have_the_mixture_moments(gmm):
    torch.manual_seed(5)
    n = 20000
    x = gmm.sample(n).double()
    assert x.shape == (n, 2)
    w = torch.softmax(gmm.logits.double(), 0)
    mu = gmm.means.double()
    cov_k = gmm.scale_tril.double() @ gmm.scale_tril.double().transpose(1, 2)
    mean = w @ mu
    second = (w[:, None, None] * (cov_k + mu[:, :, None] * mu[:, None, :])).sum(0)
    cov = second - torch.outer(mean, mean)
    # 4.5 standard errors of the sample mean, sqrt(diag(cov) / n).
    assert ((x.mean(0) - mean).abs() <= 4.5 * (cov.diagonal() / n).sqrt()).all()
    centred = x - mean
    products = centred[:, :, None] * centred[:, None, :]  # (n, d, d)
    se = products.std(0) / math.sqrt(n)
    assert ((products.mean(0) - cov).abs() <= 4.5 * se).all()


def test_gmm_samples_have_the_mixture_weights(fresh_registry):
    # Well-separated clusters: each sample's component is its nearest mean, and the counts
    # follow the weights within 4.5 binomial standard errors.
    rng = np.random.default_rng(6)
    data = np.concatenate([c + 0.5 * rng.normal(size=(k, 2)) for c, k in [((-8, 0), 700), ((8, 0), 200), ((0, 8), 100)]])
    prior = fresh_registry.prior("gmm")(samples=data, n_components=3)
    torch.manual_seed(7)
    n = 20000
    x = prior.sample(n)
    nearest = torch.cdist(x, prior.means).argmin(1)
    frac = torch.bincount(nearest, minlength=3).double() / n
    w = torch.softmax(prior.logits.double(), 0)
    assert ((frac - w).abs() <= 4.5 * (w * (1 - w) / n).sqrt()).all()
    # and the fitted weights are the data's proportions (every point is unambiguous here)
    np.testing.assert_allclose(np.sort(w.numpy()), [0.1, 0.2, 0.7], atol=1e-6)


def test_gmm_refuses_bad_samples(fresh_registry):
    cls = fresh_registry.prior("gmm")
    with pytest.raises(ElbokitError, match="samples="):
        cls()
    with pytest.raises(ElbokitError, match="dimension 2 but the latent dimension is 3"):
        cls(dim=3, samples=np.zeros((10, 2)))
    bad = np.random.default_rng(0).normal(size=(10, 2))
    bad[4, 1] = np.nan
    with pytest.raises(ElbokitError, match="row 4"):
        cls(samples=bad)
    with pytest.raises(ElbokitError, match="more than the 5 prior samples"):
        cls(samples=np.random.default_rng(0).normal(size=(5, 2)), n_components=6)
    with pytest.raises(ElbokitError, match="n_components"):
        cls(samples=np.random.default_rng(0).normal(size=(50, 2)), n_components=-1)


def test_gmm_state_round_trips_through_spec(gmm, fresh_registry):
    # A prior rebuilt from spec() and loaded with the saved state gives the same log_prob.
    empty = fresh_registry.prior("gmm")(**gmm.spec())
    empty.load_state_dict(gmm.state_dict())
    z = torch.randn(20, 2)
    torch.testing.assert_close(empty.log_prob(z), gmm.log_prob(z))


def test_standard_normal_log_prob_and_samples(fresh_registry):
    prior = fresh_registry.prior("standard-normal")(dim=3)
    z = torch.randn(10, 3)
    torch.testing.assert_close(prior.log_prob(z), -0.5 * (3 * LOG_2PI + z.pow(2).sum(-1)))
    torch.manual_seed(8)
    x = prior.sample(20000).double()
    assert x.shape == (20000, 3)
    # mean: SE 1/sqrt(n); covariance entries: SE sqrt(2/n) on the diagonal, 1/sqrt(n) off it.
    assert (x.mean(0).abs() <= 4.5 / math.sqrt(20000)).all()
    assert ((torch.cov(x.T) - torch.eye(3, dtype=torch.float64)).abs() <= 4.5 * math.sqrt(2 / 20000)).all()


def test_samples_prior_is_sample_only(fresh_registry):
    bank = torch.arange(30, dtype=torch.float32).view(15, 2)
    prior = fresh_registry.prior("samples")(samples=bank)
    assert not prior.has_log_prob and prior.distribution() is None
    with pytest.raises(NotImplementedError):
        prior.log_prob(bank)
    drawn = prior.sample(100)
    assert drawn.shape == (100, 2)
    # Every draw is a row of the bank.
    assert (torch.cdist(drawn, bank).min(1).values == 0).all()


# -------------------------------------------- the samples prior draws without replacement
def test_samples_prior_draws_without_replacement(fresh_registry):
    bank = torch.arange(40, dtype=torch.float32).view(20, 2)
    prior = fresh_registry.prior("samples")(samples=bank)
    torch.manual_seed(0)
    rows = prior.sample(20)[:, 0].long() // 2
    assert sorted(rows.tolist()) == list(range(20))  # every row once: a permutation of the bank
    few = prior.sample(7)[:, 0].long() // 2
    assert len(set(few.tolist())) == 7
    # More than the bank: whole passes, each row 2 or 3 times for 45 draws from 20.
    counts = torch.bincount(prior.sample(45)[:, 0].long() // 2, minlength=20)
    assert counts.sum() == 45 and counts.min() >= 2 and counts.max() <= 3
    # The reference set of a sample-based estimator: distinct rows, the whole bank when it is smaller.
    assert prior.distinct_samples == 20
    ref = prior.reference_sample(1000)
    assert ref.shape == (20, 2) and sorted((ref[:, 0].long() // 2).tolist()) == list(range(20))
    assert prior.reference_sample(5).shape == (5, 2)


def test_knn_cross_entropy_uses_the_whole_small_bank_at_its_real_size(fresh_registry):
    # n_prior = 2048 > a bank of 300: the estimate is the k-NN cross-entropy against the 300 bank
    # points, with psi(300), computed here by hand in float64.
    from elbokit.batch import Batch, gaussian_posterior
    from elbokit.ops import log_unit_ball_volume

    g = torch.Generator().manual_seed(1)
    bank, z = torch.randn(300, 3, generator=g), torch.randn(500, 3, generator=g)
    prior = fresh_registry.prior("samples")(samples=bank)
    knn = fresh_registry.estimator("cross_entropy", "knn")(k=3, n_prior=2048)
    value = knn(Batch(x=z, posterior=gaussian_posterior(z, torch.ones_like(z)), z=z), prior)
    rho = torch.cdist(z.double(), bank.double()).topk(3, dim=1, largest=False).values[:, -1]
    by_hand = (torch.special.digamma(torch.tensor(300.0, dtype=torch.float64)) - torch.special.digamma(
        torch.tensor(3.0, dtype=torch.float64)) + log_unit_ball_volume(3) + 3 * rho.log())
    torch.testing.assert_close(value.double(), by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("xent_estimator", ["knn", "auto"])
def test_a_bank_not_larger_than_k_is_refused_in_one_line(fresh_registry, xent_estimator):
    from elbokit import build_objective
    from elbokit.errors import IncompatibleError

    prior = fresh_registry.prior("samples")(samples=torch.randn(3, 2))
    with pytest.raises(IncompatibleError, match=r"holds only 3 distinct samples.*more than k=3") as info:
        build_objective("recon,xent", prior, options={"xent": {"estimator": xent_estimator}}, registry=fresh_registry)
    assert "\n" not in str(info.value)
    build_objective("recon,xent", prior, options={"xent": {"estimator": xent_estimator, "k": 2}}, registry=fresh_registry)


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (512,)), (torch.float64, (7, 3)), (torch.float32, ())])
def test_gmm_log_prob_equals_torch_mixture_in_value_and_gradient(gmm, dtype, shape):
    # The written-out log-density against torch.distributions' MixtureSameFamily of the same
    # parameters, for z of any batch shape: values to 1e-6 relative, gradients to float rounding.
    prior = gmm.to(dtype)
    g = torch.Generator().manual_seed(9)
    z = (2.5 * torch.randn(*shape, 2, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    ours = prior.log_prob(z)
    (grad_ours,) = torch.autograd.grad(ours.sum(), z)
    reference = prior.distribution().log_prob(z)
    (grad_ref,) = torch.autograd.grad(reference.sum(), z)
    assert ours.shape == reference.shape == shape
    eps = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, reference, rtol=eps, atol=0.0)
    assert (grad_ours - grad_ref).abs().max() <= 8 * eps * grad_ref.abs().max()


def test_gmm_log_prob_of_a_float32_prior_at_float64_codes_is_the_float64_mixture(gmm):
    z = torch.tensor(np.random.default_rng(2).normal(size=(20, 2)))
    expected = gmm.double().distribution().log_prob(z)
    torch.testing.assert_close(gmm.float().log_prob(z), expected, rtol=1e-12, atol=1e-12)
