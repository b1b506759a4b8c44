"""Tests of the `vamp` prior: elbokit's conformance checks, then the VampPrior's own numbers."""

from __future__ import annotations

import math

import pytest
import torch

import elbokit
from elbokit.testing import check_prior

elbokit_vampprior = pytest.importorskip(
    "elbokit_vampprior", reason="install the plugin first: pip install -e plugins/elbokit-vampprior"
)
VampPrior = elbokit_vampprior.VampPrior

DATA_DIM, LATENT_DIM = 6, 2


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return elbokit.VAE(data_dim=DATA_DIM, latent_dim=LATENT_DIM, hidden=(16,))


@pytest.fixture
def registry():
    return elbokit.Registry.build([elbokit_vampprior], load_entry_points=False, strict=True)


def attached(vae, n_components=10):
    prior = VampPrior(dim=LATENT_DIM, n_components=n_components)
    prior.attach(vae)
    return prior


# [docs: conformance test]
def test_vamp_passes_elbokit_conformance_checks(vae):
    report = check_prior(lambda: attached(vae), model=vae)
    assert abs(report["log_normaliser"]) < 0.1  # the mixture integrates to 1
# [/docs: conformance test]


def test_registered_under_the_name_vamp(registry, vae):
    assert registry.prior("vamp") is VampPrior
    assert registry.priors["vamp"].plugin == "elbokit_vampprior"
    prior = elbokit.make_prior("vamp", dim=LATENT_DIM, n_components=7, registry=registry)
    prior.attach(vae)
    assert prior.pseudo_inputs.shape == (7, DATA_DIM)


def test_log_prob_is_the_uniform_mixture_of_the_encoders_posteriors(vae):
    prior = attached(vae, n_components=5)
    z = torch.randn(20, LATENT_DIM)
    with torch.no_grad():
        q = vae.encode(prior.pseudo_inputs)
        loc, scale = q.base_dist.loc, q.base_dist.scale  # (K, L)
        # log N(z; loc_k, diag(scale_k^2)) by hand, then log (1/K) sum_k exp(.)
        log_comp = (-0.5 * ((z[:, None, :] - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        manual = torch.logsumexp(log_comp, dim=1) - math.log(5)
        assert torch.allclose(prior.log_prob(z), manual, atol=1e-5)


def test_using_it_before_attach_says_what_to_do():
    prior = VampPrior(dim=LATENT_DIM)
    for use in (lambda: prior.log_prob(torch.zeros(3, LATENT_DIM)), lambda: prior.sample(3)):
        with pytest.raises(elbokit.ElbokitError, match=r"call prior\.attach\(model\) before using it"):
            use()


def test_attach_checks_dimensions(vae):
    with pytest.raises(elbokit.ElbokitError, match="dimension 3 but the model's latent dimension is 2"):
        VampPrior(dim=3).attach(vae)
    with pytest.raises(elbokit.ElbokitError, match="pseudo-inputs have dimension 4 but the model's data dimension is 6"):
        VampPrior(dim=LATENT_DIM, data_dim=4).attach(vae)


def test_only_the_pseudo_inputs_belong_to_the_prior(vae):
    # The encoder's parameters belong to the model: an optimiser over model + prior
    # parameters must not see them twice, and a checkpoint must not save them twice.
    prior = attached(vae)
    assert [name for name, _ in prior.named_parameters()] == ["pseudo_inputs"]
    assert list(prior.state_dict()) == ["pseudo_inputs"]


def test_spec_rebuilds_a_prior_that_loads_the_checkpoint(vae):
    prior = attached(vae, n_components=4)
    spec = prior.spec()
    assert spec == {"dim": LATENT_DIM, "n_components": 4, "data_dim": DATA_DIM}
    rebuilt = VampPrior(**spec)
    rebuilt.attach(vae)
    rebuilt.load_state_dict(prior.state_dict())
    z = torch.randn(8, LATENT_DIM)
    assert torch.equal(rebuilt.pseudo_inputs, prior.pseudo_inputs)
    assert torch.allclose(rebuilt.log_prob(z), prior.log_prob(z))


def test_log_prob_trains_the_pseudo_inputs_and_the_encoder(vae):
    prior = attached(vae)
    prior.log_prob(torch.randn(16, LATENT_DIM)).sum().backward()
    assert prior.pseudo_inputs.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vae.encoder.parameters())


def test_fitting_the_pseudo_inputs_raises_the_likelihood_of_far_codes(vae):
    # Codes far from where the encoder maps the initial pseudo-inputs: learning u_k must
    # move the mixture there.
    prior = attached(vae)
    codes = torch.randn(256, LATENT_DIM) * 0.3 + torch.tensor([3.0, -2.0])
    before = prior.log_prob(codes).mean().item()
    optimiser = torch.optim.Adam(prior.parameters(), lr=0.05)
    for _ in range(100):
        optimiser.zero_grad()
        (-prior.log_prob(codes).mean()).backward()
        optimiser.step()
    after = prior.log_prob(codes).mean().item()
    assert after > before + 2.0


def test_kl_auto_uses_monte_carlo_with_the_vampprior(registry, vae):
    prior = attached(vae)
    objective = elbokit.build_objective("recon,kl", prior, registry=registry)
    x = torch.randn(32, DATA_DIM)
    batch = vae(x)
    out = objective(batch)
    expected = (batch.posterior.log_prob(batch.z) - prior.log_prob(batch.z)).mean()
    assert torch.allclose(out.terms["kl"], expected.detach(), atol=1e-5)


def test_xent_auto_is_minus_log_prob_in_the_ed_objective(registry, vae):
    prior = attached(vae)
    objective = elbokit.build_objective("recon,mi,entropy,xent", prior, dataset_size=1000, registry=registry)
    batch = vae(torch.randn(32, DATA_DIM))
    out = objective(batch)
    assert torch.isfinite(out.loss)
    assert torch.allclose(out.terms["xent"], -prior.log_prob(batch.z).mean().detach(), atol=1e-5)


@pytest.mark.parametrize("bad", [{"n_components": 0}, {"init_std": 0.0}])
def test_bad_options_are_one_clear_error(bad):
    with pytest.raises(elbokit.ElbokitError, match="The 'vamp' prior needs"):
        VampPrior(dim=LATENT_DIM, **bad)
