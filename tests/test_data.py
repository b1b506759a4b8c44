"""The datasets match docs/design.md section 6; files are validated; splits and standardisation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from elbokit.data import Standardizer, load_dataset, split_indices
from elbokit.data.files import load_digits, load_file
from elbokit.data.synthetic import generate
from elbokit.errors import ElbokitError


@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
def test_generated_shapes_and_stored_truth(kind):
    ds = generate(kind, n=4000, seed=3)
    assert ds.x.shape == (4000, 20) and ds.x_pos.shape == (4000, 20) and ds.z.shape == (4000, 5)
    assert ds.meta["W"].shape == (5, 20) and ds.meta["noise_std"] == 0.5
    # The stored W reproduces x up to the noise: the residual is N(0, 0.5^2) per entry.
    residual = ds.x - ds.z @ ds.meta["W"]
    assert abs(residual.std() - 0.5) < 0.01
    assert abs(residual.mean()) < 0.01
    # W ~ N(0, 1).
    assert abs(ds.meta["W"].std() - 1.0) < 0.3
    # Positives: x+ - x ~ N(0, 0.1^2) per entry, so the squared distance is about D r^2.
    diff = ds.x_pos - ds.x
    assert abs(diff.std() - 0.1) < 0.002
    assert abs((diff ** 2).sum(1).mean() - 20 * 0.01) < 0.005


def test_gaussian_latents_are_standard_normal():
    z = generate("gaussian", n=20000, seed=0).z
    assert np.allclose(z.mean(0), 0, atol=0.03) and np.allclose(z.std(0), 1, atol=0.03)


def test_mixture_latents_follow_the_appendix():
    z = generate("mixture", n=40000, seed=1).z
    # Column i is m(u) = u + sin(pi u / 2), u ~ N(mu_i, s_i^2): E[sin(a u)] = sin(a mu) exp(-a^2 s^2 / 2).
    a = 0.5 * math.pi
    for i, (mu, s) in enumerate(zip(np.linspace(-3, 3, 3), np.linspace(0.5, 1.0, 3))):
        expected = mu + math.sin(a * mu) * math.exp(-0.5 * a * a * s * s)
        assert abs(z[:, i].mean() - expected) < 0.02, i
    # Dimension matching: the two extra columns are N(0, 1) noise.
    assert np.allclose(z[:, 3:].mean(0), 0, atol=0.03) and np.allclose(z[:, 3:].std(0), 1, atol=0.03)
    assert generate("mixture", n=10, latent_dim=2).z.shape == (10, 2)  # truncation


def test_generation_is_deterministic_by_seed():
    a, b, c = generate("mixture", n=50, seed=4), generate("mixture", n=50, seed=4), generate("mixture", n=50, seed=5)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.x_pos, b.x_pos)
    assert not np.allclose(a.x, c.x)
    # Fresh latents for a prior come from their own stream, not the data's.
    assert not np.allclose(a.sample_latents(50), a.z)
    assert np.array_equal(a.sample_latents(7), b.sample_latents(7))


@pytest.mark.parametrize("bad", [{"n": 0}, {"data_dim": -1}, {"noise_std": -0.5}, {"latent_dim": 2.5}])
def test_generator_refuses_bad_sizes(bad):
    with pytest.raises(ElbokitError):
        generate("gaussian", **bad)


def test_split_is_deterministic_and_a_partition():
    a, b, c = split_indices(1000, 7), split_indices(1000, 7), split_indices(1000, 8)
    assert [len(a[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    joined = np.concatenate([a["train"], a["val"], a["test"]])
    assert np.array_equal(np.sort(joined), np.arange(1000))
    with pytest.raises(ElbokitError):
        split_indices(2, 0)


def test_standardizer_is_fitted_on_the_training_split_only(tmp_path):
    from elbokit import config
    from elbokit.train import prepare

    cfg = config.resolve(overrides={"data": {"n": 200}, "model": {"hidden": [8]},
                                    "output": {"out": str(tmp_path / "run")}})
    setup = prepare(cfg)
    train_x = setup.dataset.x[setup.indices["train"]]
    assert np.allclose(setup.standardizer.mean, train_x.mean(0))
    assert np.allclose(setup.standardizer.std, train_x.std(0))
    assert not np.allclose(setup.standardizer.mean, setup.dataset.x.mean(0))
    assert abs(float(setup.splits["train"].x.mean())) < 1e-5  # standardised on train...
    assert abs(float(setup.splits["test"].x.mean())) > 1e-4  # ...not on test
    assert not (tmp_path / "run").exists()  # prepare writes nothing


def test_standardizer_round_trip():
    x = np.random.default_rng(0).normal(3, 2, size=(100, 4))
    s = Standardizer.fit(x)
    assert np.allclose(s.inverse(s.transform(x)), x)
    assert math.isclose(s.log_abs_det_jacobian, -np.log(x.std(0)).sum())


def test_digits():
    ds = load_digits(seed=0)
    assert ds.x.shape == (1797, 1, 8, 8) and ds.image_shape == (1, 8, 8) and ds.event_shape == (1, 8, 8)
    from sklearn.datasets import load_digits as sk_load_digits

    assert np.array_equal(ds.x.reshape(1797, 64), sk_load_digits().data / 16.0)  # sklearn's order, flattened
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.x_pos.min() >= 0.0 and ds.x_pos.max() <= 1.0
    assert 0.05 < np.abs(ds.x_pos - ds.x).mean() < 0.1  # clipped N(0, 0.1^2) jitter


def test_files_round_trip(tmp_path, run_cli):
    out = tmp_path / "d.npz"
    res = run_cli("data", "generate", "gaussian", "--n", "30", "--seed", "2", "--out", out)
    assert res.exit_code == 0, res.stderr
    ds = load_dataset(str(out))
    ref = generate("gaussian", n=30, seed=2)
    assert np.array_equal(ds.x, ref.x) and np.array_equal(ds.z, ref.z) and np.array_equal(ds.meta["W"], ref.meta["W"])
    assert ds.meta["noise_std"] == 0.5
    np.save(tmp_path / "x.npy", ref.x)
    assert np.array_equal(load_file(tmp_path / "x.npy").x, ref.x)
    (tmp_path / "x.csv").write_text("a,b\n1,2\n3,4.5\n")
    assert np.array_equal(load_file(tmp_path / "x.csv").x, [[1, 2], [3, 4.5]])


def _npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("no_x", "no array named 'x'"),
    ("x_pos_shape", "x_pos has shape (5, 3)"),
    ("nan", "row 3"),
    ("inf_pos", "x_pos has NaN or Inf in row 1"),
    ("empty", "empty"),
    ("objects", "never unpickles"),
    ("corrupt", "Cannot read"),
    ("csv_text", "row 1"),
])
def test_bad_files(tmp_path, case, message):
    x = np.ones((5, 4))
    if case == "missing":
        path = tmp_path / "nope.npz"
    elif case == "no_x":
        path = _npz(tmp_path, data=x)
    elif case == "x_pos_shape":
        path = _npz(tmp_path, x=x, x_pos=np.ones((5, 3)))
    elif case == "nan":
        x[3, 2] = np.nan
        path = _npz(tmp_path, x=x)
    elif case == "inf_pos":
        xp = x.copy()
        xp[1, 0] = np.inf
        path = _npz(tmp_path, x=x, x_pos=xp)
    elif case == "empty":
        path = tmp_path / "e.npy"
        np.save(path, np.zeros((0, 4)))
    elif case == "objects":
        path = tmp_path / "o.npy"
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "corrupt":
        path = tmp_path / "c.npy"
        path.write_bytes(b"this is not numpy")
    else:
        path = tmp_path / "t.csv"
        path.write_text("1,2\nfoo,3\n")
    with pytest.raises(ElbokitError, match=None) as info:
        load_file(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, message", [
    (["gaussian", "--n", "0"], "n must be a positive integer"),
    (["gaussian", "--noise-std", "-1"], "noise_std"),
    (["uniform"], "Unknown generator 'uniform'"),
    (["mixture", "--out-suffix"], None),
])
def test_data_generate_bad_input(tmp_path, run_cli, args, message):
    if message is None:  # an existing file is not overwritten without --force
        out = tmp_path / "d.npz"
        out.write_bytes(b"keep")
        res = run_cli("data", "generate", "mixture", "--n", "10", "--out", out)
        assert res.exit_code == 2 and "already exists" in res.stderr and out.read_bytes() == b"keep"
        return
    res = run_cli("data", "generate", *args, "--out", tmp_path / "d.npz")
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d.npz").exists()
