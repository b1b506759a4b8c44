"""Models through the `register_models` hook: `mlp` gives the numbers of the hand-built MLP of
before, `conv` restores every image shape, plugin models register, list and train, and
configs written before models were plugins still load and resume."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from torch import nn

from elbokit import config
from elbokit.build import build_components, build_model, seed_everything
from elbokit.errors import ElbokitError

FAST = ["--n", "300", "--batch-size", "64", "--max-epochs", "2", "--no-evaluate", "-q"]


def old_mlp(sizes):
    """The MLP of elbokit/models/vae.py before models were plugins, written out by hand."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def test_mlp_through_the_hook_has_the_parameters_and_outputs_of_the_old_mlp(fresh_registry):
    cfg = config.resolve(overrides={"model": {"hidden": [32, 16], "latent_dim": 3}})
    assert cfg["model"] == {"latent_dim": 3, "name": "mlp", "options": {"hidden": [32, 16]}}
    torch.manual_seed(7)
    encoder, decoder = old_mlp([20, 32, 16, 6]), old_mlp([3, 16, 32, 20])
    torch.manual_seed(7)
    model = build_model(cfg, (20,), fresh_registry)
    new = model.state_dict()
    old = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
           **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
    assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in old)
    x = torch.randn(9, 20)
    loc, pre = encoder(x).chunk(2, dim=-1)
    q = model.encode(x)
    assert torch.equal(q.base_dist.loc, loc)
    assert torch.equal(q.base_dist.scale, nn.functional.softplus(pre) + 1e-4)
    z = torch.randn(9, 3)
    assert torch.equal(model.decode(z), decoder(z))


def test_build_components_initialises_the_mlp_from_the_training_seed_as_before(fresh_registry):
    cfg = config.resolve(overrides={"data": {"n": 200}, "model": {"hidden": [16]}, "train": {"seed": 3}})
    components = build_components(cfg, registry=fresh_registry)
    seed_everything(3)  # build_components seeds, then builds the model first
    encoder, decoder = old_mlp([20, 16, 10]), old_mlp([5, 16, 20])
    new = components.model.state_dict()
    assert torch.equal(new["encoder.0.weight"], encoder[0].weight.detach())
    assert torch.equal(new["decoder.2.bias"], decoder[2].bias.detach())


@pytest.mark.parametrize("shape, channels", [((1, 8, 8), [32, 64]), ((3, 16, 16), [8, 16, 32]),
                                             ((2, 7, 5), [4, 8])])
def test_conv_restores_every_image_shape_and_passes_gradients(fresh_registry, shape, channels):
    cfg = config.resolve(overrides={"model": {"name": "conv", "options": {"channels": channels, "hidden": 32}}})
    torch.manual_seed(0)
    model = build_model(cfg, shape, fresh_registry)
    x = torch.randn(4, *shape)
    batch = model(x, x_pos=x + 0.1)
    assert batch.x_recon.shape == (4, *shape) and batch.z.shape == (4, 5) and batch.z_pos.shape == (4, 5)
    batch.x_recon.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.decoder_conv.parameters())


def test_conv_refuses_flat_data_before_training(fresh_registry):
    cfg = config.resolve(overrides={"model": {"name": "conv"}, "data": {"n": 100}})
    with pytest.raises(ElbokitError, match=r"model 'conv' takes 3-D examples, but the data's examples have shape \(20,\)"):
        build_components(cfg, registry=fresh_registry)


@pytest.mark.parametrize("overrides, message", [
    ({"model": {"name": "mlp", "options": {"channels": [3]}}}, "has no option 'channels'"),
    ({"model": {"name": "conv", "options": {"channels": [0]}}}, "channels: layer sizes must be positive integers, got 0 at position 1"),
    ({"model": {"name": "nope"}}, "Unknown model 'nope'"),
])
def test_bad_models_and_options_are_one_line(fresh_registry, overrides, message):
    with pytest.raises(ElbokitError, match=message):
        cfg = config.resolve(overrides=overrides)
        build_components(cfg, registry=fresh_registry)


def test_model_options_from_the_command_line(run_cli, fresh_registry, tmp_path):
    res = run_cli("train", "--model", "mlp", "--model-option", "hidden=12,6", "--print-config")
    assert res.exit_code == 0, res.stderr
    cfg = config.resolve(config.merge(config.defaults(), __import__("tomllib").loads(res.stdout)))
    assert cfg["model"]["options"] == {"hidden": [12, 6]} and cfg["model"]["name"] == "mlp"
    res = run_cli("train", "--model-option", "hidden=a,b", "--print-config")
    assert res.exit_code == 2 and res.stderr.startswith("Error:") and "list must hold numbers" in res.stderr


class Affine(__import__("elbokit").Model):
    """A linear encoder and decoder, for the plugin test."""

    name = "affine"

    def __init__(self, event_shape, latent_dim, bias: bool = True):
        super().__init__(event_shape, latent_dim)
        self.encoder = nn.Linear(self.data_dim, 2 * self.latent_dim, bias=bias)
        self.decoder = nn.Linear(self.latent_dim, self.data_dim, bias=bias)

    def encode(self, x):
        from elbokit import gaussian_posterior

        loc, pre = self.encoder(x.flatten(1)).chunk(2, dim=-1)
        return gaussian_posterior(loc, nn.functional.softplus(pre) + 1e-3)

    def decode(self, z):
        return self.decoder(z).unflatten(-1, self.event_shape)


def test_a_plugin_model_registers_lists_and_trains(run_cli, tmp_path):
    from elbokit import hookimpl
    from elbokit.plugins import Registry, set_registry

    plugin = types.SimpleNamespace(__name__="affine-plugin",
                                   register_models=hookimpl(specname="register_models")(lambda register: register(Affine)))
    registry = Registry.build([plugin], load_entry_points=False, strict=True)
    set_registry(registry)
    try:
        rows = {r["name"]: r for r in json.loads(run_cli("models", "--json").stdout)}
        assert rows["affine"]["options"] == {"bias": True} and rows["affine"]["plugin"] == "affine-plugin"
        assert {"mlp", "conv"} <= set(rows)
        res = run_cli("train", "--model", "affine", "--model-option", "bias=false", *FAST, "--json",
                      "--out", tmp_path / "run")
        assert res.exit_code == 0, res.stderr
        from elbokit.run import load_run

        run = load_run(tmp_path / "run", "last")
        assert isinstance(run.model, Affine) and run.model.encoder.bias is None
        assert run.config["model"] == {"latent_dim": 5, "name": "affine", "options": {"bias": False}}
        meta = json.loads((tmp_path / "run" / "run.json").read_text())
        assert {"kind": "model", "name": "affine", "plugin": "affine-plugin"}.items() <= \
            next(c for c in meta["components"] if c["kind"] == "model").items()
    finally:
        set_registry(None)


def test_a_config_written_before_models_were_plugins_loads_and_resumes(run_cli, fresh_registry, tmp_path):
    def metrics(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    args = ["--hidden", "16", "--n", "300", "--batch-size", "64", "--no-evaluate", "-q", "--patience", "50"]
    assert run_cli("train", *args, "--max-epochs", "3", "--out", tmp_path / "full").exit_code == 0
    assert run_cli("train", *args, "--max-epochs", "2", "--out", tmp_path / "part").exit_code == 0
    path = tmp_path / "part" / "config.toml"
    text = path.read_text()
    # The [model] section as elbokit wrote it before: latent_dim and hidden only.
    lines = [line for line in text.splitlines() if not line.startswith(("name =", "options ="))]
    old = "\n".join(lines).replace("[model]\n", "[model]\nhidden = [16]\n", 1) + "\n"
    assert "hidden = [16]" in old and "options =" not in old
    path.write_text(old)
    res = run_cli("train", "--resume", tmp_path / "part", "--max-epochs", "3")
    assert res.exit_code == 0, res.stderr
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")


def _forward_numbers(model, x, x_pos, seed):
    torch.manual_seed(seed)
    b = model(x, x_pos)
    out = [b.posterior.base_dist.loc, b.posterior.base_dist.scale, b.z, b.x_recon]
    if x_pos is not None:
        out += [b.posterior_pos.base_dist.loc, b.posterior_pos.base_dist.scale, b.z_pos]
    return [t.detach() for t in out]


@pytest.mark.parametrize("name, shape, options", [("mlp", (20,), {"hidden": [32, 16]}),
                                                  ("conv", (1, 8, 8), {"channels": [4, 8], "hidden": 16})])
def test_positives_encoded_in_one_pass_give_the_numbers_of_two_passes(fresh_registry, name, shape, options):
    # x and x+ go through the encoder as one batch of 2B rows: the posteriors, the draws (z is
    # drawn before z+, as before) and the reconstruction equal those of two separate passes up
    # to float rounding; gradients reach the encoder through both halves.
    cfg = config.resolve(overrides={"model": {"name": name, "options": options}})
    torch.manual_seed(0)
    model = build_model(cfg, shape, fresh_registry)
    x = torch.randn(16, *shape)
    x_pos = x + 0.1 * torch.randn(16, *shape)
    joint = _forward_numbers(model, x, x_pos, seed=3)
    model.joint_positive_pass = False
    separate = _forward_numbers(model, x, x_pos, seed=3)
    for a, b in zip(joint, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.joint_positive_pass = True
    batch = model(x, x_pos)
    batch.z_pos.sum().backward()
    first = next(model.encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_without_positives_the_forward_is_encode_sample_decode_bit_for_bit(fresh_registry):
    cfg = config.resolve(overrides={"model": {"hidden": [32, 16]}})
    torch.manual_seed(0)
    model = build_model(cfg, (20,), fresh_registry)
    x = torch.randn(16, 20)
    loc, scale, z, recon = _forward_numbers(model, x, None, seed=5)
    torch.manual_seed(5)
    q = model.encode(x)
    z_ref = q.rsample()
    assert torch.equal(loc, q.base_dist.loc) and torch.equal(scale, q.base_dist.scale)
    assert torch.equal(z, z_ref) and torch.equal(recon, model.decode(z_ref))


def test_an_encoder_with_batch_normalisation_encodes_positives_apart(fresh_registry):
    from elbokit.models.base import Model, posterior_from

    class BatchNormed(Model):
        name = "bn"

        def __init__(self, event_shape, latent_dim=2):
            super().__init__(event_shape, latent_dim)
            self.encoder = nn.Sequential(nn.Linear(self.data_dim, 8), nn.BatchNorm1d(8), nn.Linear(8, 2 * latent_dim))
            self.decoder = nn.Linear(latent_dim, self.data_dim)

        def encode(self, x):
            return posterior_from(self.encoder(x))

        def decode(self, z):
            return self.decoder(z)

    torch.manual_seed(0)
    model = BatchNormed(6)
    x, x_pos = torch.randn(10, 6), 3.0 + torch.randn(10, 6)  # x+ far from x: batch statistics differ
    b = model(x, x_pos)
    assert torch.equal(b.posterior.base_dist.loc, model.encode(x).base_dist.loc)
    assert torch.equal(b.posterior_pos.base_dist.loc, model.encode(x_pos).base_dist.loc)
    together = model.encode(torch.cat([x, x_pos])).base_dist.loc[:10]
    assert not torch.allclose(together, b.posterior.base_dist.loc, atol=1e-3)  # what one pass would change
