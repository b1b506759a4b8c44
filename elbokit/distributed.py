"""Training on several processes with torch.distributed: process groups, a differentiable
all-gather, and an objective whose batch-wide terms see the global batch.

Under plain DistributedDataParallel each process would evaluate InfoNCE, the MWS/MSS entropy,
the MWS mutual information and the kNN and gaussian estimators on its own shard, so the
objective (MWS's log(N M), InfoNCE's log K ceiling, the kNN distances) would change with the
number of processes. Here, with W processes each holding b = B / W rows of a global batch of B:

- per-example terms (`scope = "example"`: recon, kl, xent analytic/mc, ...) run on the local
  rows, as they would anyway;
- batch-wide terms (`scope = "batch"`) run on the global batch, gathered with gradients from
  every process (codes, posterior parameters, positives' codes, in one collective), and each
  process keeps its own rows' per-example contributions;
- each process's loss is the mean over its own rows. The all-gather's backward sums, for every
  process's rows, the gradients that every process's loss sends them, and DDP then averages the
  gradients over processes, so the gradient is that of (1/W) sum_r mean_{i in r} c_i =
  (1/B) sum_i c_i: the same loss and the same gradients as one process with batch B.
- random draws a batch-wide estimator makes (the kNN cross-entropy's prior bank) come from a
  random stream shared by every process (seeded alike, advanced alike), so every process draws
  the same bank without a collective.

A plain single-process run never imports this module and pays nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from .batch import Batch, gaussian_posterior
from .errors import ElbokitError, IncompatibleError
from .estimators import SCOPES


# -- the differentiable all-gather --------------------------------------------------------
class _AllGatherRows(torch.autograd.Function):
    """Concatenate every process's (b, ...) rows into (W b, ...), in rank order, with gradients.

    Written here rather than taken from torch.distributed.nn.functional.all_gather (deprecated,
    and one tensor per process, with an all-to-all in its backward on gloo): one
    `all_gather_single` forward; backward, each process's rows receive the sum over
    processes of the gradients sent to them (a reduce-scatter on NCCL; an all-reduce of the
    whole gradient and a slice on backends without reduce-scatter, such as gloo).
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        rows = rows.contiguous()
        out = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_single(out, rows, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        b = grad.shape[0] // world
        if dist.get_backend(group) == dist.Backend.NCCL:
            own = grad.new_empty((b, *grad.shape[1:]))
            dist.reduce_scatter_single(own, grad, op=dist.ReduceOp.SUM, group=group)
            return own, None
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total[rank * b:(rank + 1) * b], None


def all_gather_rows(rows: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every process's `rows` (same shape everywhere) stacked in rank order, differentiable."""
    return _AllGatherRows.apply(rows, group)


# -- the global-batch objective -------------------------------------------------------------
def check_scopes(objective: Any) -> None:
    """Refuse, in one sentence, a term whose scope (per-example or batch-wide) is undeclared."""
    for name, term in objective.terms.items():
        scope = term.batch_scope()
        if scope not in SCOPES:
            est = f" (estimator '{term.estimator.name}')" if getattr(term, "estimator", None) is not None else ""
            raise IncompatibleError(
                f"Term '{name}'{est} does not declare whether it is per-example or batch-wide, so it "
                "cannot be trained on several processes; its author sets scope = \"example\" or "
                "\"batch\" (docs/distributed.md), or train it on one process."
            )


class GlobalBatch:
    """The hook `Objective.forward` calls in a run on several processes (see the module doc).

    `group`: the process group to gather over (None: the default group). `seed`: the seed of
    the random stream shared by the processes for batch-wide estimators' draws; every process
    must give the same one. `state_dict`/`load_state_dict` save and restore that stream.
    """

    def __init__(self, group: Any = None, seed: int = 0, device: torch.device | str = "cpu"):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device(device)
        generator = torch.Generator().manual_seed(int(seed))
        self._cpu_state = generator.get_state()
        self._device_state: torch.Tensor | None = None
        if self.device.type == "cuda":
            device_gen = torch.Generator(device=self.device).manual_seed(int(seed))
            self._device_state = device_gen.get_state()

    # The shared stream: entered around the batch-wide terms only, so that each process's own
    # stream (its codes' noise, dropout) is untouched.
    @contextlib.contextmanager
    def _shared_random_stream(self) -> Iterator[None]:
        devices = [self.device] if self._device_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.set_rng_state(self._cpu_state)
            if self._device_state is not None:
                torch.cuda.set_rng_state(self._device_state, self.device)
            yield
            self._cpu_state = torch.get_rng_state()
            if self._device_state is not None:
                self._device_state = torch.cuda.get_rng_state(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": self._cpu_state.clone(),
                "device": None if self._device_state is None else self._device_state.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cpu_state = state["cpu"].clone()
        if state.get("device") is not None and self._device_state is not None:
            self._device_state = state["device"].clone()

    def gather(self, batch: Batch) -> Batch:
        """The global batch: every process's rows in rank order, differentiable. The per-row
        tensors travel packed into one (b, K) tensor, so a step costs one all-gather forward and
        one reduction backward."""
        try:
            loc, scale = batch.posterior_loc, batch.posterior_scale
        except ElbokitError:
            raise ElbokitError("A run on several processes gathers the posterior's parameters: the model's "
                               "q(z|x) must be a diagonal Gaussian (Independent(Normal(loc, scale), 1)).") from None
        parts: dict[str, torch.Tensor] = {"z": batch.z, "loc": loc, "scale": scale}
        if batch.z_pos is not None:
            parts["z_pos"] = batch.z_pos
        if batch.posterior_pos is not None:
            parts["loc_pos"], parts["scale_pos"] = _normal_params(batch.posterior_pos)
        for key in ("x", "x_pos", "x_recon"):
            value = getattr(batch, key)
            if value is not None:
                parts[key] = value
        dtype = batch.z.dtype
        widths = [t.reshape(batch.size, -1).shape[1] for t in parts.values()]
        packed = torch.cat([t.reshape(batch.size, -1).to(dtype) for t in parts.values()], 1)
        gathered = all_gather_rows(packed, self.group)
        rows = gathered.shape[0]
        out: dict[str, torch.Tensor] = {}
        for (key, t), piece in zip(parts.items(), torch.split(gathered, widths, dim=1)):
            out[key] = piece.reshape(rows, *t.shape[1:]).to(t.dtype)
        posterior_pos = None
        if "loc_pos" in out:
            posterior_pos = gaussian_posterior(out["loc_pos"], out["scale_pos"])
        return Batch(x=out["x"], posterior=gaussian_posterior(out["loc"], out["scale"]), z=out["z"],
                     x_recon=out.get("x_recon"), x_pos=out.get("x_pos"), posterior_pos=posterior_pos,
                     z_pos=out.get("z_pos"), dataset_size=batch.dataset_size)

    def evaluate(self, objective: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Each term's per-example contributions for this process's rows, shape (b,): per-example
        terms on `batch`, batch-wide ones on the global batch (gathered once, if any needs it)."""
        own = slice(self.rank * batch.size, (self.rank + 1) * batch.size)
        global_batch: Batch | None = None
        per_term: dict[str, torch.Tensor] = {}
        for name, term in objective.terms.items():
            if term.batch_scope() == "example":
                per_term[name] = term(batch, objective.prior)
                continue
            if global_batch is None:
                global_batch = self.gather(batch)
            with self._shared_random_stream():
                per_term[name] = term(global_batch, objective.prior)[own]
        return per_term


def _normal_params(posterior: Any) -> tuple[torch.Tensor, torch.Tensor]:
    base = posterior.base_dist if isinstance(posterior, torch.distributions.Independent) else posterior
    if not isinstance(base, torch.distributions.Normal):
        raise ElbokitError("A run on several processes gathers q(z|x+): it must be a diagonal Gaussian.")
    return base.loc, base.scale


def use_global_batch(objective: Any, group: Any = None, seed: int = 0,
                     device: torch.device | str = "cpu") -> GlobalBatch:
    """Make `objective` evaluate its batch-wide terms on the global batch of the process group.
    Checks every term's scope first (one sentence for the first undeclared one). Every process
    calls it with the same `seed`. Returns the hook (whose state a checkpoint saves)."""
    check_scopes(objective)
    hook = GlobalBatch(group=group, seed=seed, device=device)
    objective.global_batch = hook
    return hook
