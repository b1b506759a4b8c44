"""`elbokit plot`: latent dimension 1, 2 and 5 in each format, what each figure shows, no
overwrite of a file the user named, and run directories written with the old metric names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "svg": b"<svg", "pdf": b"%PDF"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs with latent dimension 1, 2 and 5 (2 epochs on small data)."""
    from elbokit.cli import main

    root = tmp_path_factory.mktemp("plots")
    for latent in (1, 2, 5):
        assert main(["train", "--data", "gaussian", "--n", "300", "--latent-dim", str(latent), "--hidden", "16",
                     "--batch-size", "64", "--max-epochs", "2", "--no-evaluate", "-q",
                     "--out", str(root / f"L{latent}")]) == 0
    return root


@pytest.mark.parametrize("latent", [1, 2, 5])
@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_every_figure_in_every_format(runs, run_cli, tmp_path, latent, fmt):
    res = run_cli("plot", runs / f"L{latent}", "--out", tmp_path / "figs", "--format", fmt, "--json")
    assert res.exit_code == 0, res.stderr
    paths = json.loads(res.stdout)["plots"]
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"loss.{fmt}", f"terms.{fmt}", f"latents.{fmt}"]
    for p in paths:
        head = open(p, "rb").read(4096)
        assert MAGIC[fmt] in head[:len(MAGIC[fmt])] or (fmt == "svg" and MAGIC[fmt] in head), p


@pytest.mark.parametrize("latent", [2, 5])
def test_a_corner_plot_of_every_latent_pair(runs, latent):
    from elbokit.plot import latent_figure
    from elbokit.run import load_run

    fig = latent_figure(load_run(runs / f"L{latent}"))
    visible = [ax for ax in fig.axes if ax.axison]
    assert len(visible) == latent * (latent + 1) // 2  # the lower triangle and the diagonal
    labels = {ax.get_xlabel() for ax in visible} | {ax.get_ylabel() for ax in visible}
    assert {f"z{i} (latent units)" for i in range(latent)} <= labels


def test_latent_dimension_one_shows_the_prior_density(runs):
    """L = 1 is one axis (not z0 against z0): the aggregate posterior's histogram and the
    prior's exact density, which integrates to about 1 over the plotted range."""
    from elbokit.plot import latent_figure
    from elbokit.run import load_run

    fig = latent_figure(load_run(runs / "L1"))
    (ax,) = fig.axes
    assert ax.get_xlabel() == "z0 (latent units)" and "density" in ax.get_ylabel()
    (line,) = ax.get_lines()
    x, y = line.get_data()
    np.testing.assert_allclose(y, np.exp(-0.5 * x ** 2) / np.sqrt(2 * np.pi), rtol=1e-5)  # N(0, 1)
    heights = [p.get_height() * p.get_width() for p in ax.patches]
    assert sum(heights) == pytest.approx(1.0, abs=1e-6)  # a density histogram


def test_loss_figure_has_train_and_validation_on_one_labelled_axes(runs):
    from elbokit.metrics import flat_record
    from elbokit.plot import loss_figure
    from elbokit.run import load_run

    run = load_run(runs / "L2")
    fig = loss_figure(run)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "epoch" and "nats per example" in ax.get_ylabel()
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    records = [flat_record(r) for r in run.metrics()]
    train = next(v for k, v in lines.items() if "[train_loss]" in k)
    val = next(v for k, v in lines.items() if "[val_loss]" in k)
    np.testing.assert_allclose(train, [r["train_loss"] for r in records])
    np.testing.assert_allclose(val, [r["val_loss"] for r in records])


def test_a_file_named_with_out_is_not_overwritten_without_force(runs, run_cli, tmp_path):
    target = tmp_path / "loss.pdf"
    assert run_cli("plot", runs / "L2", "--figure", "loss", "--out", target).exit_code == 0
    target.write_bytes(b"the user's file")
    res = run_cli("plot", runs / "L2", "--figure", "loss", "--out", target)
    assert res.exit_code == 2 and "already exists" in res.stderr and len(res.stderr.splitlines()) == 1
    assert target.read_bytes() == b"the user's file"
    assert run_cli("plot", runs / "L2", "--figure", "loss", "--out", target, "--force").exit_code == 0
    assert target.read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/x.png"], "choose one figure with --figure"),
    (["--out", "{tmp}/x.png", "--figure", "loss", "--format", "svg"], "make them agree"),
    (["--out", "{tmp}/x.gif", "--figure", "loss"], "must end in .png, .svg or .pdf"),
    (["--format", "jpg"], "Unknown --format 'jpg'"),
    (["--figure", "nope"], "Unknown figure 'nope'"),
    (["--figure", "reconstructions"], "not trained on images"),
])
def test_plot_bad_input_is_one_line_and_writes_nothing(runs, run_cli, tmp_path, args, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli("plot", runs / "L2", *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1 and message in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _nested(record):
    """A record as the training loop wrote it before elbokit.metrics (nested, old names)."""
    from elbokit.metrics import flat_record, term_losses

    r = flat_record(record)
    return {"epoch": r["epoch"], "step": r["step"],
            "train": {"loss": r["train_loss"], "terms": term_losses(r)},
            "val": {k[len("val_"):]: v for k, v in r.items() if k.startswith("val_")},
            "select_metric": r["select_metric"][len("val_"):], "improved": r["improved"],
            "best_value": r["best_val"], "best_epoch": r["best_epoch"], "seconds": r["seconds"]}


def test_old_and_flat_metric_records_plot_the_same(runs, tmp_path):
    """A run directory without run.json, with nested metrics records under the names used
    before elbokit.metrics, plots the same as the run with flat records and current names."""
    from elbokit.metrics import flat_record
    from elbokit.plot import loss_figure, terms_figure
    from elbokit.run import load_run

    old, flat = tmp_path / "old", tmp_path / "flat"
    shutil.copytree(runs / "L2", old)
    (old / "run.json").unlink(missing_ok=True)
    records = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text("".join(json.dumps(_nested(r)) + "\n" for r in records))
    assert "train" in json.loads((old / "metrics.jsonl").read_text().splitlines()[0])
    shutil.copytree(runs / "L2", flat)
    (flat / "metrics.jsonl").write_text("".join(json.dumps(flat_record(r)) + "\n" for r in records))

    def data(fig):
        return sorted((line.get_label(), tuple(line.get_ydata())) for ax in fig.axes for line in ax.get_lines())

    assert data(loss_figure(load_run(old))) == data(loss_figure(load_run(flat))) == data(loss_figure(load_run(runs / "L2")))
    assert data(terms_figure(load_run(old))) == data(terms_figure(load_run(flat)))
    from elbokit.plot import plot_run

    assert len(plot_run(old, fmt="svg")) == 3
