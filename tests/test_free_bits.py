"""Free bits on the kl term (`kl.free_bits`, docs/training.md): the loss uses
sum_j max(lambda, batch-mean KL_j) per latent dimension j, the reported KL and every bound stay
the true values, and it is refused in one line where the KL is not factorised and analytic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import distributions as D

import elbokit
from elbokit.batch import Batch, gaussian_posterior
from elbokit.errors import ElbokitError, IncompatibleError
from elbokit.objective import build_objective, option_specs
from elbokit.priors import Prior

LAMBDA = 0.3
# Column 0 far from the prior (mean KL well above lambda), column 1 almost the prior (below),
# column 2 in between (above): per-example KL_ij = (mu^2 + s^2 - 1) / 2 - log s.
LOC = [[2.0, 0.05, 0.9], [-1.5, -0.1, -0.6], [1.0, 0.02, 0.8], [0.5, 0.08, -0.7]]
SCALE = [[0.5, 0.95, 0.7], [0.6, 1.05, 0.8], [0.4, 1.0, 0.9], [0.8, 0.9, 0.6]]


def closed_form_kl(loc, scale) -> np.ndarray:
    loc, scale = np.asarray(loc, float), np.asarray(scale, float)
    return 0.5 * (loc**2 + scale**2 - 1.0) - np.log(scale)


def leaf_batch():
    loc = torch.tensor(LOC, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    q = gaussian_posterior(loc, scale)
    return Batch(x=loc.detach(), posterior=q, z=q.rsample()), loc, scale


def objective(free_bits: float, prior: Prior | None = None, **opts):
    prior = prior or elbokit.make_prior("standard-normal", dim=3).double()
    return build_objective("kl", prior, options={"kl": {"free_bits": free_bits, **opts}})


def test_the_hand_made_batch_has_dimensions_on_both_sides_of_lambda():
    mean_kl = closed_form_kl(LOC, SCALE).mean(0)
    assert mean_kl[0] > LAMBDA and mean_kl[2] > LAMBDA and mean_kl[1] < LAMBDA


def test_the_loss_is_the_closed_form_and_the_reported_kl_the_true_one(fresh_registry):
    kl = closed_form_kl(LOC, SCALE)
    batch, _, _ = leaf_batch()
    out = objective(LAMBDA)(batch)
    expected_loss = np.maximum(LAMBDA, kl.mean(0)).sum()
    np.testing.assert_allclose(float(out.loss.detach()), expected_loss, rtol=1e-12)
    # The reported value is the true KL, which the floor raises above: the two differ here.
    np.testing.assert_allclose(float(out.terms["kl"]), kl.sum(1).mean(), rtol=1e-12)
    assert float(out.loss.detach()) > float(out.terms["kl"]) + 0.1
    # The per-example totals average to the loss (the objective only averages them).
    np.testing.assert_allclose(float(out.per_example.mean()), expected_loss, rtol=1e-12)


def test_a_floor_below_every_dimension_is_the_plain_kl(fresh_registry):
    batch, _, _ = leaf_batch()
    low = objective(1e-3)(batch)
    plain = objective(0.0)(batch)
    torch.testing.assert_close(low.loss, plain.loss, rtol=1e-12, atol=0)


def test_gradients_vanish_below_lambda_and_equal_the_plain_kl_above(fresh_registry):
    batch, loc, scale = leaf_batch()
    objective(LAMBDA)(batch).loss.backward()
    g_loc, g_scale = loc.grad.clone(), scale.grad.clone()
    batch, loc, scale = leaf_batch()
    objective(0.0)(batch).loss.backward()
    below, above = [1], [0, 2]
    assert torch.all(g_loc[:, below] == 0) and torch.all(g_scale[:, below] == 0)
    # And the plain KL does push that dimension: the zero is the floor's doing.
    assert torch.all(loc.grad[:, below].abs() > 0)
    torch.testing.assert_close(g_loc[:, above], loc.grad[:, above], rtol=1e-12, atol=0)
    torch.testing.assert_close(g_scale[:, above], scale.grad[:, above], rtol=1e-12, atol=0)
    # The plain gradient is the closed form d/dmu KL_ij / B = mu / B.
    np.testing.assert_allclose(g_loc[:, above].numpy(), np.asarray(LOC)[:, above] / len(LOC), rtol=1e-12)


def test_free_bits_is_a_declared_option_of_the_kl_term(fresh_registry):
    specs = {s.name: s for s in option_specs(fresh_registry.term("kl"), hidden=("registry", "estimator"))}
    assert specs["free_bits"].default == 0.0 and specs["free_bits"].type is float
    assert "max(lambda" in specs["free_bits"].help
    # A string from -o is read as the declared float.
    term = objective("0.25").terms["kl"]
    assert term.free_bits == 0.25 and term.batch_scope() == "batch"
    assert objective(0.0).terms["kl"].batch_scope() == "example"


class _StudentTPrior(Prior):
    """A factorised prior with a density but no closed-form KL from a Normal to its factors."""

    name = "t3"
    has_rsample = True

    def distribution(self):
        zeros = self._anchor.new_zeros(self.dim)
        return D.Independent(D.StudentT(zeros + 3.0, zeros, zeros + 1.0), 1)

    def sample(self, n):
        return self.distribution().sample((n,))


class _FullCovariancePrior(Prior):
    """A Gaussian with a full covariance: analytic KL, but not per dimension."""

    name = "correlated"
    has_rsample = True

    def distribution(self):
        cov = torch.full((self.dim, self.dim), 0.5, dtype=self._anchor.dtype) + 0.5 * torch.eye(self.dim)
        return D.MultivariateNormal(self._anchor.new_zeros(self.dim), covariance_matrix=cov)

    def sample(self, n):
        return self.distribution().sample((n,))


def gmm_prior():
    samples = np.random.default_rng(0).normal(size=(300, 3))
    return elbokit.make_prior("gmm", dim=3, samples=samples, n_components=2)


@pytest.mark.parametrize("make, words", [
    (gmm_prior, "MixtureSameFamily couples them"),
    (lambda: _FullCovariancePrior(dim=3), "MultivariateNormal couples them"),
    (lambda: _StudentTPrior(dim=3), "no closed-form KL from a Normal to the factors"),
])
def test_a_prior_without_a_per_dimension_closed_form_is_refused(fresh_registry, make, words):
    with pytest.raises(IncompatibleError) as info:
        build_objective("kl", make(), options={"kl": {"free_bits": 0.5}})
    message = str(info.value)
    assert message.startswith("Term 'kl'") and words in message and "\n" not in message
    # Without free bits the same prior is accepted (auto falls back to Monte Carlo where needed).
    build_objective("kl", make())


@pytest.mark.parametrize("opts, words", [
    ({"free_bits": 0.5, "estimator": "mc"}, "estimator 'mc' does not give"),
    ({"free_bits": -0.1}, "must be a number of nats >= 0"),
    ({"free_bits": float("inf")}, "must be a number of nats >= 0"),
])
def test_bad_free_bits_options_are_refused(fresh_registry, opts, words):
    with pytest.raises(ElbokitError, match=words):
        build_objective("kl", elbokit.make_prior("standard-normal", dim=3), options={"kl": opts})


# -- through the command line --------------------------------------------------------------
FAST = ["--data", "gaussian", "--n", "1000", "--hidden", "32", "--batch-size", "100", "--patience", "99",
        "-q", "--checkpoint-seconds", "0"]


@pytest.mark.parametrize("extra, words", [
    (["--prior", "gmm"], "prior 'gmm' is not a product of one-dimensional distributions"),
    (["-o", "kl.estimator=mc"], "estimator 'mc'"),
])
def test_the_cli_refuses_in_one_line_and_writes_nothing(tmp_path, run_cli, extra, words):
    out = tmp_path / "r"
    res = run_cli("train", *FAST, "--max-epochs", "1", "--terms", "classic", "-o", "kl.free_bits=0.5",
                  *extra, "--out", out)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "kl" in lines[0] and words in lines[0]
    assert not out.exists()


def test_logged_and_evaluated_values_stay_true_in_a_run(tmp_path, run_cli):
    # lambda = 5 nats in each of 5 dimensions: far above any dimension's KL after 2 epochs, so
    # every step's KL part of the loss is exactly 25 nats, while the logged KL is the true one.
    floor, out = 5.0 * 5, tmp_path / "r"
    res = run_cli("train", *FAST, "--max-epochs", "2", "--terms", "classic", "-o", "kl.free_bits=5",
                  "--out", out, "--json")
    assert res.exit_code == 0, res.stderr
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        assert 0 < row["train_loss_kl"] < floor and 0 < row["val_kl"] < floor
        assert row["train_loss"] == pytest.approx(row["train_loss_recon"] + floor, rel=1e-5)
        assert row["val_loss"] == pytest.approx(row["val_recon"] + floor, rel=1e-5)
        assert row["val_neg_elbo"] == pytest.approx(row["val_recon"] + row["val_kl"], rel=1e-6)
    test = json.loads((out / "summary.json").read_text())["test"]
    assert 0 < test["kl"] < floor and test["kl_estimator"] == "analytic"
    assert test["elbo"] == pytest.approx(-(test["recon"] + test["kl"]), rel=1e-6)
    assert test["elbo"] <= test["iwae"] + 3 * test["iwae_se"]
    run = json.loads((out / "summary.json").read_text())["objective"]
    assert next(t for t in run if t["name"] == "kl")["options"]["free_bits"] == 5.0


def test_free_bits_keep_units_active_that_a_heavy_kl_weight_collapses(tmp_path, run_cli):
    # Seed 0 on dataset 1 with the KL weighted 20: without free bits every unit collapses
    # (measured 0 active units for seeds 0, 1, 2), with 0.5 nats per dimension all 5 stay
    # active (5 for seeds 0, 1, 2). Active: Cov_x(E[z|x]) > 0.01 (Burda et al.).
    active = {}
    for free_bits in ("0", "0.5"):
        out = tmp_path / f"fb{free_bits}"
        res = run_cli("train", *FAST, "--max-epochs", "15", "--seed", "0", "--terms", "recon,kl:20",
                      "-o", f"kl.free_bits={free_bits}", "--out", out, "--json")
        assert res.exit_code == 0, res.stderr
        active[free_bits] = json.loads((out / "summary.json").read_text())["test"]["active_units"]
    assert active["0"] <= 1 and active["0.5"] >= 4
