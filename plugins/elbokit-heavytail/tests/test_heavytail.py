"""Tests of the `student-t` and `cauchy` priors: elbokit's conformance checks, the densities
against their textbook forms, and the KL decision (Monte Carlo, never a closed form)."""

from __future__ import annotations

import math

import pytest
import torch

import elbokit
from elbokit.testing import check_prior

elbokit_heavytail = pytest.importorskip(
    "elbokit_heavytail", reason="install the plugin first: pip install ./plugins/elbokit-heavytail"
)
StudentTPrior, CauchyPrior = elbokit_heavytail.StudentTPrior, elbokit_heavytail.CauchyPrior


@pytest.fixture
def registry():
    return elbokit.Registry.build([elbokit_heavytail], load_entry_points=False, strict=True)


def test_student_t_passes_elbokit_conformance_checks():
    report = check_prior(lambda: StudentTPrior(dim=3, df=4.0, scale=0.5))
    assert abs(report["log_normaliser"]) < 0.1  # the density integrates to 1


def test_cauchy_samples_follow_its_distribution():
    # check_prior's density-against-samples check fits a Gaussian proposal, which a law without a
    # variance defeats; the Cauchy is checked directly: P(|z_l| < s) = 2 atan(1) / pi = 1/2 and
    # P(|z_l| < 3 s) = 2 atan(3) / pi, each within 4.5 binomial standard errors.
    torch.manual_seed(0)
    n, s = 20000, 2.0
    z = CauchyPrior(dim=2, scale=s).sample(n)
    assert z.shape == (n, 2) and torch.isfinite(z).all()
    for r in (1.0, 3.0):
        p = 2 * math.atan(r) / math.pi
        frac = (z.abs() < r * s).double().mean(0)
        assert ((frac - p).abs() <= 4.5 * math.sqrt(p * (1 - p) / n)).all()


def test_registered_by_name_with_options(registry):
    assert registry.prior("student-t") is StudentTPrior and registry.prior("cauchy") is CauchyPrior
    prior = elbokit.make_prior("student-t", dim=4, df=5, scale=2, registry=registry)
    assert (prior.df, prior.scale) == (5.0, 2.0)
    assert StudentTPrior(**prior.spec()).spec() == prior.spec()


def test_log_densities_are_the_textbook_ones():
    z = torch.tensor([[0.0, 1.0, -3.0], [10.0, -0.2, 0.5]], dtype=torch.float64)
    df, s = 3.0, 0.7

    def t_log_pdf(x):
        return (math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi) - math.log(s)
                - (df + 1) / 2 * math.log1p((x / s) ** 2 / df))

    def cauchy_log_pdf(x):
        return -math.log(math.pi * s) - math.log1p((x / s) ** 2)

    t_prior, c_prior = StudentTPrior(dim=3, df=df, scale=s).double(), CauchyPrior(dim=3, scale=s).double()
    for row in range(2):
        values = z[row].tolist()
        assert t_prior.log_prob(z)[row].item() == pytest.approx(sum(map(t_log_pdf, values)), rel=1e-12)
        assert c_prior.log_prob(z)[row].item() == pytest.approx(sum(map(cauchy_log_pdf, values)), rel=1e-12)


@pytest.mark.parametrize("name", ["student-t", "cauchy"])
def test_kl_is_monte_carlo_and_analytic_is_refused(registry, name):
    prior = elbokit.make_prior(name, dim=2, registry=registry)
    with pytest.raises(elbokit.IncompatibleError, match="no closed-form KL"):
        elbokit.build_objective("classic", prior, options={"kl": {"estimator": "analytic"}}, registry=registry)
    objective = elbokit.build_objective("classic", prior, registry=registry)  # kl.estimator=auto
    torch.manual_seed(0)
    loc, scale = torch.randn(5, 2), torch.rand(5, 2) + 0.5
    q = elbokit.gaussian_posterior(loc, scale)
    z = q.sample()
    kl = objective.terms["kl"](elbokit.Batch(x=loc, posterior=q, z=z), prior)
    torch.testing.assert_close(kl, q.log_prob(z) - prior.log_prob(z))


@pytest.mark.parametrize("bad", [{"df": 0}, {"df": -1}, {"scale": 0}, {"scale": "wide"}, {"df": float("inf")}])
def test_bad_options_are_one_clear_error(bad):
    with pytest.raises(elbokit.ElbokitError, match="must be a"):
        StudentTPrior(dim=2, **bad)
