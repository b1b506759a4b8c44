"""Standardisation per feature, per channel or none, and data larger than memory: a `.npy`
file above `data.max_in_memory_mb` is memory-mapped and read a minibatch at a time, with every
pass over the whole dataset done in chunks (docs/data.md)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import distributions as D

from elbokit.data import RowView, Standardizer, StreamedRows, chunked_moments


def _memmap(tmp_path, x, name="x.npy"):
    path = tmp_path / name
    np.save(path, x)
    return path, RowView(np.load(path, mmap_mode="r"))


# -- standardisation ----------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(0,), (0, 2, 3)])
def test_chunked_moments_equal_numpy_on_the_whole_array(axes):
    rng = np.random.default_rng(0)
    # A large offset: the textbook sum of squares would lose the variance to cancellation.
    x = 1e6 + rng.normal(size=(1003, 3, 4, 5)) * rng.uniform(0.1, 3, size=(3, 4, 5))
    mean, var = chunked_moments(x, axes, rows=97)
    np.testing.assert_allclose(mean, x.mean(axis=axes, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(var, x.var(axis=axes, keepdims=True), rtol=1e-9)


def test_feature_standardisation_keeps_the_numbers_of_before():
    x = np.random.default_rng(1).normal(3, 2, size=(500, 7))
    st = Standardizer.fit(x)
    assert np.array_equal(st.mean, x.mean(axis=0)) and np.array_equal(st.std, x.std(axis=0))


@pytest.mark.parametrize("mode", ["feature", "channel", "none"])
def test_a_memory_mapped_fit_equals_the_in_memory_one(tmp_path, mode):
    x = np.random.default_rng(2).normal(5, 3, size=(800, 3, 4, 4)).astype(np.float32)
    _, view = _memmap(tmp_path, x)
    a, b = Standardizer.fit(view.take(np.arange(0, 800, 2)), mode=mode), Standardizer.fit(x[::2].astype(np.float64), mode=mode)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.std, b.std, rtol=1e-12)


def test_channel_standardisation_has_one_mean_and_std_per_channel():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 3, 5, 5)) * np.array([1.0, 4.0, 0.5])[:, None, None] + np.array([0.0, 10.0, -3.0])[:, None, None]
    st = Standardizer.fit(x, mode="channel")
    for c in range(3):
        assert np.allclose(st.mean[c], x[:, c].mean()) and np.allclose(st.std[c], x[:, c].std())
    y = st.transform(x)
    assert np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12) and np.allclose(y.std(axis=(0, 2, 3)), 1)


@pytest.mark.parametrize("mode", ["feature", "channel", "none"])
def test_the_log_det_is_the_brute_force_jacobian(mode):
    x = np.random.default_rng(4).gamma(2.0, size=(300, 2, 3, 3))
    st = Standardizer.fit(x, mode=mode)
    mean, std = torch.as_tensor(st.mean), torch.as_tensor(st.std)
    jac = torch.autograd.functional.jacobian(lambda v: ((v.reshape(2, 3, 3) - mean) / std).reshape(-1),
                                             torch.zeros(18, dtype=torch.float64))
    assert st.log_abs_det_jacobian == pytest.approx(float(torch.linalg.slogdet(jac.reshape(18, 18)).logabsdet), abs=1e-12)


def test_channel_standardisation_needs_image_shaped_data():
    from elbokit.errors import ElbokitError

    with pytest.raises(ElbokitError, match="channel.*needs image-shaped"):
        Standardizer.fit(np.zeros((10, 4)), mode="channel")


def test_true_and_false_are_read_as_feature_and_none():
    from elbokit import config

    for value, mode in [(True, "feature"), (False, "none"), ("channel", "channel")]:
        assert config.resolve({"data": {"standardize": value}})["data"]["standardize"] == mode
    with pytest.raises(Exception, match='data.standardize must be "feature", "channel", "none" or "auto"'):
        config.resolve({"data": {"standardize": "pixel"}})


class LinearGaussian(torch.nn.Module):
    """x = W z + mu + N(0, s^2 I) with z ~ N(0, I) and orthogonal columns of W: the exact
    posterior is a diagonal Gaussian, so with q(z|x) = p(z|x) every importance weight is
    p(x) and the IWAE equals log p(x) exactly. Works in the standardised space of `st`."""

    def __init__(self, W, mu, s, st, shape):
        super().__init__()
        self.W, self.mu, self.s, self.st, self.shape = W, mu, s, st, shape
        self.m = torch.as_tensor(st.mean).reshape(-1)
        self.sd = torch.as_tensor(st.std).reshape(-1)
        prec = 1 + (W * W).sum(0) / s**2  # diagonal: W^T W is
        self.post_var = 1 / prec

    def encode(self, x):
        x = x.double().reshape(len(x), -1) * self.sd + self.m
        loc = ((x - self.mu) @ self.W / self.s**2) * self.post_var
        return D.Independent(D.Normal(loc.float(), self.post_var.sqrt().float().expand_as(loc)), 1)

    def decode(self, z):
        return (((z.double() @ self.W.T + self.mu) - self.m) / self.sd).reshape(len(z), *self.shape).float()


class ScaledGaussianLikelihood(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale.float()

    def log_prob(self, x, mean):
        return D.Normal(mean, self.scale).log_prob(x).flatten(1).sum(-1)

    def mean(self, params):
        return params


@pytest.mark.parametrize("mode", ["feature", "channel", "none"])
def test_evaluate_gives_the_same_log_likelihood_in_data_units_whatever_the_standardisation(mode):
    from elbokit import make_prior
    from elbokit.evaluate import evaluate_model

    shape, latent, s = (2, 3, 3), 2, 0.7
    rng = np.random.default_rng(5)
    W = torch.as_tensor(np.linalg.qr(rng.normal(size=(18, latent)))[0] * [3.0, 1.5])
    mu = torch.as_tensor(rng.normal(size=18) * 5)
    z = rng.normal(size=(400, latent))
    x = (z @ W.numpy().T + mu.numpy() + s * rng.normal(size=(400, 18))).reshape(400, *shape)
    st = Standardizer.fit(x, mode=mode)
    model = LinearGaussian(W, mu, s, st, shape)
    lik = ScaledGaussianLikelihood(s / torch.as_tensor(st.std).reshape(shape))
    report = evaluate_model(model, make_prior("standard-normal", dim=latent), lik, st.transform(x),
                            standardizer=st, iw_samples=4, seed=0)
    exact = D.MultivariateNormal(mu, W @ W.T + s**2 * torch.eye(18)).log_prob(torch.as_tensor(x.reshape(400, -1))).mean()
    assert report["iwae"] == pytest.approx(float(exact), abs=1e-3)
    # The ELBO is log p(x) in expectation (q is the posterior): within its Monte-Carlo error.
    assert abs(report["elbo"] - float(exact)) < 4 * report["elbo_se"] + 1e-3


# -- reading rows from a memory-mapped file ---------------------------------------------
def test_a_row_view_reads_the_rows_asked_for_in_their_order(tmp_path):
    x = np.arange(60 * 6, dtype=np.float32).reshape(60, 6)
    _, view = _memmap(tmp_path, x)
    idx = np.array([7, 3, 3, 59, 0, 12])
    assert view[idx].dtype == np.float64 and np.array_equal(view[idx], x[idx])
    assert np.array_equal(view[torch.as_tensor(idx)], x[idx])
    assert np.array_equal(view[5:9], x[5:9]) and np.array_equal(view[-1], x[-1])
    sub = view.take(np.array([2, 4, 8, 16, 32]))
    assert sub.shape == (5, 6) and np.array_equal(sub[[4, 0]], x[[32, 2]]) and np.array_equal(sub[1:3], x[[4, 8]])
    assert np.array_equal(np.asarray(sub), x[[2, 4, 8, 16, 32]])


def test_streamed_rows_equal_the_in_memory_tensor_bit_for_bit(tmp_path):
    x = np.random.default_rng(6).normal(2, 3, size=(100, 3, 4, 4)).astype(np.float32)
    _, view = _memmap(tmp_path, x)
    st = Standardizer.fit(x.astype(np.float64), mode="channel")
    rows = np.arange(10, 90, 3)
    streamed = StreamedRows(view.take(rows), st, "cpu")
    in_memory = torch.as_tensor(st.transform(x[rows].astype(np.float64)), dtype=torch.float32)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    assert streamed.shape == in_memory.shape and torch.equal(streamed[perm[:9]], in_memory[perm[:9]])
    assert torch.equal(streamed[:], in_memory)


def test_a_bad_value_in_a_memory_mapped_file_is_named_by_its_row(tmp_path, run_cli):
    x = np.zeros((5000, 300), dtype=np.float32)
    x[4321, 7] = np.nan
    path = tmp_path / "bad.npy"
    np.save(path, x)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndataset = "{path}"\nmax_in_memory_mb = 0\n')
    res = run_cli("train", "--config", cfg, "--out", tmp_path / "run", "-q")
    assert res.exit_code == 2 and res.stderr.strip() == f"Error: {path}: x has NaN or Inf in row 4321 (0-based); remove or fix that row."
    assert not (tmp_path / "run").exists()


# -- training on a memory-mapped file --------------------------------------------------
ARGS = ["--hidden", "16", "--batch-size", "64", "--max-epochs", "3", "--patience", "50", "--latent-dim", "3",
        "-q", "--checkpoint-seconds", "0"]


def _config(tmp_path, data, mb, standardize="none", name="c.toml"):
    path = tmp_path / name
    path.write_text(f'[data]\ndataset = "{data}"\nmax_in_memory_mb = {mb}\nstandardize = "{standardize}"\n')
    return path


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(400, 3)) @ rng.normal(size=(3, 12)) + 0.3 * rng.normal(size=(400, 12)) + 4).astype(np.float32)
    path = root / "x.npy"
    np.save(path, x)
    return path


@pytest.fixture(scope="module")
def in_memory_run(small_file, tmp_path_factory):
    from elbokit.cli import main

    root = tmp_path_factory.mktemp("mem")
    out = root / "run"
    assert main(["train", "--config", str(_config(root, small_file, 512)), *ARGS, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("mb, streamed", [(0, True), (512, False), (0.019, True), (0.02, False)])
def test_files_above_max_in_memory_mb_are_memory_mapped(small_file, tmp_path, mb, streamed):
    from elbokit import config
    from elbokit.build import build_components

    assert small_file.stat().st_size == 400 * 12 * 4 + 128  # float32 rows and the .npy header
    c = build_components(config.resolve(config.load_toml(_config(tmp_path, small_file, mb))))
    assert c.dataset.streamed is streamed
    assert all(split.streamed is streamed for split in c.splits.values())


def test_training_on_a_memory_mapped_file_gives_the_numbers_of_training_in_memory(small_file, in_memory_run, tmp_path, run_cli):
    out = tmp_path / "run"
    res = run_cli("train", "--config", _config(tmp_path, small_file, 0), *ARGS, "--out", out)
    assert res.exit_code == 0, res.stderr
    assert _metrics(out) == _metrics(in_memory_run)
    a, b = (json.loads((d / "summary.json").read_text())["test"] for d in (out, in_memory_run))
    for key in ("elbo", "iwae", "mi", "aggregate_entropy", "kl"):
        assert a[key] == b[key], key


def test_interrupt_and_resume_on_a_memory_mapped_file_equals_the_uninterrupted_run(
        small_file, in_memory_run, tmp_path, run_cli, monkeypatch):
    from elbokit import io
    from elbokit.run import read_checkpoint

    out = tmp_path / "run"
    monkeypatch.setattr(io, "_crash_counts", {})
    monkeypatch.setenv(io.CRASH_ENV, f"step:train:{320 // 64 + 2}:INT")  # step 2 of epoch 2
    res = run_cli("train", "--config", _config(tmp_path, small_file, 0), *ARGS, "--out", out)
    assert res.exit_code == 130, res.stderr
    _, meta = read_checkpoint(out / "checkpoints" / "last.safetensors")
    assert meta["partial_epoch"]["steps_done"] == 2
    monkeypatch.delenv(io.CRASH_ENV)
    res = run_cli("train", "--resume", out, "-q")
    assert res.exit_code == 0, res.stderr
    assert _metrics(out) == _metrics(in_memory_run)


def test_a_data_file_is_rehashed_only_when_its_size_or_mtime_changed(small_file, tmp_path, run_cli, monkeypatch):
    import shutil

    from elbokit import run as run_mod
    from elbokit.run import load_run

    data = tmp_path / "x.npy"
    shutil.copy(small_file, data)
    out = tmp_path / "run"
    assert run_cli("train", "--config", _config(tmp_path, data, 0), *ARGS, "--max-epochs", "1", "--no-evaluate",
                   "--out", out).exit_code == 0
    info = load_run(out).data_info
    st = os.stat(data)
    assert (info["size"], info["mtime_ns"]) == (st.st_size, st.st_mtime_ns) and info["sha256"] == run_mod.sha256_file(data)

    calls = []
    real = run_mod.sha256_file
    monkeypatch.setattr(run_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    load_run(out).load_split("test")
    assert calls == []  # size and mtime unchanged: not read again
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    load_run(out).load_split("test")
    assert len(calls) == 1
    x = np.load(data)
    x[0, 0] += 1
    np.save(data, x)  # same size, new bytes, new mtime
    res = run_cli("evaluate", out, "--iw-samples", "2")
    assert res.exit_code == 2 and "has changed since the run was started (sha256 differs)" in res.stderr


# -- the aggregate posterior above a size --------------------------------------------------
def test_the_subsampled_aggregate_posterior_agrees_with_the_exact_mixture():
    from elbokit import make_prior
    from elbokit.evaluate import aggregate_posterior_terms

    gen = torch.Generator().manual_seed(0)
    n, latent = 3000, 2
    loc = torch.randn(n, latent, generator=gen, dtype=torch.float64) * 2
    scale = 0.2 + torch.rand(n, latent, generator=gen, dtype=torch.float64)
    prior = make_prior("standard-normal", dim=latent)
    exact = aggregate_posterior_terms(loc, scale, prior, seed=1)
    sub = aggregate_posterior_terms(loc, scale, prior, seed=2, exact_max=1000, points=2000, components=500)
    assert exact["estimator"]["kind"] == "exact" and sub["estimator"] == {**sub["estimator"], "kind": "subsampled",
                                                                          "points": 2000, "components": 500}
    assert sub["points"].shape == (2000,) and len(set(sub["points"].tolist())) == 2000
    for key in ("mi", "entropy", "cross_entropy"):
        e, s = exact[key], sub[key]
        se = math.sqrt(float(e.var()) / len(e) + float(s.var()) / len(s))
        assert abs(float(e.mean()) - float(s.mean())) < 4 * se, key
    assert float(sub["mi"].max()) <= math.log(n) + 1e-9  # the own component keeps mi <= log N


def test_evaluate_reports_which_aggregate_estimator_ran(monkeypatch):
    from elbokit import evaluate, make_prior
    from elbokit.likelihoods import make_likelihood

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = torch.nn.Linear(4, 4), torch.nn.Linear(2, 4)

        def encode(self, x):
            h = self.enc(x)
            return D.Independent(D.Normal(h[:, :2], h[:, 2:].exp()), 1)

        def decode(self, z):
            return self.dec(z)

    torch.manual_seed(0)
    model, prior, x = Model(), make_prior("standard-normal", dim=2), torch.randn(120, 4)
    exact = evaluate.evaluate_model(model, prior, make_likelihood("mse"), x, iw_samples=3)
    assert exact["aggregate_estimator"] == {"kind": "exact", "points": 120, "samples_per_point": 84, "components": 120}
    monkeypatch.setattr(evaluate, "SURGERY_EXACT_MAX", 100)
    monkeypatch.setattr(evaluate, "SURGERY_DRAWS", 80)
    r = evaluate.evaluate_model(model, prior, make_likelihood("mse"), x, iw_samples=3)
    assert r["aggregate_estimator"]["kind"] == "subsampled" and r["aggregate_estimator"]["points"] == 80
    assert r["mi"] <= r["mi_max"] == math.log(120)
    # kl - kl_mc on the 80 subsampled points: zero in expectation.
    assert abs(r["identity_gap"]) < 4 * r["identity_gap_se"]


# -- a file larger than the memory it is given -------------------------------------------
def test_a_big_memory_mapped_file_trains_and_evaluates_in_memory_far_below_its_size(tmp_path):
    """A 250 MB float64 file trains 1 epoch and evaluates with anonymous resident memory
    (RssAnon: the process's own heap, not the page cache that maps the file) growing by far
    less than the file beyond what a tiny file costs in the same process (imports, threads).
    Read in memory, the file would add at least 2.5 times its size (float64 + float32 splits)."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/status").is_file():
        pytest.skip("RssAnon is read from /proc/self/status (Linux)")
    rows, width = 15000, 2048
    big = tmp_path / "big.npy"
    mm = np.lib.format.open_memmap(big, mode="w+", dtype=np.float64, shape=(rows, width))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 1000):  # written in chunks: the test itself never holds the file
        mm[start:start + 1000] = rng.standard_normal((min(1000, rows - start), width))
    mm.flush()
    del mm
    size = big.stat().st_size
    assert size > 245e6
    np.save(tmp_path / "tiny.npy", rng.standard_normal((200, width)))
    for name in ("tiny", "big"):
        (tmp_path / f"{name}.toml").write_text(f'[data]\ndataset = "{tmp_path / name}.npy"\nmax_in_memory_mb = 0\n')
    env = {**os.environ, "ELBOKIT_DISABLE_PLUGINS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_rss_train.py")), str(tmp_path / "tiny.toml"),
                           str(tmp_path / "big.toml"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["codes"] == [0, 0, 0, 0]
    # What the big file adds is the working set of a few minibatch- and chunk-sized arrays
    # (about 40 MB here, whatever the file's size); the tiny run's peak is the fixed cost.
    # (The fixed cost, about 250 MB of torch and its first calls, is not the data's.)
    assert out["big_peak"] - out["tiny_peak"] < size / 4, out
    summary = json.loads((tmp_path / "big-run" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["n_train"] == 12000
