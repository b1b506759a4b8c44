"""`elbokit.testing`: the built-ins pass the conformance checks, and broken components fail
them with a message that says what is wrong."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

import elbokit
from elbokit.testing import check_density_matches_samples, check_estimator, check_prior, check_term


@pytest.fixture(scope="module")
def registry():
    return elbokit.Registry.build(load_entry_points=False, strict=True)


def mixture_samples(n=600, dim=2):
    torch.manual_seed(0)
    shift = torch.tensor([2.0] + [0.0] * (dim - 1))
    return torch.cat([torch.randn(n // 2, dim) - shift, 0.5 * torch.randn(n // 2, dim) + shift])


# ---------------------------------------------------------------------------- the built-ins
@pytest.mark.parametrize("name", ["standard-normal", "gmm", "samples"])
def test_builtin_priors_conform(registry, name):
    options = {"dim": 3} if name == "standard-normal" else {"samples": mixture_samples()}
    report = check_prior(lambda: registry.prior(name)(**options))
    if name == "samples":
        assert report["log_prob"] is False
    else:
        assert abs(report["log_normaliser"]) < 0.1 and report["ess_fraction"] > 0.1


def test_builtin_terms_conform(registry):
    for name, entry in registry.terms.items():
        report = check_term(entry.obj)
        assert report["accepted"], name
    # a density is needed by kl (auto), so the sample-only prior is refused when built
    assert "samples" in check_term(registry.term("kl"))["refused"]


def test_builtin_estimators_conform(registry):
    accepted = {key: check_estimator(entry.obj)["accepted"] for key, entry in registry.estimators.items()}
    assert accepted[("kl", "mc")] == ["standard-normal", "gmm"]          # needs prior_log_prob
    assert accepted[("kl", "auto")] == ["standard-normal", "gmm"]        # gmm: Monte Carlo
    assert accepted[("kl", "analytic")] == ["standard-normal"]           # no closed form for a mixture
    assert accepted[("cross_entropy", "knn")] == ["standard-normal", "gmm", "samples"]


def test_infonce_with_the_encoder_critic_needs_no_positives():
    from elbokit.default_plugins.estimators import InfoNCE

    assert check_estimator(InfoNCE, {"critic": "encoder"})["accepted"]


def test_checks_leave_the_global_random_state_alone(registry):
    state = torch.get_rng_state()
    check_prior(registry.prior("standard-normal")(dim=2), n=500)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------ priors that fail
class NormalPrior(elbokit.Prior):
    """A test prior: samples N(0, I); log_prob of N(loc, scale^2 I) plus `offset`."""

    name = "test-normal"

    def __init__(self, dim=2, loc=0.0, scale=1.0, offset=0.0):
        super().__init__(dim)
        self.loc, self.scale, self.offset = loc, scale, offset

    def log_prob(self, z):
        return D.Normal(self.loc, self.scale).log_prob(z).sum(-1) + self.offset

    def spec(self):
        return {"dim": self.dim, "loc": self.loc, "scale": self.scale, "offset": self.offset}

    def sample(self, n):
        return torch.randn(n, self.dim)


def test_the_honest_test_prior_passes():
    check_prior(NormalPrior())


@pytest.mark.parametrize("offset", [0.25, -0.25, 1.0])
def test_log_prob_off_by_a_constant_fails_normalisation(offset):
    with pytest.raises(AssertionError, match=r"prior 'test-normal': log_prob is not normalised: .*exp\("):
        check_prior(NormalPrior(offset=offset))


def test_log_prob_with_the_wrong_scale_fails_against_the_samples():
    # normalised, but not the density of what `sample` draws
    with pytest.raises(AssertionError, match="log_prob and sample disagree: the second moment of coordinate"):
        check_prior(NormalPrior(scale=1.3))


def test_log_prob_with_the_wrong_location_fails_against_the_samples():
    with pytest.raises(AssertionError, match="log_prob and sample disagree: the mean of coordinate 0"):
        check_prior(NormalPrior(loc=0.3))


def test_log_prob_far_more_peaked_than_the_samples_fails():
    with pytest.raises(AssertionError, match=r"importance weights p/q are degenerate"):
        check_prior(NormalPrior(scale=0.05))


def test_density_check_reports_a_small_error_for_a_right_density():
    torch.manual_seed(0)
    report = check_density_matches_samples(NormalPrior(dim=4))
    assert abs(report["log_normaliser"]) < 3 * report["log_normaliser_se"] + 0.02
    assert report["max_moment_zscore"] < 4


class SampleOnlyButHasDensity(NormalPrior):
    """A prior that says it has no log_prob, but has one."""

    name = "liar"
    has_log_prob = False


def test_has_log_prob_false_requires_not_implemented():
    with pytest.raises(AssertionError, match="has_log_prob is False but log_prob returned a value"):
        check_prior(SampleOnlyButHasDensity())


class WrongShapePrior(NormalPrior):
    """Samples one coordinate too many."""

    name = "wrong-shape"

    def sample(self, n):
        return torch.randn(n, self.dim + 1)


def test_sample_shape_is_checked():
    with pytest.raises(AssertionError, match=r"sample\(4000\) must have shape \(4000, 2\) \(the latent dimension is 2\), got \(4000, 3\)"):
        check_prior(WrongShapePrior())


class LearnedLocPrior(elbokit.Prior):
    """N(loc, I) with a learned loc of `n_loc` rows averaged; spec() forgets n_loc."""

    name = "forgetful"

    def __init__(self, dim=2, n_loc=3):
        super().__init__(dim)
        self.loc = torch.nn.Parameter(torch.zeros(n_loc, dim))

    def distribution(self):
        loc = self.loc.mean(0)
        return D.Independent(D.Normal(loc, torch.ones_like(loc)), 1)

    def sample(self, n):
        return self.distribution().sample((n,))


def test_spec_must_rebuild_every_shape():
    with pytest.raises(AssertionError, match="cannot load the saved state_dict"):
        check_prior(LearnedLocPrior(n_loc=5))


class NumpyDensityPrior(NormalPrior):
    """log_prob through numpy: right values, no gradient."""

    name = "numpy-density"

    def log_prob(self, z):
        import numpy as np

        values = -0.5 * (z.detach().numpy() ** 2).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return torch.as_tensor(values, dtype=z.dtype)


def test_log_prob_must_be_differentiable_in_z():
    with pytest.raises(AssertionError, match="log_prob is not differentiable in z"):
        check_prior(NumpyDensityPrior())


# ----------------------------------------------------------------- terms and estimators that fail
class ScalarTerm(elbokit.ElboTerm):
    """Returns the batch mean instead of one value per example (allowed: it counts for every example)."""

    name = "scalar"

    def forward(self, batch, prior):
        return batch.z.pow(2).sum(-1).mean()


class ColumnTerm(elbokit.ElboTerm):
    """Returns (B, 1), which would broadcast to (B, B) against the other terms."""

    name = "column"

    def forward(self, batch, prior):
        return batch.z.pow(2).sum(-1, keepdim=True)


def test_a_scalar_term_is_accepted_and_counts_for_every_example():
    assert check_term(ScalarTerm)["accepted"] == ["standard-normal", "gmm", "samples"]


class UndeclaredPositivesTerm(elbokit.ElboTerm):
    """Uses x+ without declaring `positives`."""

    name = "sneaky-positives"

    def forward(self, batch, prior):
        return (batch.z - batch.z_pos).pow(2).sum(-1)


class UndeclaredDensityTerm(elbokit.ElboTerm):
    """Uses log_prob without declaring `prior_log_prob`."""

    name = "sneaky-density"

    def forward(self, batch, prior):
        return -prior.log_prob(batch.z)


class DetachedTerm(elbokit.ElboTerm):
    """Detaches its output."""

    name = "detached"

    def forward(self, batch, prior):
        return batch.z.detach().pow(2).sum(-1)


class UnknownNeedTerm(DetachedTerm):
    """Declares a need nobody provides."""

    name = "needy"
    needs = frozenset({"labels"})


class ClashingTerm(DetachedTerm):
    """Takes a built-in's name."""

    name = "kl"


@pytest.mark.parametrize("term_cls, message", [
    (ColumnTerm, r"term 'column': with prior 'standard-normal': must return one loss value per example, "
                 r"shape \(16,\) for a batch of 16 \(or a scalar\), got \(16, 1\)"),
    (UndeclaredPositivesTerm, r"term 'sneaky-positives': with prior 'standard-normal': reads batch.z_pos but does "
                              r"not declare 'positives' in needs"),
    (UndeclaredDensityTerm, r"term 'sneaky-density': was accepted with prior 'samples' but failed .*"
                            r"NotImplementedError: Prior 'samples' has no log_prob"),
    (DetachedTerm, r"term 'detached': no gradient reaches the encoder's parameters"),
    (UnknownNeedTerm, r"term 'needy': declares unknown needs \['labels'\]"),
    (ClashingTerm, r"term 'kl': cannot be registered: The term name 'kl' is a built-in's and stays so; plugin "
                   r"'elbokit.testing\[test_testing.ClashingTerm\]' registers it too"),
])
def test_broken_terms_fail_with_a_clear_message(term_cls, message):
    with pytest.raises(AssertionError, match=message):
        check_term(term_cls)


def test_declared_density_need_makes_the_sample_only_prior_refused():
    class DeclaredDensityTerm(UndeclaredDensityTerm):
        """Declares what it uses."""

        name = "honest-density"
        needs = frozenset({"prior_log_prob"})

    report = check_term(DeclaredDensityTerm)
    assert report["accepted"] == ["standard-normal", "gmm"]
    assert "needs the prior's log_prob" in report["refused"]["samples"]


class NaNEstimator(elbokit.Estimator):
    """Returns NaN for a sample-only prior."""

    quantity, name = "cross_entropy", "nan"

    def forward(self, batch, prior):
        out = batch.z.pow(2).sum(-1)
        return out * float("nan") if not prior.has_log_prob else out


class BadKindEstimator(NaNEstimator):
    """Claims an unknown kind of estimate."""

    name, kind = "bad-kind", "guess"


def test_broken_estimators_fail_with_a_clear_message():
    with pytest.raises(AssertionError, match=r"estimator 'cross_entropy/nan': with prior 'samples': returned NaN or Inf on a batch of 16"):
        check_estimator(NaNEstimator)
    with pytest.raises(AssertionError, match="kind must be one of exact, lower bound, upper bound, estimate, got 'guess'"):
        check_estimator(BadKindEstimator)


def test_estimators_are_checked_through_a_term_of_their_quantity():
    class HalfSquaredNorm(elbokit.Estimator):
        """0.5 ||z||^2: the analytic cross-entropy up to a constant."""

        quantity, name = "cross_entropy", "half-norm"

        def __init__(self, scale: float = 0.5):
            super().__init__()
            self.scale = scale

        def forward(self, batch, prior):
            return self.scale * batch.z.pow(2).sum(-1)

    assert check_estimator(HalfSquaredNorm, {"scale": 0.25})["accepted"] == ["standard-normal", "gmm", "samples"]
    with pytest.raises(elbokit.ElbokitError, match="Unknown option 'scal' for term 'xent' with estimator 'half-norm'"):
        check_estimator(HalfSquaredNorm, {"scal": 0.25})
