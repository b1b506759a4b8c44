"""Held-out evaluation (elbokit.evaluate): bounds, identities, units and known optima.

Tolerances come from standard errors: per-example paired differences d_n give mean(d) and
SE = std(d) / sqrt(N); "a <= b within SE" is mean(b - a) >= -3 SE (one-sided, 0.13% false
alarm), "a == b up to MC error" is |mean(a - b)| <= 4 SE.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import elbokit
from elbokit.data import Standardizer
from elbokit.evaluate import (
    evaluate_model,
    gaussian_generator_loglik,
    importance_sampled_terms,
)
from elbokit.likelihoods import GaussianLikelihood

NOISE_STD = 0.5


def gaussian_dataset(n: int, data_dim: int = 20, latent_dim: int = 5, seed: int = 0):
    """docs/design.md section 6, dataset 1: z ~ N(0, I), W ~ N(0, 1) (L, D), x = z W + N(0, 0.5^2)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((latent_dim, data_dim))
    z = rng.standard_normal((n, latent_dim))
    x = z @ W + NOISE_STD * rng.standard_normal((n, data_dim))
    return x, z, {"W": W, "noise_std": NOISE_STD, "generator": "gaussian"}


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """mean(a - b) over examples and its standard error."""
    d = (torch.as_tensor(a) - torch.as_tensor(b)).double()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


class LinearGaussianVAE(nn.Module):
    """The true model of the gaussian data with its exact posterior as the encoder.

    p(z) = N(0, I), p(x|z) = N(z W, s^2 I) is the data-generating process, and the posterior
    is N(x W^T M^-1, s^2 M^-1) with M = W W^T + s^2 I. Rotating the latent space by the
    eigenvectors U of W W^T (z' = z U, W' = U^T W, which leaves p(z) and p(x) unchanged) makes
    M diagonal, so the exact posterior is a diagonal Gaussian that elbokit's encoders can
    express. With `mean`/`std` the model works on standardised x: same density, moved by the
    Jacobian. Then log p(x|z) + log p(z) - log q(z|x) = log p(x) for EVERY z.
    """

    def __init__(self, W: np.ndarray, s: float, mean=None, std=None, scale_factor: float = 1.0):
        super().__init__()
        d = W.shape[1]
        lam, U = np.linalg.eigh(W @ W.T)
        w_rot = U.T @ W
        m = lam + s ** 2
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32)  # noqa: E731
        self.register_buffer("w_rot", as_t(w_rot))
        self.register_buffer("enc", as_t(w_rot.T / m))
        self.register_buffer("post_scale", as_t(scale_factor * s / np.sqrt(m)))
        self.register_buffer("mean", as_t(np.zeros(d) if mean is None else mean))
        self.register_buffer("std", as_t(np.ones(d) if std is None else std))
        self.likelihood = GaussianLikelihood(d)
        with torch.no_grad():
            self.likelihood.log_scale.copy_(torch.log(s / self.std))

    def encode(self, x: torch.Tensor):
        x_orig = x * self.std + self.mean
        return elbokit.gaussian_posterior(x_orig @ self.enc, self.post_scale.expand(x.shape[0], -1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.w_rot - self.mean) / self.std


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster, and immune to a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def truth():
    x, z, meta = gaussian_dataset(400, seed=1)
    return x, z, meta, elbokit.make_prior("standard-normal", dim=5)


@pytest.fixture(scope="module")
def trained():
    """A small MLP VAE trained briefly with the classic objective on standardised gaussian data."""
    x, z, meta = gaussian_dataset(1300, seed=0)
    train, test = slice(0, 900), slice(900, None)
    st = Standardizer.fit(x[train])
    xs = torch.as_tensor(st.transform(x), dtype=torch.float32)
    torch.manual_seed(0)
    prior = elbokit.make_prior("standard-normal", dim=5)
    objective = elbokit.build_objective("classic", prior)
    model = elbokit.VAE(20, 5, hidden=(32,))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_train = xs[train]
    for _ in range(300):
        out = objective(model(x_train[torch.randint(0, len(x_train), (128,))]))
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
    model.eval()
    return {"model": model, "prior": prior, "likelihood": objective.reconstruction_likelihood(),
            "x": xs[test], "x_orig": x[test], "z": z[test], "meta": meta, "standardizer": st}


@pytest.fixture(scope="module")
def trained_terms(trained):
    """Per-example importance-sampling terms at K = 1, 10, 100, with independent seeds."""
    t = trained
    return {k: importance_sampled_terms(t["model"], t["prior"], t["likelihood"], t["x"], iw_samples=k, seed=k)
            for k in (1, 10, 100)}


@pytest.fixture(scope="module")
def trained_report(trained):
    t = trained
    return evaluate_model(t["model"], t["prior"], t["likelihood"], t["x"], z_true=t["z"], meta=t["meta"],
                          standardizer=t["standardizer"], iw_samples=100, seed=3)


# ------------------------------------------------------------------ a trained VAE
def test_trained_vae_elbo_below_iwae_below_exact(trained, trained_terms):
    t = trained
    ladj = t["standardizer"].log_abs_det_jacobian
    iw = trained_terms[100]
    elbo = iw["log_lik"] - iw["kl"]
    exact = torch.as_tensor(gaussian_generator_loglik(t["x_orig"], t["meta"]["W"], NOISE_STD)) - ladj
    gap_iwae, se_iwae = paired(iw["iwae"], elbo)
    gap_exact, se_exact = paired(exact, iw["iwae"])
    assert gap_iwae >= -3 * se_iwae
    assert gap_exact >= -3 * se_exact
    # The model is misspecified (mse likelihood with variance 1/2), so both gaps are real.
    assert gap_iwae > 3 * se_iwae
    assert gap_exact > 3 * se_exact


def test_report_orders_bounds_in_original_units(trained, trained_report):
    r = trained_report
    assert r["elbo"] <= r["iwae"] <= r["exact_loglik"]
    assert r["elbo"] == pytest.approx(-(r["recon"] + r["kl"]), rel=1e-6)  # float32 per example
    assert r["paper_elbo"] == pytest.approx(-r["paper_mse"] - r["paper_kld"], abs=1e-9)
    assert r["kl_estimator"] == "analytic"
    assert r["unavailable"] == {}
    assert r["units"]["log_abs_det_jacobian"] == pytest.approx(-np.log(trained["standardizer"].std).sum())
    assert 0 < r["latent_r2"] <= 1 and 0 <= r["active_units"] <= r["latent_dim"] == 5


def test_iwae_with_one_sample_is_the_elbo(trained_terms):
    iw1, iw100 = trained_terms[1], trained_terms[100]
    diff, se = paired(iw1["iwae"], iw100["log_lik"] - iw100["kl"])
    assert abs(diff) <= 4 * se


def test_iwae_does_not_decrease_with_k(trained_terms):
    up_10, se_10 = paired(trained_terms[10]["iwae"], trained_terms[1]["iwae"])
    up_100, se_100 = paired(trained_terms[100]["iwae"], trained_terms[10]["iwae"])
    assert up_10 >= -3 * se_10
    assert up_100 >= -3 * se_100
    # ... and over the whole range it strictly improves on this model.
    up, se = paired(trained_terms[100]["iwae"], trained_terms[1]["iwae"])
    assert up > 3 * se


def test_surgery_identity_holds_on_the_held_out_set(trained_report):
    r = trained_report
    assert r["kl"] == pytest.approx(r["mi"] + r["marginal_kl"] + r["identity_gap"], abs=1e-9)
    assert abs(r["identity_gap"]) <= 4 * r["identity_gap_se"]
    assert r["identity_gap_se"] < 0.05 * r["kl"]  # the check has power
    assert r["marginal_kl"] == pytest.approx(r["aggregate_cross_entropy"] - r["aggregate_entropy"], abs=1e-9)
    assert 0 < r["mi"] <= r["mi_max"] == pytest.approx(math.log(r["n"]))


# ------------------------------------------------- the optimum in closed form
def test_exact_posterior_model_reaches_the_exact_loglik(truth):
    x, z, meta, prior = truth
    model = LinearGaussianVAE(meta["W"], NOISE_STD)
    xt = torch.as_tensor(x, dtype=torch.float32)
    exact = torch.as_tensor(gaussian_generator_loglik(x, meta["W"], NOISE_STD))
    for k in (1, 7):
        iw = importance_sampled_terms(model, prior, model.likelihood, xt, iw_samples=k, seed=k)
        # Every importance weight equals p(x): no Monte-Carlo error, only float32 rounding.
        assert torch.allclose(iw["iwae"].double(), exact, atol=2e-3, rtol=0)
    r = evaluate_model(model, prior, model.likelihood, xt, z_true=z, meta=meta, iw_samples=20)
    iw = importance_sampled_terms(model, prior, model.likelihood, xt, iw_samples=20, seed=0)
    diff, se = paired(iw["log_lik"] - iw["kl"], exact)
    assert abs(diff) <= 4 * se  # ELBO = log p(x) up to the MC error of E log p(x|z)
    assert r["iwae"] == pytest.approx(r["exact_loglik"], abs=1e-3)
    assert abs(r["elbo"] - r["exact_loglik"]) <= 4 * r["elbo_se"]
    assert abs(r["identity_gap"]) <= 4 * r["identity_gap_se"]
    assert r["active_units"] == 5


def test_wrong_posterior_opens_strict_gaps(truth):
    x, _, meta, prior = truth
    model = LinearGaussianVAE(meta["W"], NOISE_STD, scale_factor=2.0)  # too-wide posterior
    xt = torch.as_tensor(x, dtype=torch.float32)
    exact = torch.as_tensor(gaussian_generator_loglik(x, meta["W"], NOISE_STD))
    iw = importance_sampled_terms(model, prior, model.likelihood, xt, iw_samples=100, seed=0)
    elbo = iw["log_lik"] - iw["kl"]
    # KL(q || posterior) per example for a posterior scaled by c in L dims: L(c^2 - 1 - 2 log c)/2.
    expected_gap = 5 * (4 - 1 - 2 * math.log(2)) / 2
    diff, se = paired(exact, elbo)
    assert abs(diff - expected_gap) <= 4 * se
    up, se_up = paired(iw["iwae"], elbo)
    below, se_below = paired(exact, iw["iwae"])
    assert up > 3 * se_up and below >= -3 * se_below and below < diff


def test_latent_r2_matches_the_linear_gaussian_theory(truth):
    x, z, meta, prior = truth
    model = LinearGaussianVAE(meta["W"], NOISE_STD)
    r = evaluate_model(model, prior, model.likelihood, torch.as_tensor(x, dtype=torch.float32),
                       z_true=z, meta=meta, iw_samples=2)
    W = meta["W"]
    # E[z|x] is linear in x, so the best linear fit leaves Var(z_j | x) = [s^2 (W W^T + s^2 I)^-1]_jj.
    residual = NOISE_STD ** 2 * np.diag(np.linalg.inv(W @ W.T + NOISE_STD ** 2 * np.eye(5)))
    theory = 1 - residual.mean()
    # A residual variance estimated from N points has relative SE about sqrt(2 / N).
    tolerance = 4 * (1 - theory) * math.sqrt(2 / len(x))
    assert r["latent_r2"] == pytest.approx(theory, abs=tolerance)


# ------------------------------------------------------------------------- units
def test_standardised_model_reports_the_same_loglik_in_original_units(truth):
    x, z, meta, prior = truth
    st = Standardizer(mean=x.mean(0) + 0.3, std=x.std(0) * 1.7)  # any affine map will do
    plain = LinearGaussianVAE(meta["W"], NOISE_STD, scale_factor=1.5)
    scaled = LinearGaussianVAE(meta["W"], NOISE_STD, mean=st.mean, std=st.std, scale_factor=1.5)
    r0 = evaluate_model(plain, prior, plain.likelihood, torch.as_tensor(x, dtype=torch.float32),
                        meta=meta, iw_samples=30)
    r1 = evaluate_model(scaled, prior, scaled.likelihood, torch.as_tensor(st.transform(x), dtype=torch.float32),
                        meta=meta, standardizer=st, iw_samples=30)
    assert r1["units"]["log_abs_det_jacobian"] == pytest.approx(-np.log(st.std).sum())
    for key in ("elbo", "iwae", "recon", "exact_loglik", "kl", "mse", "mi", "identity_gap"):
        assert r1[key] == pytest.approx(r0[key], rel=1e-4, abs=1e-4), key
    # The paper's MSE is in the standardised space, so it differs.
    assert r1["paper_mse"] < r0["paper_mse"] / 2


# ------------------------------------------------------------- other priors
def test_sample_only_prior_reports_what_it_can(truth):
    x, _, meta, normal = truth
    model = LinearGaussianVAE(meta["W"], NOISE_STD)
    xt = torch.as_tensor(x, dtype=torch.float32)
    bank = np.random.default_rng(5).standard_normal((20000, 5))
    sample_only = elbokit.make_prior("samples", samples=bank)
    r = evaluate_model(model, sample_only, model.likelihood, xt, meta=meta, iw_samples=5)
    ref = evaluate_model(model, normal, model.likelihood, xt, meta=meta, iw_samples=5)
    for key in ("elbo", "iwae", "kl", "identity_gap", "paper_kld", "paper_elbo"):
        assert r[key] is None and key in r["unavailable"]
    assert r["aggregate_cross_entropy_estimator"].startswith("knn")
    # The prior does not enter H[q(z)] or I(x;z): same seed, same numbers.
    assert r["aggregate_entropy"] == ref["aggregate_entropy"] and r["mi"] == ref["mi"]
    assert r["recon"] == pytest.approx(ref["recon"]) and r["exact_loglik"] == ref["exact_loglik"]
    # k-NN cross-entropy to samples of N(0, I) estimates the same H[q(z), p(z)] as -log p.
    se = math.hypot(r["aggregate_cross_entropy_se"], ref["aggregate_cross_entropy_se"])
    assert abs(r["aggregate_cross_entropy"] - ref["aggregate_cross_entropy"]) <= 4 * se


def test_gmm_prior_uses_monte_carlo_kl(truth):
    x, _, meta, _ = truth
    model = LinearGaussianVAE(meta["W"], NOISE_STD, scale_factor=1.5)
    prior = elbokit.make_prior("gmm", samples=np.random.default_rng(6).standard_normal((3000, 5)), n_components=2)
    r = evaluate_model(model, prior, model.likelihood, torch.as_tensor(x, dtype=torch.float32),
                       meta=meta, iw_samples=100)
    assert r["kl_estimator"] == "mc"
    assert abs(r["identity_gap"]) <= 4 * r["identity_gap_se"]
    assert r["elbo"] < r["iwae"] < r["exact_loglik"] + 3 * r["exact_loglik_se"]


def test_collapsed_posterior_has_no_information(truth):
    x, _, meta, prior = truth

    class Collapsed(LinearGaussianVAE):
        def encode(self, x):  # q(z|x) = p(z) for every x
            return elbokit.gaussian_posterior(torch.zeros(x.shape[0], 5), torch.ones(x.shape[0], 5))

    model = Collapsed(meta["W"], NOISE_STD)
    r = evaluate_model(model, prior, model.likelihood, torch.as_tensor(x, dtype=torch.float32), iw_samples=10)
    assert r["kl"] == 0 and r["active_units"] == 0
    assert r["mi"] == pytest.approx(0, abs=1e-9) and r["marginal_kl"] == pytest.approx(0, abs=0.02)
    # With codes independent of x no decoder beats the mean: E||x - f(z)||^2 >= sum Var(x_d).
    assert r["paper_mse"] >= x.var(0).sum() - 4 * r["paper_mse_se"]


# ------------------------------------------------------------ chunking, inputs
def test_chunked_samples_agree_with_one_pass(trained):
    t = trained
    x = t["x"][:150]
    one = importance_sampled_terms(t["model"], t["prior"], t["likelihood"], x, iw_samples=64, seed=1)
    # 30 rows at a time: each example's 64 samples come in blocks of 30, 30 and 4, combined by logsumexp.
    blocks = importance_sampled_terms(t["model"], t["prior"], t["likelihood"], x, iw_samples=64, seed=2, chunk=30)
    diff, se = paired(blocks["iwae"], one["iwae"])
    assert abs(diff) <= 4 * se
    diff, se = paired(blocks["log_lik"], one["log_lik"])
    assert abs(diff) <= 4 * se


def test_bad_sample_counts_are_refused(truth):
    x, _, meta, prior = truth
    model = LinearGaussianVAE(meta["W"], NOISE_STD)
    with pytest.raises(elbokit.ElbokitError, match="positive integer"):
        evaluate_model(model, prior, model.likelihood, torch.as_tensor(x, dtype=torch.float32), iw_samples=0)


def test_report_is_json(trained_report):
    import json

    again = json.loads(json.dumps(trained_report, allow_nan=False))
    assert again["iw_samples"] == 100 and set(again["bounds"]) >= {"elbo", "iwae", "exact_loglik", "paper_elbo"}


def test_generated_file_keeps_its_exact_loglik(tmp_path):
    from elbokit.data import load_dataset, save_npz
    from elbokit.data.synthetic import generate
    from elbokit.evaluate import evaluate_model

    for kind, has_exact in (("gaussian", True), ("mixture", False)):
        data = generate(kind, n=100, seed=2)
        save_npz(data, tmp_path / f"{kind}.npz")
        loaded = load_dataset(str(tmp_path / f"{kind}.npz"))
        model = LinearGaussianVAE(loaded.meta["W"], loaded.meta["noise_std"])
        r = evaluate_model(model, elbokit.make_prior("standard-normal", dim=5), model.likelihood,
                           torch.as_tensor(loaded.x, dtype=torch.float32), meta=loaded.meta, iw_samples=3)
        assert (r["exact_loglik"] is not None) == has_exact
        if has_exact:  # the true model with its exact posterior: IWAE = log p(x)
            assert r["iwae"] == pytest.approx(r["exact_loglik"], abs=1e-3)
        else:  # W and noise_std alone do not make the latents N(0, I)
            assert "generator" in r["unavailable"]["exact_loglik"]


# ---------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run directory: `elbokit train` for 3 epochs on small gaussian data."""
    from elbokit.cli import main

    out = tmp_path_factory.mktemp("runs") / "gaussian"
    code = main(["train", "--data", "gaussian", "--n", "600", "--hidden", "16", "--max-epochs", "3",
                 "--batch-size", "128", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_train_stores_the_evaluation_in_the_summary(run_dir):
    import json

    test = json.loads((run_dir / "summary.json").read_text())["test"]
    assert test["n"] == 60 and test["split"] == "test" and test["iw_samples"] == 1000
    assert test["elbo"] <= test["iwae"] <= test["exact_loglik"]


def test_cli_evaluate_json_matches_the_library(run_cli, run_dir):
    import json

    from elbokit.evaluate import evaluate_run
    from elbokit.run import load_run

    result = run_cli("evaluate", run_dir, "--json", "--iw-samples", "50", "--seed", "4", "--checkpoint", "last")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    expected = evaluate_run(load_run(run_dir, "last"), iw_samples=50, seed=4)
    for key in ("elbo", "iwae", "exact_loglik", "kl", "mi", "marginal_kl", "paper_elbo", "latent_r2"):
        assert report[key] == pytest.approx(expected[key], rel=1e-9), key
    assert report["split"] == "test" and report["iw_samples"] == 50 and report["checkpoint"] == "last"
    assert report["elbo"] <= report["iwae"] <= report["exact_loglik"]
    assert report["units"]["log_abs_det_jacobian"] == pytest.approx(
        load_run(run_dir).standardizer.log_abs_det_jacobian)


def test_cli_evaluate_table_marks_the_bounds(run_cli, run_dir):
    result = run_cli("evaluate", run_dir, "--split", "val", "-k", "20")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "lower bound" in text and "exact" in text and "NOT a bound" in text and "val split" in text


def test_cli_evaluate_other_data(run_cli, run_dir):
    import json

    result = run_cli("evaluate", run_dir, "--data", "gaussian", "--data-option", "n=300", "-k", "20", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n"] == 300 and report["split"] is None and report["exact_loglik"] is not None


@pytest.mark.parametrize("args, message", [
    (["missing-run-dir"], "Run directory not found"),
    (["{run}", "--iw-samples", "0"], "--iw-samples must be a positive integer"),
    (["{run}", "--split", "holdout"], "Unknown split 'holdout'"),
    (["{run}", "--data", "digits"], "the model takes 20 features"),
    (["{run}", "--data", "gaussian", "--split", "val"], "--split picks one of the run's own splits"),
])
def test_cli_evaluate_bad_input_is_one_line(run_cli, run_dir, tmp_path, args, message):
    args = [a.replace("{run}", str(run_dir)) if a == "{run}" else str(tmp_path / a) if a == "missing-run-dir" else a
            for a in args]
    result = run_cli("evaluate", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
