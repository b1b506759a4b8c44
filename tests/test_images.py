"""Data keeps its shape: pixel likelihoods are normalised, conv trains and evaluates on digits
as 1x8x8 images and on (N, 3, 16, 16) arrays, and digits at its defaults uses its 17-level
likelihood without standardisation and says which rows an epoch leaves out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from elbokit.likelihoods import make_likelihood


def test_discretized_is_a_product_over_pixels_of_one_pixel_laws():
    torch.manual_seed(0)
    lik = make_likelihood("discretized", (2, 3), levels=17)
    with torch.no_grad():
        lik.log_scale.copy_(torch.randn(2, 3) - 2.0)
    x = torch.randint(0, 17, (5, 2, 3)) / 16.0
    out = torch.randn(5, 2, 3) * 0.7 + 0.5
    one = make_likelihood("discretized", 1, levels=17)
    total = torch.zeros(5)
    for i in range(2):
        for j in range(3):
            with torch.no_grad():
                one.log_scale.fill_(float(lik.log_scale[i, j]))
            total += one.log_prob(x[:, i, j, None], out[:, i, j, None])
    assert torch.allclose(lik.log_prob(x, out), total, atol=1e-5)


def test_discretized_one_pixel_sums_to_one_even_far_in_the_tails():
    lik = make_likelihood("discretized", 1, levels=256)
    grid = torch.linspace(0, 1, 256).reshape(-1, 1)
    for loc, log_scale in [(0.5, -3.0), (-4.0, -1.0), (5.0, -6.0), (0.3, 2.0)]:
        with torch.no_grad():
            lik.log_scale.fill_(log_scale)
        with torch.no_grad():
            log_p = lik.log_prob(grid, torch.full_like(grid, loc))
        assert torch.isfinite(log_p).all()
        assert float(torch.logsumexp(log_p.double(), 0)) == pytest.approx(0.0, abs=1e-4)


def test_continuous_bernoulli_integrates_to_one_and_bernoulli_sums_to_one():
    x = torch.linspace(0, 1, 20001).reshape(-1, 1)
    for logit in (-3.0, 0.0, 0.01, 2.5):
        out = torch.full_like(x, logit)
        density = make_likelihood("continuous-bernoulli").log_prob(x.double(), out.double()).exp()
        assert float(torch.trapezoid(density, x.double().flatten())) == pytest.approx(1.0, abs=1e-6)
        both = torch.tensor([[0.0], [1.0]])
        p = make_likelihood("bernoulli").log_prob(both, torch.full_like(both, logit)).exp()
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)


def test_likelihoods_sum_over_every_event_dimension():
    torch.manual_seed(1)
    x, out = torch.rand(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    for name in ("mse", "bernoulli", "continuous-bernoulli"):
        lik = make_likelihood(name)
        assert torch.allclose(lik.log_prob(x, out), lik.log_prob(x.flatten(1), out.flatten(1)))
    g = make_likelihood("gaussian", (3, 5, 5))
    g2 = make_likelihood("gaussian", 75)
    with torch.no_grad():
        g.log_scale.copy_(torch.randn(3, 5, 5))
        g2.log_scale.copy_(g.log_scale.flatten())
    assert torch.allclose(g.log_prob(x, out), g2.log_prob(x.flatten(1), out.flatten(1)))


FAST = ["--max-epochs", "2", "--no-evaluate", "-q", "--json"]


def test_conv_trains_on_digits_as_images_and_evaluates_with_elbo_below_iwae(run_cli, fresh_registry, tmp_path):
    from elbokit.evaluate import evaluate_run
    from elbokit.run import load_run

    out = tmp_path / "digits"
    res = run_cli("train", "--data", "digits", "--model", "conv", "--model-option", "channels=8,16",
                  "--model-option", "hidden=32", *FAST, "--out", out)
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["likelihood"] == {"name": "discretized", "units": "nats (probability mass over the levels)"}
    run = load_run(out)
    assert run.model.event_shape == (1, 8, 8) and run.config["data"]["standardize"] == "none"
    test = run.load_split("test")
    assert tuple(test.x.shape) == (180, 1, 8, 8)
    report = evaluate_run(run, iw_samples=50)
    # E[elbo] <= E[iwae_K] per example; over 180 test images the mean difference is many SE above 0.
    assert report["elbo"] <= report["iwae"] and report["elbo"] < 0
    # A probability mass: its log is at most 0 (a density's need not be).
    assert -report["recon"] <= 0


def test_conv_on_a_synthetic_colour_image_file(run_cli, fresh_registry, tmp_path):
    from elbokit.evaluate import evaluate_run
    from elbokit.run import load_run

    rng = np.random.default_rng(0)
    # Smooth random colour images: a low-resolution pattern upsampled, values in [0, 1].
    low = rng.uniform(size=(200, 3, 4, 4))
    x = np.kron(low, np.ones((1, 1, 4, 4))) + 0.05 * rng.standard_normal((200, 3, 16, 16))
    np.save(tmp_path / "img.npy", x)
    out = tmp_path / "run"
    res = run_cli("train", "--data", tmp_path / "img.npy", "--model-option", "channels=8,16",
                  "--model-option", "hidden=32", "--batch-size", "40", *FAST, "--out", out)
    assert res.exit_code == 0, res.stderr
    run = load_run(out)
    assert run.config["model"]["name"] == "conv"  # auto: (N, C, H, W) files get conv
    assert run.data_info["image_shape"] == [3, 16, 16]
    report = evaluate_run(run, iw_samples=20)
    assert report["elbo"] <= report["iwae"]
    from elbokit.plot import figure_bytes, reconstructions_figure

    fig = reconstructions_figure(run)
    assert fig is not None and figure_bytes(fig, "png").startswith(b"\x89PNG")


def test_digits_defaults_no_standardisation_discretized_and_dropped_rows_are_said(fresh_registry):
    from elbokit import config
    from elbokit.build import build_components

    cfg = config.resolve(overrides={"data": {"dataset": "digits"}})
    assert cfg["data"]["standardize"] == "none" and cfg["train"]["batch_size"] == 128
    assert cfg["terms"]["recon"] == {"likelihood": "discretized", "levels": 17}
    assert cfg["model"]["name"] == "mlp"  # digits stay mlp unless conv is asked for
    # The user's choices win over the dataset's defaults.
    mine = config.resolve(overrides={"data": {"dataset": "digits"}, "train": {"batch_size": 479},
                                     "terms": {"recon": {"likelihood": "bernoulli"}}})
    assert mine["train"]["batch_size"] == 479 and mine["terms"]["recon"] == {"likelihood": "bernoulli"}
    components = build_components(cfg, registry=fresh_registry)
    assert len(components.indices["train"]) == 1437
    assert any("29 of the 1437 training rows are left out of each epoch" in n for n in components.notes)
    exact = build_components(mine, registry=fresh_registry)
    assert not any("left out" in n for n in exact.notes)  # 1437 = 3 x 479


def test_the_discretized_likelihood_refuses_data_off_its_grid(fresh_registry):
    from elbokit import config
    from elbokit.build import build_components
    from elbokit.errors import ElbokitError

    cfg = config.resolve(overrides={"data": {"dataset": "digits"}, "terms": {"recon": {"levels": 9}}})
    with pytest.raises(ElbokitError, match="grid of 9 levels"):
        build_components(cfg, registry=fresh_registry)
