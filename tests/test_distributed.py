"""Several processes give the objective of one: two gloo processes on loopback, each with half of
a global batch, against one process with the whole batch, for every built-in batch estimator
and for learnable priors: the same loss and the same gradient of every parameter (after DDP's
averaging), in float64, to a relative 1e-6."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from torch import distributions as D
from torch import nn

import elbokit
from elbokit.errors import IncompatibleError
from elbokit.estimators import Estimator
from elbokit.priors import Prior
from elbokit.terms import ElboTerm

WORLD = 2
B, DATA_DIM, LATENT_DIM, N = 12, 4, 3, 1000
RTOL = 1e-6

# (label, terms, per-term options, prior): every built-in batch-wide estimator, alone and in
# the objectives people train, and two learnable priors.
CASES = [
    ("infonce-dot", "infonce", {"infonce": {"critic": "dot"}}, "standard-normal"),
    ("infonce-cosine", "infonce", {"infonce": {"critic": "cosine", "temperature": 0.5}}, "standard-normal"),
    ("infonce-encoder", "infonce", {"infonce": {"critic": "encoder"}}, "standard-normal"),
    ("entropy-mws", "entropy", {"entropy": {"estimator": "mws"}}, "standard-normal"),
    ("entropy-mss", "entropy", {"entropy": {"estimator": "mss"}}, "standard-normal"),
    ("entropy-knn", "entropy", {"entropy": {"estimator": "knn", "k": 2}}, "standard-normal"),
    ("entropy-gaussian", "entropy", {"entropy": {"estimator": "gaussian"}}, "standard-normal"),
    ("mi-mws", "mi", {}, "standard-normal"),
    ("xent-knn", "xent", {"xent": {"estimator": "knn", "k": 2, "n_prior": 64}}, "standard-normal"),
    ("marginal-kl", "marginal-kl", {}, "standard-normal"),
    ("marginal-kl-knn", "marginal-kl", {"marginal-kl": {"entropy_estimator": "knn", "xent_estimator": "knn"}},
     "standard-normal"),
    ("ed", "ed", {"recon": {"likelihood": "gaussian", "data_dim": DATA_DIM}}, "standard-normal"),
    ("learnable-mean-classic", "recon,kl", {}, "learnable-mean"),
    # Free bits: the floor applies to the batch mean of each dimension's KL, over the global
    # batch (dimension 0 below 0.1 nats, 1 and 2 above; with the learnable mean, 1 below 0.15).
    ("kl-free-bits", "recon,kl", {"kl": {"free_bits": 0.1}}, "standard-normal"),
    ("learnable-mean-free-bits", "recon,kl", {"kl": {"free_bits": 0.15}}, "learnable-mean"),
    ("learnable-mean-ed", "recon,mi,entropy,xent", {"xent": {"estimator": "mc"}}, "learnable-mean"),
    ("vamp", "recon,mi,entropy,xent", {}, "vamp"),
]


class LearnableMeanPrior(Prior):
    """N(mu, I) with a learned mean: its gradient comes from every process's codes."""

    name = "learnable-mean"

    def __init__(self, dim: int):
        super().__init__(dim)
        self.mean = nn.Parameter(torch.linspace(-0.5, 0.5, dim))

    def distribution(self) -> D.Distribution:
        return D.Independent(D.Normal(self.mean, torch.ones_like(self.mean)), 1)

    def sample(self, n: int) -> torch.Tensor:
        return self.distribution().rsample((n,))


def _vamp_class():
    module = pytest.importorskip("elbokit_vampprior", reason="pip install plugins/elbokit-vampprior")
    return module.VampPrior


class Step(nn.Module):
    """One training step's loss from fixed noise, so that both runs draw the same codes."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x, x_pos, eps, eps_pos):
        q = self.model.encode(x)
        z = q.base_dist.loc + q.base_dist.scale * eps
        q_pos = self.model.encode(x_pos)
        z_pos = q_pos.base_dist.loc + q_pos.base_dist.scale * eps_pos
        batch = elbokit.Batch(x=x, posterior=q, z=z, x_recon=self.model.decode(z), x_pos=x_pos,
                              posterior_pos=q_pos, z_pos=z_pos)
        return self.objective(batch).loss


def build(case):
    """The same model, prior, objective and global batch in every process (float64)."""
    from elbokit.plugins import Registry

    _, terms, options, prior_kind = case
    registry = Registry.build(load_entry_points=False, strict=True)
    torch.manual_seed(0)
    model = elbokit.VAE(DATA_DIM, LATENT_DIM, hidden=(8,)).double()
    if prior_kind == "learnable-mean":
        prior = LearnableMeanPrior(LATENT_DIM).double()
    elif prior_kind == "vamp":
        prior = _vamp_class()(dim=LATENT_DIM, n_components=5).double()
        prior.attach(model)
    else:
        prior = elbokit.make_prior(prior_kind, dim=LATENT_DIM, registry=registry).double()
    objective = elbokit.build_objective(terms, prior, options=options, dataset_size=N, has_positives=True,
                                        registry=registry).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, DATA_DIM, generator=g, dtype=torch.float64)
    data = (x, x + 0.1 * torch.randn(B, DATA_DIM, generator=g, dtype=torch.float64),
            torch.randn(B, LATENT_DIM, generator=g, dtype=torch.float64),
            torch.randn(B, LATENT_DIM, generator=g, dtype=torch.float64))
    return Step(model, objective), data


def loss_and_gradients(step: nn.Module, data, seed: int = 7):
    torch.manual_seed(seed)  # the kNN cross-entropy's prior bank, in the one-process run
    loss = step(*data)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in step.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from elbokit.distributed import use_global_batch

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            if case[3] == "vamp":
                try:
                    _vamp_class()
                except pytest.skip.Exception:
                    continue
            step, data = build(case)
            use_global_batch(step.objective, seed=7)
            ddp = DDP(step, find_unused_parameters=True)
            torch.manual_seed(100 + rank)  # each process's own stream differs; the shared one must not
            own = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
            local_loss = ddp(*(t[own] for t in data))
            local_loss.backward()
            loss = local_loss.detach().clone()
            dist.all_reduce(loss)
            grads = {n: p.grad.detach().clone() for n, p in step.named_parameters() if p.grad is not None}
            results[case[0]] = (loss / WORLD, grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_processes_give_the_loss_and_gradients_of_one(case, two_process_results):
    if case[3] == "vamp":
        _vamp_class()
    step, data = build(case)
    loss, grads = loss_and_gradients(step, data)
    # Every parameter the terms use has a non-zero gradient (the decoder only with recon);
    # a parameter without one counts as a zero gradient on both sides.
    used = {n for n, _ in step.named_parameters() if "recon" in case[1] or case[1] == "ed" or not n.startswith("model.decoder")}
    assert set(grads) == used and all(grads[n].abs().max() > 0 for n in used)
    for rank, results in enumerate(two_process_results):
        dist_loss, dist_grads = results[case[0]]
        assert torch.allclose(dist_loss, loss, rtol=RTOL, atol=0), (rank, dist_loss, loss)
        for name, p in step.named_parameters():
            g = grads.get(name, torch.zeros_like(p))
            other = dist_grads.get(name, torch.zeros_like(p))
            assert torch.allclose(other, g, rtol=RTOL, atol=1e-12 * max(float(g.abs().max()), 1.0)), (rank, name)


def test_one_shard_alone_gives_a_different_objective():
    # What the gather is for: on half the batch, MWS's log(N M) and the batch's pairs change
    # the value (so the comparison above could fail).
    step, data = build(("entropy-mws", "entropy", {}, "standard-normal"))
    full, _ = loss_and_gradients(step, data)
    half = step(*(t[: B // 2] for t in data)).detach()
    second = step(*(t[B // 2:] for t in data)).detach()
    assert not math.isclose(float((half + second) / 2), float(full), rel_tol=1e-3)


class _Undeclared(Estimator):
    """An estimator that does not say whether it is per-example or batch-wide."""

    quantity, name = "entropy", "undeclared"

    def forward(self, batch, prior):
        return -batch.z.sum(-1)


def test_an_undeclared_scope_is_refused_in_one_line(monkeypatch):
    from elbokit.distributed import check_scopes

    prior = elbokit.make_prior("standard-normal", dim=LATENT_DIM)
    term = type("Ent", (ElboTerm,), {"name": "entropy", "quantity": "entropy", "sign": -1})(estimator=_Undeclared())
    objective = elbokit.Objective({"entropy": term}, {"entropy": 1.0}, prior)
    with pytest.raises(IncompatibleError) as err:
        check_scopes(objective)
    message = str(err.value)
    assert "\n" not in message
    assert "Term 'entropy' (estimator 'undeclared') does not declare whether it is per-example or batch-wide" in message


def test_every_built_in_term_and_estimator_declares_its_scope(fresh_registry):
    from elbokit.estimators import SCOPES

    for (quantity, name), info in fresh_registry.estimators.items():
        assert info.obj.scope in SCOPES, (quantity, name)
    for name, info in fresh_registry.terms.items():
        cls = info.obj
        if cls.quantity is None and name != "marginal-kl":
            assert cls.scope in SCOPES, name


def test_the_conformance_checks_refuse_an_unknown_scope():
    from elbokit.testing import check_estimator

    class Misdeclared(_Undeclared):
        """An estimator whose scope is not one of SCOPES."""

        scope = "per-row"

    with pytest.raises(AssertionError, match="declares scope 'per-row'; valid: example, batch"):
        check_estimator(Misdeclared)
