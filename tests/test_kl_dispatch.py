"""The one decision "closed-form or Monte-Carlo KL to the prior", for priors that wrap a base
distribution in `Independent` (docs/design.md, "KL to the prior").

torch registers a rule for the outer pair (Independent, Independent), which recurses into the
base pair; for StudentT and Cauchy there is no (Normal, base) rule. Every KL to the prior (the
`kl` term's estimators, the validation pass, evaluation) must resolve that down to the base
distributions: `auto` falls back to Monte Carlo, `analytic` is refused when the objective is
built, and Laplace (torch has KL(Normal, Laplace)) stays analytic.
"""

from __future__ import annotations

import importlib.metadata
import json
import math

import pytest
import torch
from torch import distributions as D

import elbokit
from elbokit.batch import Batch, gaussian_posterior
from elbokit.errors import IncompatibleError
from elbokit.estimators import analytic_kl, has_analytic_kl, kl_to_prior
from elbokit.priors import Prior


class _IndependentPrior(Prior):
    """Independent(base(0, scale)) over `dim` coordinates, for a base class given by the subclass."""

    has_rsample = True

    def base(self, zeros: torch.Tensor) -> D.Distribution:
        raise NotImplementedError

    def distribution(self) -> D.Distribution:
        return D.Independent(self.base(self._anchor.new_zeros(self.dim)), 1)

    def sample(self, n: int) -> torch.Tensor:
        return self.distribution().sample((n,))


class StudentT3(_IndependentPrior):
    name = "t3"

    def base(self, zeros):
        return D.StudentT(zeros + 3.0, zeros, zeros + 1.0)


class Cauchy1(_IndependentPrior):
    name = "cauchy1"

    def base(self, zeros):
        return D.Cauchy(zeros, zeros + 1.0)


class Laplace1(_IndependentPrior):
    name = "laplace1"

    def base(self, zeros):
        return D.Laplace(zeros, zeros + 1.0)


HEAVY = [StudentT3, Cauchy1]


def _batch(n_rep: int = 1, seed: int = 0) -> Batch:
    torch.manual_seed(seed)
    loc = torch.tensor([[0.0, 0.5, -1.0], [1.5, -0.3, 0.2]]).repeat(n_rep, 1)
    scale = torch.tensor([[1.0, 0.4, 0.7], [0.3, 1.2, 0.9]]).repeat(n_rep, 1)
    q = gaussian_posterior(loc, scale)
    return Batch(x=loc, posterior=q, z=q.sample())


@pytest.mark.parametrize("prior_cls", HEAVY)
def test_outer_pair_is_registered_but_the_base_pair_is_not(prior_cls):
    # The trap the decision must see through: torch dispatches the outer pair to a rule...
    prior = prior_cls(dim=3)
    assert D.kl._dispatch_kl(D.Independent, type(prior.distribution())) is not NotImplemented
    # ...which raises on the base pair.
    with pytest.raises(NotImplementedError):
        D.kl_divergence(_batch().posterior, prior.distribution())
    assert analytic_kl(_batch().posterior, prior.distribution()) is None
    assert not has_analytic_kl(prior)


@pytest.mark.parametrize("prior_cls", HEAVY)
def test_auto_falls_back_to_monte_carlo_and_mc_works(prior_cls, fresh_registry):
    prior, batch = prior_cls(dim=3), _batch()
    auto = fresh_registry.estimator("kl", "auto")()(batch, prior)
    mc = fresh_registry.estimator("kl", "mc")()(batch, prior)
    by_hand = batch.posterior.log_prob(batch.z) - prior.distribution().log_prob(batch.z)
    torch.testing.assert_close(auto, by_hand)
    torch.testing.assert_close(mc, by_hand)
    assert kl_to_prior(batch.posterior, batch.z, prior)[1] == "mc"


@pytest.mark.parametrize("prior_cls", HEAVY)
def test_analytic_is_refused_when_the_objective_is_built(prior_cls, fresh_registry):
    with pytest.raises(IncompatibleError, match=r"no closed-form KL .* use kl.estimator=mc") as info:
        elbokit.build_objective("classic", prior_cls(dim=3), options={"kl": {"estimator": "analytic"}},
                                registry=fresh_registry)
    assert "\n" not in str(info.value)
    with pytest.raises(IncompatibleError):
        kl_to_prior(_batch().posterior, _batch().z, prior_cls(dim=3), "analytic")
    for estimator in ("auto", "mc"):  # both build
        elbokit.build_objective("classic", prior_cls(dim=3), options={"kl": {"estimator": estimator}},
                                registry=fresh_registry)


def test_laplace_has_a_closed_form_that_agrees_with_monte_carlo(fresh_registry):
    # torch registers KL(Normal, Laplace): the decision must keep it analytic, and the value must
    # be the KL (Monte Carlo over 20000 draws per posterior, within 4.5 standard errors).
    prior, n_rep = Laplace1(dim=3), 20000
    assert has_analytic_kl(prior)
    batch = _batch(n_rep=n_rep, seed=1)
    exact, kind = kl_to_prior(batch.posterior, batch.z, prior, "auto")
    assert kind == "analytic"
    draws = kl_to_prior(batch.posterior, batch.z, prior, "mc")[0].view(n_rep, 2).double()
    se = draws.std(0) / math.sqrt(n_rep)
    assert ((draws.mean(0) - exact[:2].double()).abs() <= 4.5 * se).all()


@pytest.mark.parametrize("prior_cls", HEAVY)
def test_validation_and_evaluation_use_the_same_decision(prior_cls):
    from elbokit.evaluate import analytic_kl as evaluate_analytic_kl
    from elbokit.evaluate import importance_sampled_terms
    from elbokit.likelihoods import make_likelihood
    from elbokit.train import kl_to_prior as validation_kl

    prior, batch = prior_cls(dim=3), _batch()
    expected = batch.posterior.log_prob(batch.z) - prior.log_prob(batch.z)
    torch.testing.assert_close(validation_kl(batch, prior), expected)
    assert evaluate_analytic_kl(batch.posterior, prior) is None
    torch.manual_seed(0)
    model = elbokit.VAE(data_dim=4, latent_dim=3, hidden=(8,))
    x = torch.randn(20, 4)
    iw = importance_sampled_terms(model, prior, make_likelihood("mse", 4), x, iw_samples=8)
    assert iw["kl_estimator"] == "mc" and torch.isfinite(iw["kl"]).all()


# ------------------------------------------------------ through the CLI, from a plugin package
def _heavytail_installed() -> bool:
    try:
        importlib.metadata.distribution("elbokit-heavytail")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_plugin = pytest.mark.skipif(not _heavytail_installed(),
                                  reason="install the example plugins: pip install ./plugins/*/ (CI does)")

FAST = ["--n", "300", "--hidden", "16", "--batch-size", "64", "--max-epochs", "2", "-q", "--json"]


@pytest.fixture
def with_entry_points(monkeypatch):
    from elbokit.plugins import DISABLE_ENV, set_registry

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    set_registry(None)
    yield
    set_registry(None)


@needs_plugin
@pytest.mark.parametrize("terms", ["classic", "ed"])
@pytest.mark.parametrize("estimator", ["auto", "mc"])
def test_cli_trains_and_evaluates_with_a_plugin_student_t_prior(tmp_path, run_cli, with_entry_points, terms, estimator):
    out = tmp_path / "run"
    extra = ["-o", f"kl.estimator={estimator}"] if terms == "classic" else ["-o", f"xent.estimator={estimator}"]
    res = run_cli("train", "--terms", terms, "--prior", "student-t", "--prior-option", "df=3", *FAST,
                  "--out", out, *extra)
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["prior"] == "student-t" and math.isfinite(summary["best_val"])
    assert summary["select_metric"] == "val_neg_elbo"
    res = run_cli("evaluate", out, "--json", "--iw-samples", "20")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["kl_estimator"] == "mc" and math.isfinite(report["kl"]) and math.isfinite(report["elbo"])
    assert report["elbo"] <= report["iwae"] + 4 * (report["elbo_se"] + report["iwae_se"])


@needs_plugin
@pytest.mark.parametrize("prior", ["student-t", "cauchy"])
def test_cli_refuses_analytic_kl_to_a_plugin_prior_before_writing(tmp_path, run_cli, with_entry_points, prior):
    out = tmp_path / "run"
    res = run_cli("train", "--prior", prior, *FAST, "--out", out, "-o", "kl.estimator=analytic")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "no closed-form KL" in lines[0]
    assert not out.exists()
