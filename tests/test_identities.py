"""The ELBO-surgery identities of docs/design.md section 2, per example and per batch.

With S_ij = log q(z_i|x_j) and the MWS aggregate log q^(z_i) = logsumexp_j S_ij - log(N M):
    mi_mws + (-H_mws) + xent_mc == kl_mc  (= log q(z_i|x_i) - log p(z_i))
    infonce(encoder critic)     == mi_mws - log N
These hold exactly, whatever the batch; the tests use posteriors with scales from 1e-3 to 3
(where the pairwise densities are hardest to get right) and both a standard-normal and a
Gaussian-mixture prior.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elbokit.batch import Batch, gaussian_posterior
from elbokit.objective import build_objective

N_DATA = 1000


def make_batch(m: int, latent: int = 3, data_dim: int = 4, seed: int = 0, dtype=torch.float64) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, data_dim, generator=g, dtype=dtype)
    loc = 2.0 * torch.randn(m, latent, generator=g, dtype=dtype)
    # log-uniform scales over [1e-3, 3]
    scale = torch.exp(torch.empty(m, latent, dtype=dtype).uniform_(math.log(1e-3), math.log(3.0), generator=g))
    q = gaussian_posterior(loc, scale)
    z = loc + scale * torch.randn(m, latent, generator=g, dtype=dtype)
    x_recon = x + 0.3 * torch.randn(m, data_dim, generator=g, dtype=dtype)
    return Batch(x=x, posterior=q, z=z, x_recon=x_recon, dataset_size=N_DATA)


def make_prior(registry, name: str, dtype):
    if name == "standard-normal":
        prior = registry.prior(name)(dim=3)
    else:
        rng = np.random.default_rng(1)
        samples = np.concatenate([rng.normal(-2, 1, size=(300, 3)), rng.normal(2, 0.5, size=(300, 3))])
        prior = registry.prior(name)(samples=samples, n_components=2)
    return prior.to(dtype)


def per_term(objective, batch: Batch) -> dict[str, torch.Tensor]:
    return {name: term(batch, objective.prior) for name, term in objective.terms.items()}


# float64: the identity holds to rounding of the values (~10 nats) in double precision;
# float32: to a few float32 ulps of the largest term (|log q^| reaches ~25 nats here).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prior_name", ["standard-normal", "gmm"])
@pytest.mark.parametrize("m, seed", [(1, 0), (2, 1), (37, 2), (300, 3)])
def test_mi_plus_negative_entropy_plus_xent_is_the_monte_carlo_kl(fresh_registry, dtype, prior_name, m, seed):
    prior = make_prior(fresh_registry, prior_name, dtype)
    batch = make_batch(m, seed=seed, dtype=dtype)
    surgery = build_objective("mi,entropy,xent", prior, options={"xent": {"estimator": "mc"}},
                              dataset_size=N_DATA, registry=fresh_registry)
    classic = build_objective("kl", prior, options={"kl": {"estimator": "mc"}}, dataset_size=N_DATA,
                              registry=fresh_registry)
    parts = per_term(surgery, batch)
    kl_mc = per_term(classic, batch)["kl"]
    total = parts["mi"] + parts["entropy"] + parts["xent"]
    tol = TOLERANCE[dtype] * (1.0 + kl_mc.abs().max().item())
    assert (total - kl_mc).abs().max().item() <= tol
    # ...which is log q(z_i|x_i) - log p(z_i), computed here without any estimator.
    direct = batch.posterior.log_prob(batch.z) - prior.log_prob(batch.z)
    assert (kl_mc - direct).abs().max().item() <= tol
    # Per batch: the objective's per-example totals and losses agree the same way.
    out_s, out_c = surgery(batch), classic(batch)
    assert (out_s.per_example - out_c.per_example).abs().max().item() <= tol
    assert abs(out_s.loss.item() - out_c.loss.item()) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m, seed, chunk", [(2, 4, 256), (50, 5, 7), (300, 6, 256), (300, 7, 64)])
def test_infonce_with_the_encoder_critic_is_mi_mws_minus_log_n(fresh_registry, dtype, m, seed, chunk):
    prior = make_prior(fresh_registry, "standard-normal", dtype)
    batch = make_batch(m, seed=seed, dtype=dtype)
    objective = build_objective("infonce,mi", prior, options={"infonce": {"critic": "encoder", "chunk": chunk}},
                                dataset_size=N_DATA, has_positives=False, registry=fresh_registry)
    parts = per_term(objective, batch)
    tol = TOLERANCE[dtype] * (1.0 + parts["mi"].abs().max().item())
    assert (parts["infonce"] - (parts["mi"] - math.log(N_DATA))).abs().max().item() <= tol
    # and the bound is below log K for every example
    assert (parts["infonce"] <= math.log(m) + tol).all()


@pytest.mark.parametrize("prior_name", ["standard-normal", "gmm"])
def test_classic_and_decomposed_objectives_agree_per_example(fresh_registry, prior_name):
    # recon + kl_mc == recon + mi + (-H) + xent == recon + mi + marginal-kl, on the same batch.
    prior = make_prior(fresh_registry, prior_name, torch.float64)
    batch = make_batch(64, seed=8)
    classic = build_objective("recon,kl", prior, options={"kl": {"estimator": "mc"}}, dataset_size=N_DATA,
                              registry=fresh_registry)
    surgery = build_objective("recon,mi,entropy,xent", prior, options={"xent": {"estimator": "mc"}},
                              dataset_size=N_DATA, registry=fresh_registry)
    # marginal-kl's default cross-entropy (auto) is the closed form for the standard normal, equal
    # to mc only in expectation: the per-example identity is with mc.
    marginal = build_objective("recon,mi,marginal-kl", prior, options={"marginal-kl": {"xent_estimator": "mc"}},
                               dataset_size=N_DATA, registry=fresh_registry)
    a, b, c = classic(batch).per_example, surgery(batch).per_example, marginal(batch).per_example
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    # The recon term is -log p(x|z) for the mse likelihood: ||x - x^||^2 + (D/2) log pi.
    recon = (batch.x - batch.x_recon).pow(2).sum(-1) + 0.5 * batch.x.shape[1] * math.log(math.pi)
    torch.testing.assert_close(per_term(classic, batch)["recon"], recon, rtol=1e-12, atol=1e-12)


def test_identity_holds_for_gradients_too(fresh_registry):
    # The decomposed loss has the same gradient as the Monte-Carlo KL with respect to the
    # encoder's outputs (same function of loc, scale and z).
    prior = make_prior(fresh_registry, "standard-normal", torch.float64)
    base = make_batch(40, seed=9)
    loc = base.posterior_loc.clone().requires_grad_()
    log_scale = base.posterior_scale.log().clone().requires_grad_()
    eps = (base.z - base.posterior_loc) / base.posterior_scale

    def grads(spec: str, options):
        for t in (loc, log_scale):
            t.grad = None
        scale = log_scale.exp()
        q = gaussian_posterior(loc, scale)
        batch = Batch(x=base.x, posterior=q, z=loc + scale * eps, dataset_size=N_DATA)
        build_objective(spec, prior, options=options, dataset_size=N_DATA, registry=fresh_registry)(batch).loss.backward()
        return loc.grad.clone(), log_scale.grad.clone()

    g_kl = grads("kl", {"kl": {"estimator": "mc"}})
    g_sur = grads("mi,entropy,xent", {"xent": {"estimator": "mc"}, "mi": {"chunk": 16}, "entropy": {"chunk": 16}})
    for a, b in zip(g_kl, g_sur):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
