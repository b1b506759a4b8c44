"""Positives by augmentation (`--positives`, elbokit/data/positives.py): each augmentation does
what its documentation says (the gaussian's std in data units by Monte Carlo, a shift moves a
hand-made image as stated, flip is an involution), draws are a function of (seed, step) alone,
so that an interrupted and resumed run equals an uninterrupted one, and `ed` trains on digits
with shifted positives; a bad spec is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from elbokit.data import Standardizer
from elbokit.data import positives as P
from elbokit.errors import ElbokitError


# -- the spec ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, canonical", [
    ("gaussian:0.1", "gaussian:0.1"), ("shift:1", "shift:1"), ("shift:2:zero", "shift:2"),
    ("shift:2:edge", "shift:2:edge"), ("flip", "flip"), ("flip:0.5", "flip"), ("flip:1", "flip:1"),
    ("shift:1 + flip", "shift:1+flip"), ("shift:1+flip+gaussian:0.05", "shift:1+flip+gaussian:0.05")])
def test_specs_are_read_and_recorded_in_canonical_form(spec, canonical):
    assert P.normalize(spec) == canonical
    assert P.normalize(canonical) == canonical


@pytest.mark.parametrize("spec, words", [
    ("", "empty"), ("blur:1", "unknown augmentation 'blur'"), ("gaussian", "one number"),
    ("gaussian:0", "positive"), ("gaussian:-1", "positive"), ("gaussian:abc", "number"), ("gaussian:nan", "finite"),
    ("shift:0", "at least 1"), ("shift:1.5", "whole number"), ("shift:1:wrap", "zero or edge"),
    ("flip:0", "(0, 1]"), ("flip:1.5", "(0, 1]"), ("shift:1+", "unknown augmentation")])
def test_bad_specs_are_one_sentence(spec, words):
    with pytest.raises(ElbokitError) as info:
        P.parse(spec)
    message = str(info.value)
    assert words in message and "\n" not in message and message.startswith("data.positives (--positives)")


def test_image_augmentations_are_refused_for_vectors_and_for_shifts_as_large_as_the_image():
    with pytest.raises(ElbokitError, match="needs image-shaped data"):
        P.PositiveSampler("flip", (20,))
    with pytest.raises(ElbokitError, match="out of the frame"):
        P.PositiveSampler("shift:8", (1, 8, 8))
    P.PositiveSampler("shift:7+flip", (1, 8, 8))
    P.PositiveSampler("shift:1", (8, 8))  # (N, H, W) is an image too
    P.PositiveSampler("gaussian:0.1", (20,))


# -- what each augmentation does ----------------------------------------------------------------
def test_gaussian_positives_have_the_stated_std_in_data_units():
    """Standardised data: the model sees noise of std RADIUS / std_d in feature d, and mapped
    back to the original units it has std RADIUS and mean 0 (Monte Carlo, 4 standard errors)."""
    rng = np.random.default_rng(0)
    std = np.array([0.5, 2.0, 10.0])
    raw = rng.normal(3.0, std, size=(4000, 3))
    standardizer = Standardizer.fit(raw)
    x = torch.as_tensor(standardizer.transform(raw), dtype=torch.float32)
    radius = 0.3
    sampler = P.PositiveSampler(f"gaussian:{radius}", (3,), standardizer, seed=5)
    noise_model = torch.cat([sampler.draw(x, step) - x for step in range(5)]).double().numpy()
    n = noise_model.shape[0]
    # The standard error of a sample std of n normal values is about std / sqrt(2 n).
    stated = radius / standardizer.std
    assert np.all(np.abs(noise_model.std(axis=0) - stated) < 4 * stated / np.sqrt(2 * n))
    noise_data = noise_model * standardizer.std
    assert np.all(np.abs(noise_data.std(axis=0) - radius) < 4 * radius / np.sqrt(2 * n))
    assert np.all(np.abs(noise_data.mean(axis=0)) < 4 * radius / np.sqrt(n))


def test_a_shift_moves_a_hand_made_image_as_stated():
    image = torch.tensor([[1., 2., 3., 4.],
                          [5., 6., 7., 8.],
                          [9., 10., 11., 12.]]).reshape(1, 1, 3, 4)
    # one row down, one column left; the uncovered top row and right column are 0
    down_left = P.shift_images(image, torch.tensor([1]), torch.tensor([-1]), "zero")
    assert down_left.reshape(3, 4).tolist() == [[0., 0., 0., 0.],
                                                [2., 3., 4., 0.],
                                                [6., 7., 8., 0.]]
    # the same with edge padding: the uncovered pixels copy the nearest edge pixel
    edge = P.shift_images(image, torch.tensor([1]), torch.tensor([-1]), "edge")
    assert edge.reshape(3, 4).tolist() == [[2., 3., 4., 4.],
                                           [2., 3., 4., 4.],
                                           [6., 7., 8., 8.]]
    # two rows up, two columns right; per example in a batch, channels moved together
    batch = torch.stack([image[0], image[0] + 100]).expand(2, 1, 3, 4).repeat(1, 2, 1, 1)
    moved = P.shift_images(batch, torch.tensor([-2, 0]), torch.tensor([2, 0]))
    assert moved[0, 1].tolist() == [[0., 0., 9., 10.], [0., 0., 0., 0.], [0., 0., 0., 0.]]
    assert torch.equal(moved[1], batch[1])  # a zero shift is the identity


def test_random_shifts_are_uniform_over_the_stated_range_and_keep_the_pixel():
    """shift:2 on a 7x7 image with one lit pixel: every output has that one pixel, moved by
    (dy, dx) with |dy|, |dx| <= 2, and the 25 offsets are about equally frequent."""
    x = torch.zeros(5000, 1, 7, 7)
    x[:, 0, 3, 3] = 0.75
    sampler = P.PositiveSampler("shift:2", (1, 7, 7), seed=1)
    out = sampler.draw(x, step=0)
    assert torch.all((out != 0).sum(dim=(1, 2, 3)) == 1)
    assert torch.all(out.amax(dim=(1, 2, 3)) == 0.75)
    where = out[:, 0].flatten(1).argmax(1)
    dy, dx = where // 7 - 3, where % 7 - 3
    assert int(dy.abs().max()) == 2 and int(dx.abs().max()) == 2
    counts = torch.bincount((dy + 2) * 5 + (dx + 2), minlength=25).double()
    expected = 5000 / 25
    se = np.sqrt(expected * (1 - 1 / 25))
    assert torch.all((counts - expected).abs() < 4.5 * se), counts  # multinomial, 4.5 standard errors


def test_flip_is_an_involution_and_mirrors_left_right():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    flipped = P.flip_images(x)
    assert not torch.equal(flipped, x)
    assert torch.equal(P.flip_images(flipped), x)
    assert torch.equal(flipped[..., 0], x[..., 4]) and torch.equal(flipped[..., 1], x[..., 3])
    always = P.PositiveSampler("flip:1", (3, 4, 5)).draw(x, step=3)
    assert torch.equal(always, flipped)


def test_flip_probability():
    x = torch.zeros(4000, 1, 2, 2)
    x[:, 0, :, 0] = 1.0
    out = P.PositiveSampler("flip:0.3", (1, 2, 2), seed=2).draw(x, step=0)
    share = float((out[:, 0, 0, 1] == 1).double().mean())
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 4000)


def test_shift_pads_with_zero_in_original_units_when_the_data_are_standardised():
    rng = np.random.default_rng(3)
    raw = rng.uniform(0.2, 1.0, size=(200, 1, 4, 4))
    standardizer = Standardizer.fit(raw)
    x = torch.as_tensor(standardizer.transform(raw), dtype=torch.float32)
    out = P.PositiveSampler("shift:1", (1, 4, 4), standardizer, seed=0).draw(x, step=7)
    back = standardizer.inverse(out.double().numpy())
    # every row's own pixels survive or are 0: no value other than the data's and 0 appears
    values = np.round(back, 4)
    for i in range(20):
        allowed = set(np.round(raw[i], 4).ravel()) | {0.0}
        assert set(values[i].ravel()) <= allowed
    assert (np.abs(back) < 1e-5).any(axis=(1, 2, 3)).mean() > 0.5  # most rows moved, leaving a 0 border


# -- streams: a function of (seed, step) alone ----------------------------------------------
def test_draws_depend_on_seed_and_step_only():
    x = torch.rand(16, 1, 6, 6)
    a = P.PositiveSampler("shift:1+flip+gaussian:0.1", (1, 6, 6), seed=4)
    b = P.PositiveSampler("shift:1+flip+gaussian:0.1", (1, 6, 6), seed=4)
    assert torch.equal(a.draw(x, 10), b.draw(x, 10))
    b.draw(x, 11)  # drawing another step first changes nothing
    assert torch.equal(a.draw(x, 10), b.draw(x, 10))
    assert not torch.equal(a.draw(x, 10), a.draw(x, 11))
    assert not torch.equal(a.draw(x, 10), P.PositiveSampler("shift:1+flip+gaussian:0.1", (1, 6, 6), seed=5).draw(x, 10))
    assert torch.equal(a.fixed(x, "val", 0), b.fixed(x, "val", 0))
    assert not torch.equal(a.fixed(x, "val", 0), a.fixed(x, "test", 0))


# -- through build, train, resume and the CLI -------------------------------------------------
def _image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npy"
    np.save(path, np.round(rng.random((300, 1, 6, 6)) * 4) / 4)
    return path


def test_positives_override_the_datasets_own_and_validation_is_fixed(fresh_registry):
    from elbokit import build, config

    def components(positives):
        cfg = config.resolve(overrides={"data": {"dataset": "gaussian", "n": 600, "positives": positives},
                                        "objective": {"terms": "ed"}, "train": {"threads": 1}})
        return build.build_components(cfg)

    own, drawn, again = components(None), components("gaussian:0.1"), components("gaussian:0.1")
    assert own.positives is None and drawn.positives is not None
    assert torch.equal(own.splits["val"].x, drawn.splits["val"].x)
    assert not torch.equal(own.splits["val"].x_pos, drawn.splits["val"].x_pos)
    assert torch.equal(drawn.splits["val"].x_pos, again.splits["val"].x_pos)  # deterministic validation
    # The same radius as the dataset's own positives: the same noise std in original units.
    std = drawn.standardizer.std
    for comp in (own, drawn):
        noise = ((comp.splits["train"].x_pos - comp.splits["train"].x).double().numpy() * std).ravel()
        assert abs(noise.std() - 0.1) < 4 * 0.1 / np.sqrt(2 * noise.size)


def test_interrupted_and_resumed_equals_uninterrupted(run_cli, fresh_registry, tmp_path, monkeypatch):
    from elbokit import io
    from test_interrupt import assert_same_run

    data = _image_file(tmp_path)
    args = ["train", "--data", data, "--terms", "ed", "--positives", "shift:1+flip+gaussian:0.05",
            "--model-option", "channels=4", "--model-option", "hidden=16", "--batch-size", "60",
            "--max-epochs", "3", "--patience", "50", "--no-evaluate", "-q", "--checkpoint-seconds", "0"]
    reference = tmp_path / "reference"
    assert run_cli(*args, "--out", reference).exit_code == 0
    out = tmp_path / "run"
    monkeypatch.setattr(io, "_crash_counts", {})
    monkeypatch.setenv(io.CRASH_ENV, "step:train:6:INT")  # step 2 of epoch 2 (4 steps per epoch)
    assert run_cli(*args, "--out", out).exit_code == 130
    monkeypatch.delenv(io.CRASH_ENV)
    res = run_cli("train", "--resume", out, "-q")
    assert res.exit_code == 0, res.stderr
    assert_same_run(out, reference)
    # and the positives matter: another augmentation gives other numbers
    other = tmp_path / "other"
    args[args.index("--positives") + 1] = "shift:1"
    assert run_cli(*args, "--out", other).exit_code == 0
    assert (other / "metrics.jsonl").read_text() != (reference / "metrics.jsonl").read_text()


def test_ed_trains_on_digits_with_shifted_positives(run_cli, fresh_registry, tmp_path):
    from elbokit.evaluate import evaluate_run
    from elbokit.run import load_run

    out = tmp_path / "run"
    res = run_cli("train", "--data", "digits", "--terms", "ed", "--positives", "shift:1", "--hidden", "32",
                  "--max-epochs", "3", "--threads", "1", "--no-evaluate", "--out", out, "-q", "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["positives"]["source"] == "augmentation" and summary["positives"]["spec"] == "shift:1"
    assert summary["positives"]["used"] is True
    assert 'positives = "shift:1"' in (out / "config.toml").read_text()
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]  # it learns
    report = evaluate_run(load_run(out), iw_samples=50)
    assert report["elbo"] <= report["iwae"] and report["elbo"] < 0
    # a resumed run keeps its positives and cannot change them
    res = run_cli("train", "--resume", out, "--positives", "flip", "-q")
    assert res.exit_code == 2 and "data.positives cannot change when resuming" in res.stderr


def test_summary_says_when_the_datasets_own_positives_are_used(run_cli, fresh_registry, tmp_path):
    res = run_cli("train", "--n", "300", "--hidden", "16", "--terms", "ed", "--max-epochs", "1", "--no-evaluate",
                  "--out", tmp_path / "run", "-q", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["positives"] == {"source": "dataset", "radius": 0.1, "used": True}
    assert "# positives =  (unset)" in (tmp_path / "run" / "config.toml").read_text()


@pytest.mark.parametrize("spec, words", [("shift:1", "needs image-shaped data"), ("twirl", "unknown augmentation")])
def test_a_bad_spec_on_the_command_line_is_one_line_exit_2_nothing_written(run_cli, fresh_registry, tmp_path, spec, words):
    out = tmp_path / "run"
    res = run_cli("train", "--data", "gaussian", "--n", "300", "--terms", "ed", "--positives", spec, "--out", out)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_positives_in_a_config_file_and_in_benchmark_grid_overrides(fresh_registry, tmp_path):
    from elbokit import config
    from elbokit.cli.train import config_overrides

    assert config_overrides(positives="shift:1+flip:0.5") == {"data": {"positives": "shift:1+flip:0.5"}}
    path = tmp_path / "c.toml"
    path.write_text('[data]\ndataset = "digits"\npositives = "flip:0.5+shift:2:zero"\n')
    cfg = config.resolve(config.load_toml(path))
    assert cfg["data"]["positives"] == "flip+shift:2"
    assert config.resolve(config.load_toml(path))["data"] == config.resolve(
        {"data": config.resolve(config.load_toml(path))["data"]})["data"]
    with pytest.raises(ElbokitError, match="data.positives"):
        config.resolve({"data": {"positives": 3}})


def test_training_draws_fresh_positives_for_every_step(run_cli, fresh_registry, tmp_path, monkeypatch):
    """Each step's positives come from `draw(batch, step)` with the run's global step, once per step."""
    steps = []
    original = P.PositiveSampler.draw

    def recording(self, x, step):
        steps.append(step)
        return original(self, x, step)

    monkeypatch.setattr(P.PositiveSampler, "draw", recording)
    res = run_cli("train", "--data", _image_file(tmp_path), "--terms", "ed", "--positives", "flip",
                  "--model-option", "channels=4", "--model-option", "hidden=16", "--batch-size", "60",
                  "--max-epochs", "2", "--no-evaluate", "-q", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.stderr
    assert steps == list(range(8))  # 240 training rows / 60: 4 steps per epoch, 2 epochs


def test_two_processes_draw_the_positives_of_the_global_batch(tmp_path):
    """Under torchrun each process draws the global batch's positives and keeps its rows (the
    same slicing as the batch's rows): the run trains on 2 processes and records its positives."""
    from test_distributed_train import torchrun

    config = tmp_path / "config.toml"
    config.write_text('[data]\nn = 300\npositives = "gaussian:0.2"\n[model]\nhidden = [16]\n[objective]\n'
                      'terms = "ed"\n[train]\nbatch_size = 60\nmax_epochs = 2\nevaluate = false\n')
    done = torchrun("-m", "elbokit", "train", "--config", str(config), "--out", str(tmp_path / "run"), "--json", "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["positives"]["spec"] == "gaussian:0.2"


def test_a_streamed_file_trains_with_the_same_positives_as_in_memory(run_cli, fresh_registry, tmp_path):
    """A memory-mapped .npy (data.max_in_memory_mb = 0) reads each minibatch from disk; its
    training positives are the same draws as in memory, so the training losses and the
    validation -ELBO agree bit for bit (the validation positives of a streamed split are drawn
    per chunk, so only the objective's own validation loss may differ)."""
    data = _image_file(tmp_path)

    def run(name, streamed):
        config = tmp_path / f"{name}.toml"
        config.write_text(f"[data]\nmax_in_memory_mb = {0 if streamed else 512}\n")
        res = run_cli("train", "--config", config, "--data", data, "--terms", "ed", "--positives", "shift:1+gaussian:0.1",
                      "--model-option", "channels=4", "--model-option", "hidden=16", "--batch-size", "60",
                      "--max-epochs", "2", "--no-evaluate", "-q", "--out", tmp_path / name)
        assert res.exit_code == 0, res.stderr
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    from elbokit import build, config

    cfg = config.resolve({"data": {"dataset": str(data), "max_in_memory_mb": 0, "positives": "shift:1"},
                          "objective": {"terms": "ed"}})
    val = build.build_components(cfg).splits["val"]
    assert isinstance(val.x_pos, P.DrawnPositives) and not isinstance(val.x, torch.Tensor)  # really streamed
    assert torch.equal(val.x_pos[:5], val.x_pos[:5]) and not torch.equal(val.x_pos[:5], val.x[:5])
    memory, streamed = run("memory", False), run("streamed", True)
    keys = [k for k in memory[0] if k.startswith("train_") or k == "val_neg_elbo"]
    assert len(keys) > 3
    assert [[r[k] for k in keys] for r in memory] == [[r[k] for k in keys] for r in streamed]
