"""`elbokit train` end to end on tiny data: presets and priors, determinism, resume, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

FAST = ["--n", "300", "--hidden", "16", "--batch-size", "64", "--max-epochs", "2", "--no-evaluate", "-q"]


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")  # wall-clock time is the only thing allowed to differ
    return rows


def checkpoint_tensors(run_dir, which="last"):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoints" / f"{which}.safetensors"))


@pytest.mark.parametrize("terms, prior, extra", [
    ("classic", "standard-normal", []),
    ("ed", "standard-normal", []),
    ("classic", "gmm", []),
    ("ed", "gmm", ["--prior-option", "n_components=2"]),
    ("ed", "samples", []),
])
def test_each_preset_and_prior_trains_and_writes_its_run_dir(tmp_path, run_cli, terms, prior, extra):
    out = tmp_path / "run"
    res = run_cli("train", "--terms", terms, "--prior", prior, *FAST, "--json", "--out", out, *extra)
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["run_dir"] == str(out) and summary["epochs"] == 2 and summary["steps"] == 2 * (240 // 64)
    assert summary["prior"] == prior and np.isfinite(summary["best_val"]) and summary["steps_per_second"] > 0
    for name in ("config.toml", "data.safetensors", "metrics.jsonl", "summary.json",
                 "checkpoints/best.safetensors", "checkpoints/last.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    names = {"classic": {"recon", "kl"}, "ed": {"recon", "infonce", "entropy", "xent"}}[terms]
    from elbokit.metrics import term_losses

    assert set(term_losses(rows[0])) == names
    # The selection metric is the validation -ELBO whenever the prior has a density.
    assert summary["select_metric"] == ("val_loss" if prior == "samples" else "val_neg_elbo")

    from elbokit.run import load_run

    run = load_run(out)
    assert run.prior.name == prior and not run.model.training
    assert run.state["epoch"] == summary["best_epoch"]
    test = run.load_split("test")
    assert test.x.shape == (30, 20) and test.data.z.shape == (30, 5)
    # .data is in original units, .x standardised with the train-split standardiser.
    assert np.allclose(run.standardizer.transform(test.data.x), test.x.numpy(), atol=1e-5)
    if prior == "gmm":
        saved = checkpoint_tensors(out, "best")
        assert np.allclose(saved["objective.prior.means"], run.prior.means.numpy())


def test_same_seed_same_numbers_and_another_seed_differs(tmp_path, run_cli):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        res = run_cli("train", "--terms", "ed", *FAST, "--seed", seed, "--out", tmp_path / name)
        assert res.exit_code == 0, res.stderr
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")
    a, b = checkpoint_tensors(tmp_path / "a"), checkpoint_tensors(tmp_path / "b")
    assert all(np.array_equal(a[k], b[k]) for k in a if k.startswith("model."))


def test_resume_equals_an_uninterrupted_run(tmp_path, run_cli):
    args = ["--terms", "ed", "--prior", "gmm", "--n", "300", "--hidden", "16", "--batch-size", "64",
            "--no-evaluate", "-q", "--patience", "50"]
    assert run_cli("train", *args, "--max-epochs", "4", "--out", tmp_path / "full").exit_code == 0
    assert run_cli("train", *args, "--max-epochs", "2", "--out", tmp_path / "part").exit_code == 0
    assert len(metrics(tmp_path / "part")) == 2
    res = run_cli("train", "--resume", tmp_path / "part", "--max-epochs", "4", "-q", "--json")
    assert res.exit_code == 0, res.stderr
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    full, part = checkpoint_tensors(tmp_path / "full"), checkpoint_tensors(tmp_path / "part")
    assert full.keys() == part.keys()
    assert all(np.array_equal(full[k], part[k]) for k in full)
    s_full = json.loads((tmp_path / "full" / "summary.json").read_text())
    s_part = json.loads(res.stdout)
    for key in ("epochs", "steps", "best_val", "best_epoch"):
        assert s_full[key] == s_part[key]


def test_resume_after_a_kill_between_metrics_and_checkpoint(tmp_path, run_cli):
    """A run killed after writing epoch 3's metrics but before its checkpoint re-runs epoch 3."""
    args = ["--terms", "classic", *FAST[:-4], "--no-evaluate", "-q"]
    assert run_cli("train", *args, "--max-epochs", "3", "--out", tmp_path / "full").exit_code == 0
    assert run_cli("train", *args, "--max-epochs", "2", "--out", tmp_path / "part").exit_code == 0
    with open(tmp_path / "part" / "metrics.jsonl", "a") as fh:  # a stale epoch-3 line
        fh.write(json.dumps({"epoch": 3, "stale": True}) + "\n")
    assert run_cli("train", "--resume", tmp_path / "part", "--max-epochs", "3", "-q").exit_code == 0
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")


def test_print_config_and_config_file_precedence(tmp_path, run_cli):
    import tomllib

    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nlr = 0.01\nbatch_size = 32\n[terms.infonce]\ncritic = "cosine"\n[objective]\nterms = "ed"\n')
    res = run_cli("train", "--config", cfg, "--batch-size", "16", "-o", "infonce.temperature=0.5", "--print-config")
    assert res.exit_code == 0, res.stderr
    printed = tomllib.loads(res.stdout)
    assert printed["train"]["lr"] == 0.01 and printed["train"]["batch_size"] == 16
    assert printed["terms"]["infonce"] == {"critic": "cosine", "temperature": 0.5}
    assert printed["data"]["n"] == 10000 and printed["data"]["dataset"] == "mixture"


def test_library_api_and_weights(tmp_path):
    from elbokit import config
    from elbokit.train import train

    cfg = config.resolve(overrides={
        "objective": {"terms": "recon,kl:0.5"}, "data": {"n": 200}, "model": {"hidden": [8]},
        "train": {"max_epochs": 1, "batch_size": 50, "evaluate": False}, "output": {"out": str(tmp_path / "r")}})
    summary = train(cfg)
    assert summary["epochs"] == 1 and summary["steps"] == 3
    from elbokit.run import load_run

    assert load_run(tmp_path / "r", "last").objective.weights == {"recon": 1.0, "kl": 0.5}


def test_digits_with_bernoulli_is_not_standardised(tmp_path, run_cli):
    res = run_cli("train", "--data", "digits", "-o", "recon.likelihood=bernoulli", "--hidden", "16",
                  "--max-epochs", "1", "--no-evaluate", "-q", "--out", tmp_path / "d")
    assert res.exit_code == 0, res.stderr
    from elbokit.run import load_run

    run = load_run(tmp_path / "d")
    assert run.config["data"]["standardize"] == "none" and np.all(run.standardizer.std == 1)
    assert run.likelihood.name == "bernoulli" and run.data_info["image_shape"] == [1, 8, 8]
    res = run_cli("plot", tmp_path / "d", "--json")
    assert res.exit_code == 0, res.stderr
    plots = json.loads(res.stdout)["plots"]
    assert [p.rsplit("/", 1)[1] for p in plots] == ["loss.png", "terms.png", "latents.png", "reconstructions.png"]
    for p in plots:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_of_non_image_data_and_of_a_non_run(tmp_path, run_cli):
    assert run_cli("train", *FAST, "--out", tmp_path / "r").exit_code == 0
    res = run_cli("plot", tmp_path / "r", "--json")
    assert res.exit_code == 0, res.stderr
    assert [p.rsplit("/", 1)[1] for p in json.loads(res.stdout)["plots"]] == ["loss.png", "terms.png", "latents.png"]
    res = run_cli("plot", tmp_path)
    assert res.exit_code == 2 and "not an elbokit run directory" in res.stderr


# -- bad input: one line, exit code 2, no run directory ----------------------------------
# The table of bad inputs for every command (train's included) is tests/test_bad_input.py.


def test_existing_run_dir_is_never_overwritten(tmp_path, run_cli):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli("train", *FAST, "--out", out)
    assert res.exit_code == 2 and "already exists" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_tensorboard_without_the_package_is_one_clear_error(tmp_path, run_cli):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    res = run_cli("train", *FAST, "--tensorboard", "--out", tmp_path / "run")
    assert res.exit_code == 2 and "pip install" in res.stderr and not (tmp_path / "run").exists()


def test_a_pickle_given_as_a_checkpoint_is_refused_without_running_it(tmp_path, run_cli):
    import pickle

    out = tmp_path / "run"
    assert run_cli("train", *FAST, "--out", out).exit_code == 0
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (out / "checkpoints" / "last.safetensors").write_bytes(pickle.dumps(Evil()))
    res = run_cli("train", "--resume", out, "--max-epochs", "3", "-q")
    assert res.exit_code == 2 and "not a readable elbokit checkpoint" in res.stderr
    assert not marker.exists()


def test_resume_refuses_changes_that_would_change_the_run(tmp_path, run_cli):
    out = tmp_path / "run"
    assert run_cli("train", *FAST, "--out", out).exit_code == 0
    res = run_cli("train", "--resume", out, "--latent-dim", "3")
    assert res.exit_code == 2 and "cannot change when resuming" in res.stderr


def test_ctrl_c_keeps_the_last_epoch_and_resuming_matches(tmp_path):
    from elbokit import config
    from elbokit.train import SilentReporter, TrainingInterrupted, train

    class InterruptAfterFirstEpoch(SilentReporter):
        def epoch(self, record):
            if record["epoch"] == 1:
                raise KeyboardInterrupt

    def cfg(out):
        return config.resolve(overrides={"data": {"n": 200}, "model": {"hidden": [8]}, "objective": {"terms": "ed"},
                                         "train": {"max_epochs": 3, "batch_size": 50, "evaluate": False},
                                         "output": {"out": str(out)}})

    with pytest.raises(TrainingInterrupted) as info:
        train(cfg(tmp_path / "a"), reporter=InterruptAfterFirstEpoch())
    assert info.value.epoch == 1 and len(metrics(tmp_path / "a")) == 1
    train(resume=tmp_path / "a")
    train(cfg(tmp_path / "b"))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_user_file_with_prior_samples_and_a_changed_file_is_not_resumed(tmp_path, run_cli):
    data, prior = tmp_path / "d.npz", tmp_path / "p.npy"
    assert run_cli("data", "generate", "mixture", "--n", "200", "--out", data).exit_code == 0
    np.save(prior, np.random.default_rng(0).normal(size=(300, 5)))
    out = tmp_path / "run"
    res = run_cli("train", "--data", data, "--terms", "ed", "--prior", "gmm", "--prior-samples", prior,
                  "--hidden", "8", "--batch-size", "40", "--max-epochs", "1", "--no-evaluate", "-q", "--out", out)
    assert res.exit_code == 0, res.stderr
    from elbokit.run import load_run

    run = load_run(out)
    assert np.allclose(run.prior.means.mean(0).numpy(), 0, atol=0.3)  # fitted to the file's N(0, I) samples
    assert np.array_equal(run.load_split("val").data.x, np.load(data)["x"][run.indices["val"]])
    arrays = dict(np.load(data))
    arrays["x"] = arrays["x"] + 1.0
    np.savez(data, **arrays)
    res = run_cli("train", "--resume", out, "--max-epochs", "2", "-q")
    assert res.exit_code == 2 and "has changed" in res.stderr


def test_learned_likelihood_parameters_are_trained_saved_and_restored(tmp_path, run_cli):
    out = tmp_path / "run"
    res = run_cli("train", *FAST, "-o", "recon.likelihood=gaussian", "--lr", "0.01", "--out", out)
    assert res.exit_code == 0, res.stderr
    from elbokit.run import load_run

    run = load_run(out, "last")
    saved = checkpoint_tensors(out)["objective.terms.recon.likelihood.log_scale"]
    assert saved.shape == (20,) and np.abs(saved).max() > 1e-3  # moved away from its init of 0
    assert np.array_equal(run.likelihood.log_scale.detach().numpy(), saved)


def test_the_end_of_training_prints_the_held_out_bounds_it_stored(run_cli, tmp_path):
    import json

    out = tmp_path / "run"
    args = [a for a in FAST if a not in ("--no-evaluate", "-q")]
    res = run_cli("train", *args, "--data", "gaussian", "--out", out)
    assert res.exit_code == 0, res.stderr
    test = json.loads((out / "summary.json").read_text())["test"]
    assert test["elbo"] <= test["iwae"] <= test["exact_loglik"]
    line = [l for l in res.stdout.splitlines() if l.startswith("Test split")][0]
    assert f"ELBO {test['elbo']:.2f} ± {test['elbo_se']:.2f}" in line
    assert f"IWAE (K={test['iw_samples']}) {test['iwae']:.2f}" in line
