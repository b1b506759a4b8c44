"""`elbokit sample` and `elbokit encode`: shapes and units round-trip, bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

OFFSET, SCALE = 1000.0, 3.0


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    """A run trained on data far from standardised units: x = 1000 + 3 * (gaussian data)."""
    from elbokit.cli import main
    from elbokit.data.synthetic import generate

    root = tmp_path_factory.mktemp("use")
    ds = generate("gaussian", n=800, data_dim=6, latent_dim=2, noise_std=0.5, radius=0.1, seed=0)
    x = OFFSET + SCALE * ds.x
    np.save(root / "x.npy", x)
    out = root / "run"
    code = main(["train", "--data", str(root / "x.npy"), "--latent-dim", "2", "--hidden", "32", "--max-epochs", "15",
                 "--batch-size", "64", "--out", str(out), "--quiet", "--no-evaluate"])
    assert code == 0
    return out, x


def test_sample_is_in_original_data_units(shifted_run, run_cli, tmp_path):
    run_dir, x = shifted_run
    res = run_cli("sample", run_dir, "--n", "3000", "--out", tmp_path / "s.npz", "--seed", "1", "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    with np.load(tmp_path / "s.npz") as f:
        xs, z = f["x"], f["z"]
    assert xs.shape == (3000, 6) and z.shape == (3000, 2) and info["arrays"] == {"x": [3000, 6], "z": [3000, 2]}
    # The samples' mean is the data's to within a fraction of its spread (in standardised
    # units it would be ~0, a thousand away); E[x|z] spreads less than x, never more.
    assert np.all(np.abs(xs.mean(0) - x.mean(0)) < 0.5 * x.std(0))
    assert np.all(xs.std(0) < 1.05 * x.std(0))
    # The decoder's mean at the written z, mapped back through the run's standardiser.
    import torch

    from elbokit.run import load_run

    run = load_run(run_dir)
    with torch.no_grad():
        expected = run.standardizer.inverse(run.likelihood.mean(run.model.decode(torch.as_tensor(z, dtype=torch.float32))).double().numpy())
    np.testing.assert_allclose(xs, expected, rtol=1e-6, atol=1e-3)
    # Deterministic in --seed; another seed gives other samples.
    run_cli("sample", run_dir, "--n", "3000", "--out", tmp_path / "again.npy", "--seed", "1")
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), xs)
    run_cli("sample", run_dir, "--n", "3000", "--out", tmp_path / "other.npy", "--seed", "2")
    assert not np.allclose(np.load(tmp_path / "other.npy"), xs)


def test_encode_standardises_like_training(shifted_run, run_cli, tmp_path):
    """encode takes rows in original units: the result equals the encoder applied to the
    run's own standardised split."""
    import torch

    from elbokit.run import load_run

    run_dir, x = shifted_run
    run = load_run(run_dir)
    split = run.load_split("test")
    np.save(tmp_path / "test.npy", split.data.x)
    res = run_cli("encode", run_dir, "--data", tmp_path / "test.npy", "--out", tmp_path / "z.npz", "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    with np.load(tmp_path / "z.npz") as f:
        loc, scale = f["loc"], f["scale"]
    n = len(split.data.x)
    assert loc.shape == scale.shape == (n, 2) and info["n"] == n and info["latent_dim"] == 2
    with torch.no_grad():
        q = run.model.encode(split.x)
    np.testing.assert_allclose(loc, q.mean.double().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scale, q.stddev.double().numpy(), rtol=1e-5, atol=1e-6)
    assert (scale > 0).all()
    assert info["loc_mean"] == pytest.approx(loc.mean(0).tolist())


def test_sampled_data_encode_back(shifted_run, run_cli, tmp_path):
    """sample -> encode round-trips: N rows of the model's data dimension in, N codes out."""
    run_dir, _ = shifted_run
    assert run_cli("sample", run_dir, "--n", "50", "--out", tmp_path / "s.npy").exit_code == 0
    assert run_cli("encode", run_dir, "--data", tmp_path / "s.npy", "--out", tmp_path / "z.npz").exit_code == 0
    with np.load(tmp_path / "z.npz") as f:
        assert f["loc"].shape == (50, 2) and sorted(f.files) == ["loc", "scale"]


@pytest.mark.parametrize("args, message", [
    (["sample", "{run}", "--n", "0", "--out", "{tmp}/s.npy"], "--n must be a positive"),
    (["sample", "{run}", "--out", "{tmp}/s.txt"], "--out must end in .npy or .npz"),
    (["sample", "{run}", "--out", "{tmp}/exists.npy"], "already exists; give another --out or --force"),
    (["sample", "{tmp}/nosuchrun", "--out", "{tmp}/s.npy"], "Run directory not found"),
    (["encode", "{run}", "--data", "{tmp}/wrong.npy", "--out", "{tmp}/z.npz"], "but the model takes (N, 6)"),
    (["encode", "{run}", "--data", "{tmp}/wrong.npy", "--out", "{tmp}/z.npy"], "--out must end in .npz"),
    (["encode", "{run}", "--data", "{tmp}/missing.npy", "--out", "{tmp}/z.npz"], "Data file not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(shifted_run, run_cli, tmp_path, args, message):
    run_dir, _ = shifted_run
    np.save(tmp_path / "wrong.npy", np.zeros((5, 3)))
    np.save(tmp_path / "exists.npy", np.zeros(1))
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    res = run_cli(*(a.replace("{run}", str(run_dir)).replace("{tmp}", str(tmp_path)) for a in args))
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.stderr
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
