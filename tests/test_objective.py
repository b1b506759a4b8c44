"""`build_objective` and `Objective`: refusals at build time, names, `--terms` syntax, weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import elbokit
from elbokit.batch import Batch, gaussian_posterior
from elbokit.errors import ElbokitError, IncompatibleError, UnknownNameError
from elbokit.objective import build_objective, parse_terms

DIM = 3


@pytest.fixture
def samples_prior(fresh_registry):
    bank = np.random.default_rng(0).normal(size=(2000, DIM))
    return fresh_registry.prior("samples")(samples=bank)


@pytest.fixture
def standard_normal(fresh_registry):
    return fresh_registry.prior("standard-normal")(dim=DIM)


def make_batch(m: int = 32, data_dim: int = 5, seed: int = 0, positives: bool = True) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, data_dim, generator=g)
    loc, scale = torch.randn(m, DIM, generator=g), 0.2 + torch.rand(m, DIM, generator=g)
    q = gaussian_posterior(loc, scale)
    z = loc + scale * torch.randn(m, DIM, generator=g)
    extra = {}
    if positives:
        extra = dict(x_pos=x + 0.1 * torch.randn(m, data_dim, generator=g),
                     z_pos=z + 0.1 * torch.randn(m, DIM, generator=g))
    return Batch(x=x, posterior=q, z=z, x_recon=x + 0.5 * torch.randn(m, data_dim, generator=g), **extra)


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and message.endswith((".", "?"))
    return message


# ------------------------------------------------------------------- refusals at build time
@pytest.mark.parametrize("terms, options", [
    ("classic", None),                                   # kl/auto
    ("recon,kl", {"kl": {"estimator": "mc"}}),
    ("recon,kl", {"kl": {"estimator": "analytic"}}),
    ("ed", {"xent": {"estimator": "mc"}}),
    ("recon,mi,marginal-kl", {"marginal-kl": {"xent_estimator": "mc"}}),
])
def test_sample_only_prior_refused_when_a_term_needs_its_density(fresh_registry, samples_prior, terms, options):
    with pytest.raises(IncompatibleError) as info:
        build_objective(terms, samples_prior, options=options, dataset_size=1000, has_positives=True,
                        registry=fresh_registry)
    message = one_line(info.value)
    assert "'gmm'" in message  # names the prior that has a density
    assert "estimator=mc" not in message  # and does not suggest something that fails too


def test_ed_with_sample_only_prior_and_knn_cross_entropy_builds_and_runs(fresh_registry, samples_prior):
    for options in ({"xent": {"estimator": "knn"}}, None):  # auto picks knn for a sample-only prior
        objective = build_objective("ed", samples_prior, options=options, dataset_size=1000,
                                    has_positives=True, registry=fresh_registry)
        out = objective(make_batch())
        assert torch.isfinite(out.loss) and set(out.terms) == {"recon", "infonce", "entropy", "xent"}


def test_infonce_with_positive_pair_critic_refused_without_positives(fresh_registry, standard_normal):
    for critic in ("dot", "cosine"):
        with pytest.raises(IncompatibleError) as info:
            build_objective("ed", standard_normal, options={"infonce": {"critic": critic}},
                            dataset_size=1000, has_positives=False, registry=fresh_registry)
        assert "infonce.critic=encoder" in one_line(info.value)
    # The encoder critic needs no positives; unknown (None) positives are checked later.
    build_objective("ed", standard_normal, options={"infonce": {"critic": "encoder"}}, dataset_size=1000,
                    has_positives=False, registry=fresh_registry)
    build_objective("ed", standard_normal, dataset_size=1000, registry=fresh_registry)


def test_analytic_estimators_refused_for_a_gmm_prior(fresh_registry):
    gmm = fresh_registry.prior("gmm")(samples=np.random.default_rng(1).normal(size=(300, DIM)), n_components=2)
    for terms, options, hint in [("kl", {"kl": {"estimator": "analytic"}}, "kl.estimator=mc"),
                                 ("xent", {"xent": {"estimator": "analytic"}}, "xent.estimator=mc")]:
        with pytest.raises(IncompatibleError) as info:
            build_objective(terms, gmm, options=options, registry=fresh_registry)
        assert hint in one_line(info.value)
    build_objective("classic", gmm, registry=fresh_registry)  # kl/auto falls back to Monte Carlo


# ------------------------------------------------------------------------------- names
@pytest.mark.parametrize("call, close, choices", [
    (lambda r, p: build_objective("recon,kll", p, registry=r), "kl", ["recon", "kl", "xent", "infonce"]),
    (lambda r, p: build_objective("recon,entropi", p, registry=r), "entropy", ["recon", "marginal-kl"]),
    (lambda r, p: build_objective("kl", p, options={"kl": {"estimator": "analitic"}}, registry=r),
     "analytic", ["analytic", "auto", "mc"]),
    (lambda r, p: build_objective("entropy", p, options={"entropy": {"estimator": "msw"}}, registry=r),
     "mws", ["gaussian", "knn", "logvar", "mss", "mws"]),
    (lambda r, p: elbokit.make_prior("gmn", dim=DIM, registry=r), "gmm", ["gmm", "samples", "standard-normal"]),
    (lambda r, p: elbokit.make_prior("standard_normal", dim=DIM, registry=r), "standard-normal", ["gmm"]),
])
def test_unknown_names_name_the_valid_choices_and_a_close_match(fresh_registry, standard_normal, call, close, choices):
    with pytest.raises(UnknownNameError) as info:
        call(fresh_registry, standard_normal)
    message = one_line(info.value)
    assert f"Did you mean '{close}'?" in message
    listed = message.split("Valid choices: ")[1].rstrip(".").split(", ")
    assert set(choices) <= set(listed)


def test_unknown_name_without_a_close_match_lists_choices_only(fresh_registry, standard_normal):
    with pytest.raises(UnknownNameError) as info:
        build_objective("recon,zzzz", standard_normal, registry=fresh_registry)
    message = one_line(info.value)
    assert "Did you mean" not in message and "Valid choices: entropy, infonce, kl" in message


def test_bad_options_name_the_valid_ones(fresh_registry, standard_normal):
    with pytest.raises(ElbokitError) as info:
        build_objective("kl", standard_normal, options={"kl": {"tempreature": 1}}, registry=fresh_registry)
    assert "'tempreature'" in one_line(info.value) and "estimator" in str(info.value)
    with pytest.raises(ElbokitError, match="not among the terms"):
        build_objective("recon,kl", standard_normal, options={"xent": {"estimator": "mc"}}, registry=fresh_registry)
    with pytest.raises(ElbokitError, match="Did you mean 'dot'"):
        build_objective("infonce", standard_normal, options={"infonce": {"critic": "dott"}}, registry=fresh_registry)


# --------------------------------------------------------------------------- parse_terms
@pytest.mark.parametrize("spec, expected", [
    ("classic", [("recon", 1.0), ("kl", 1.0)]),
    (" ed ", [("recon", 1.0), ("infonce", 1.0), ("entropy", 1.0), ("xent", 1.0)]),
    ("recon,kl:0.5", [("recon", 1.0), ("kl", 0.5)]),
    ("recon:2,infonce:-1,entropy:1e-1", [("recon", 2.0), ("infonce", -1.0), ("entropy", 0.1)]),
    (["recon", "kl:3"], [("recon", 1.0), ("kl", 3.0)]),
    ("marginal-kl", [("marginal-kl", 1.0)]),
])
def test_parse_terms(spec, expected):
    assert parse_terms(spec) == expected


# ---------------------------------------------------------------------------- weights
def test_loss_is_the_weighted_sum_of_term_means(fresh_registry, standard_normal):
    batch = make_batch(64, seed=3)
    objective = build_objective("recon:2,kl:0.5", standard_normal, registry=fresh_registry)
    out = objective(batch)
    # Closed forms, written independently of the terms: mse recon = ||x - x^||^2 + (D/2) log pi;
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 * sum(mu^2 + s^2 - 1 - log s^2) (kl/auto is analytic here).
    d = batch.x.shape[1]
    recon = ((batch.x - batch.x_recon).pow(2).sum(-1) + 0.5 * d * math.log(math.pi)).double()
    loc, scale = batch.posterior_loc.double(), batch.posterior_scale.double()
    kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1 - 2 * scale.log()).sum(-1)
    assert out.loss.item() == pytest.approx((2 * recon.mean() + 0.5 * kl.mean()).item(), rel=1e-5)
    # Reported term values are unweighted means; per_example is the weighted per-example sum.
    assert out.terms["recon"].item() == pytest.approx(recon.mean().item(), rel=1e-5)
    assert out.terms["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    torch.testing.assert_close(out.per_example.double(), 2 * recon + 0.5 * kl, rtol=1e-5, atol=1e-4)

    # weights= overrides the weights written in the spec; `weight` among a term's options works too.
    for kwargs in ({"weights": {"kl": 3.0}}, {"options": {"kl": {"weight": 3.0}}}):
        out2 = build_objective("recon:2,kl:0.5", standard_normal, registry=fresh_registry, **kwargs)(batch)
        assert out2.loss.item() == pytest.approx((2 * recon.mean() + 3.0 * kl.mean()).item(), rel=1e-5)


def test_weights_for_absent_terms_or_not_numbers_are_refused(fresh_registry, standard_normal):
    with pytest.raises(ElbokitError, match="not among the terms"):
        build_objective("recon,kl", standard_normal, weights={"kll": 2.0}, registry=fresh_registry)
    with pytest.raises(ElbokitError, match="must be a number"):
        build_objective("recon,kl", standard_normal, options={"kl": {"weight": "lots"}}, registry=fresh_registry)
    with pytest.raises(ElbokitError, match="must be finite"):
        build_objective("recon,kl", standard_normal, weights={"kl": float("nan")}, registry=fresh_registry)


def test_a_negative_weight_flips_a_terms_gradient(fresh_registry, standard_normal):
    # InfoMax is the infonce term with a negative weight: the gradient is exactly -1 times.
    base = make_batch(32, seed=4)

    def grad(weight: float) -> torch.Tensor:
        z_pos = base.z_pos.clone().requires_grad_()
        batch = Batch(x=base.x, posterior=base.posterior, z=base.z, x_pos=base.x_pos, z_pos=z_pos)
        build_objective(f"infonce:{weight}", standard_normal, registry=fresh_registry)(batch).loss.backward()
        return z_pos.grad

    torch.testing.assert_close(grad(-1.0), -grad(1.0))


def test_a_preset_given_as_a_one_item_list_expands():
    from elbokit.objective import parse_terms

    assert parse_terms(["ed"]) == parse_terms("ed") == parse_terms("recon,infonce,entropy,xent")


def test_marginal_kl_takes_its_estimators_from_the_registry_it_is_built_with(standard_normal):
    from elbokit.plugins import Registry, set_registry
    from elbokit.estimators import Estimator
    from elbokit.hookspecs import hookimpl

    class ConstantEntropy(Estimator):
        """A registered-only-here entropy estimator."""

        quantity, name = "entropy", "constant-for-test"

        def forward(self, batch, prior):
            return batch.z.new_full((batch.size,), 7.0)

    class Plugin:
        @hookimpl
        def register_estimators(self, register):
            register(ConstantEntropy)

    local = Registry.build([Plugin()], load_entry_points=False, strict=True)
    set_registry(Registry.build(load_entry_points=False, strict=True))  # the global one lacks it
    try:
        objective = build_objective("marginal-kl", standard_normal, registry=local,
                                    options={"marginal-kl": {"entropy_estimator": "constant-for-test"}})
    finally:
        set_registry(None)
    assert isinstance(objective.terms["marginal-kl"].entropy, ConstantEntropy)
