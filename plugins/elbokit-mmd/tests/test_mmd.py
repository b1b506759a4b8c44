"""Tests of the `mmd` term: elbokit's conformance checks, then the estimator's own numbers."""

from __future__ import annotations

import math

import pytest
import torch

import elbokit
from elbokit.testing import check_term

elbokit_mmd = pytest.importorskip("elbokit_mmd", reason="install the plugin first: pip install -e plugins/elbokit-mmd")
MMD, mmd2_per_example, kernel_matrix = elbokit_mmd.MMD, elbokit_mmd.mmd2_per_example, elbokit_mmd.kernel_matrix


# [docs: conformance test]
@pytest.mark.parametrize("options", [{}, {"kernel": "imq", "bandwidth": 4.0, "n_prior": 64}])
def test_mmd_passes_elbokit_conformance_checks(options):
    report = check_term(MMD, options, plugins=[elbokit_mmd])
    # It needs only prior samples, so it must also run with the sample-only prior.
    assert report["accepted"] == ["standard-normal", "gmm", "samples"]
# [/docs: conformance test]


def naive_unbiased_mmd2(z, y, kernel, bandwidth):
    """The U-statistic MMD^2_u written as Gretton et al.'s double sums, one pair at a time."""
    k = lambda a, b: float(kernel_matrix(a[None], b[None], kernel, bandwidth))  # noqa: E731
    b, m = len(z), len(y)
    zz = sum(k(z[i], z[j]) for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    zy = sum(k(z[i], y[j]) for i in range(b) for j in range(m)) / (b * m)
    return zz + yy - 2 * zy


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_per_example_contributions_average_to_the_double_loop_u_statistic(kernel):
    torch.manual_seed(1)
    z, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64) + 0.5
    per_example = mmd2_per_example(z, y, kernel, bandwidth=2.0)
    assert per_example.shape == (7,)
    assert per_example.mean().item() == pytest.approx(naive_unbiased_mmd2(z, y, kernel, 2.0), abs=1e-12)


def test_unbiased_so_zero_on_average_for_the_same_distribution():
    # Over many independent pairs of samples from one distribution, MMD^2_u averages to 0,
    # while the biased V-statistic (which keeps the i = j terms) is clearly positive.
    torch.manual_seed(2)
    unbiased, biased = [], []
    for _ in range(400):
        z, y = torch.randn(16, 2), torch.randn(16, 2)
        unbiased.append(mmd2_per_example(z, y).mean())
        biased.append((kernel_matrix(z, z, "rbf", 2.0).mean() + kernel_matrix(y, y, "rbf", 2.0).mean()
                       - 2 * kernel_matrix(z, y, "rbf", 2.0).mean()))
    unbiased, biased = torch.stack(unbiased), torch.stack(biased)
    standard_error = unbiased.std() / math.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 3 * standard_error
    assert biased.mean() > 10 * standard_error


def test_grows_with_the_mean_shift_between_codes_and_prior():
    torch.manual_seed(3)
    y = torch.randn(256, 2)
    values = [mmd2_per_example(torch.randn(256, 2) + torch.tensor([shift, 0.0]), y).mean().item()
              for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert abs(values[0]) < 0.01
    assert values[1] > 0.02
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_default_bandwidth_is_the_latent_dimension():
    # A standard-normal pair is at squared distance 2L on average: k = exp(-2L / (2L)) = e^-1.
    a, b = torch.zeros(1, 4), torch.full((1, 4), math.sqrt(2.0))
    assert kernel_matrix(a, b, "rbf", 4.0).item() == pytest.approx(math.exp(-1))
    assert kernel_matrix(a, b, "imq", 4.0).item() == pytest.approx(1 / 3)
    z, y = torch.randn(8, 4), torch.randn(8, 4)
    assert torch.allclose(mmd2_per_example(z, y), mmd2_per_example(z, y, "rbf", 4.0))


def test_pulls_codes_towards_a_sample_only_prior():
    registry = elbokit.Registry.build([elbokit_mmd], load_entry_points=False, strict=True)
    torch.manual_seed(4)
    bank = torch.randn(2048, 2) + torch.tensor([3.0, 0.0])
    prior = elbokit.make_prior("samples", samples=bank, registry=registry)
    objective = elbokit.build_objective("mmd", prior, registry=registry)
    loc = torch.zeros(128, 2, requires_grad=True)
    optimiser = torch.optim.SGD([loc], lr=40.0)
    for _ in range(60):
        z = loc + 0.1 * torch.randn(128, 2)
        batch = elbokit.Batch(x=z, posterior=elbokit.gaussian_posterior(loc, torch.full_like(loc, 0.1)), z=z)
        optimiser.zero_grad()
        objective(batch).loss.backward()
        optimiser.step()
    assert loc.mean(0)[0].item() == pytest.approx(3.0, abs=0.5)


def test_bad_option_is_one_clear_error():
    registry = elbokit.Registry.build([elbokit_mmd], load_entry_points=False, strict=True)
    prior = elbokit.make_prior("standard-normal", dim=2, registry=registry)
    with pytest.raises(elbokit.ElbokitError, match="Bad option for term 'mmd': kernel must be one of rbf, imq"):
        elbokit.build_objective("mmd", prior, options={"mmd": {"kernel": "gaussian"}}, registry=registry)
