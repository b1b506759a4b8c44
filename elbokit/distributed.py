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
from torch import nn

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

    def evaluate(self, objective: Any, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each term's per-example (value, loss) for this process's rows, shape (b,) each (see
        `ElboTerm.contributions`): per-example terms on `batch`, batch-wide ones on the global
        batch (gathered once, if any needs it)."""
        own = slice(self.rank * batch.size, (self.rank + 1) * batch.size)
        global_batch: Batch | None = None
        per_term: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, term in objective.terms.items():
            if term.batch_scope() == "example":
                per_term[name] = term.contributions(batch, objective.prior)
                continue
            if global_batch is None:
                global_batch = self.gather(batch)
            with self._shared_random_stream():
                value, loss = term.contributions(global_batch, objective.prior)
                per_term[name] = (value[own], loss[own])
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


# -- training on several processes (torchrun) -------------------------------------------------
def world_size_from_environment() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset): read without importing torch.distributed."""
    import os

    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(text))
    except ValueError:
        raise ElbokitError(f"WORLD_SIZE must be a whole number of processes, got {text!r}.") from None


def check_batch_split(batch_size: int, world_size: int) -> int:
    """The rows per process of a global batch; one sentence when it does not split evenly."""
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        raise ElbokitError(
            f"The batch size {batch_size} is the global batch and must split evenly across the "
            f"{world_size} processes; give a multiple of {world_size}, e.g. --batch-size {lower or world_size}.")
    return batch_size // world_size


class _StepModule(nn.Module):
    """The model and the objective as one module for DDP, so that the objective's parameters
    (a learned likelihood scale, a learnable prior) are averaged like the model's."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x: torch.Tensor, x_pos: torch.Tensor | None, dataset_size: int | None) -> Any:
        return self.objective(self.model(x, x_pos, dataset_size=dataset_size))


class ProcessGroup:
    """This process's place in a run on several processes, and what the training loop asks of
    the group: its shard of each global batch, DDP, agreeing to stop, the epoch's sums, every
    process's random state for checkpoints. Create it with `ProcessGroup.start(device)` on
    every process launched by torchrun; the processes leave the group together at exit."""

    def __init__(self, rank: int, world_size: int, local_rank: int, backend: str):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend
        self.global_batch: GlobalBatch | None = None
        self.rng_states: dict[str, torch.Tensor] = {}

    @property
    def is_writer(self) -> bool:
        """Process 0 alone holds the run directory's lock and writes it."""
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> "ProcessGroup":
        """Join the group torchrun describes in the environment (MASTER_ADDR, MASTER_PORT,
        RANK, WORLD_SIZE, LOCAL_RANK): NCCL for CUDA devices, gloo otherwise."""
        import datetime
        import os

        cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
            except ValueError as exc:  # a variable torchrun sets is missing: started by hand
                raise ElbokitError(f"Cannot join the process group ({exc}); start several processes with "
                                   "torchrun --nproc-per-node N -m elbokit train ...") from None
            import atexit

            atexit.register(_leave_together)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())

    def device_for(self, device: str) -> str:
        """The device of this process: cuda:LOCAL_RANK for a CUDA run, as given otherwise."""
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else device

    # -- set-up -----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, objective: Any, seed: int) -> nn.Module:
        """Make the objective's batch-wide terms see the global batch, give every process but
        the first its own random stream (the noise of its codes), and return the DDP-wrapped
        step module whose forward(x, x_pos, dataset_size) gives the ObjectiveOutput."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        self.global_batch = use_global_batch(objective, seed=seed, device=device)
        if self.rank:
            # Process 0 continues the stream a one-process run would use; the others must not
            # repeat its noise on their rows.
            torch.manual_seed(seed + 1_000_003 * self.rank)
        # Without a reconstruction term the decoder gets no gradient: DDP must be told.
        unused = "x_recon" not in objective.needs()
        # Buffers (a fitted GMM's parameters) are built alike on every process and never
        # change: no per-step broadcast of them.
        return DDP(_StepModule(model, objective), device_ids=[device] if device.type == "cuda" else None,
                   forward_sync_buffers=False, find_unused_parameters=unused)

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's part of a global batch's row indices (equal parts, in rank order)."""
        b = rows.shape[0] // self.world_size
        return rows[self.rank * b:(self.rank + 1) * b]

    @contextlib.contextmanager
    def local_objective(self, objective: Any) -> Iterator[None]:
        """Validation runs on every process over the whole split, as one process would:
        nothing is gathered meanwhile (each process has the same rows)."""
        hook, objective.global_batch = objective.global_batch, None
        try:
            yield
        finally:
            objective.global_batch = hook

    # -- agreeing ---------------------------------------------------------------------------
    def agree_to_stop(self, signum: int | None) -> int | None:
        """The signal any process received (the largest number), or None: all processes stop
        at the same step boundary, so that none waits forever in a collective."""
        flag = torch.tensor([signum or 0], dtype=torch.long, device=self._comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None

    def reduce_epoch(self, loss_sum: torch.Tensor, term_sums: dict[str, torch.Tensor],
                     first_bad: torch.Tensor, n_terms: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """The global batch's sums (the mean over processes of each process's sums of its rows'
        means: equal shards) and the first step, over processes, whose loss was not finite."""
        names = list(term_sums)
        sums = torch.stack([loss_sum, *(term_sums[n] for n in names)]).to(self._comm_device, torch.float64)
        dist.all_reduce(sums)
        sums = (sums / self.world_size).to(loss_sum.device, loss_sum.dtype)
        never = torch.iinfo(torch.long).max
        code = torch.where(first_bad[0] >= 0, first_bad[0] * (n_terms + 1) + first_bad[1],
                           torch.full_like(first_bad[0], never)).reshape(1).to(self._comm_device)
        dist.all_reduce(code, op=dist.ReduceOp.MIN)
        code = int(code)
        agreed = first_bad.new_tensor([-1, -1] if code == never else [code // (n_terms + 1), code % (n_terms + 1)])
        return sums[0], {n: sums[i + 1] for i, n in enumerate(names)}, agreed

    def stack_sums(self, loss_sum: torch.Tensor, term_sums: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every process's running sums of an interrupted epoch, (W,) each, for its checkpoint."""
        names = list(term_sums)
        mine = torch.stack([loss_sum, *(term_sums[n] for n in names)]).to(self._comm_device)
        every = mine.new_empty(self.world_size * mine.shape[0])
        dist.all_gather_single(every, mine)
        every = every.reshape(self.world_size, -1).to(loss_sum.device)
        return every[:, 0], {n: every[:, i + 1] for i, n in enumerate(names)}

    # -- random states --------------------------------------------------------------------
    def gather_rng_states(self) -> None:
        """Collect every process's torch random state (and the shared stream's) for the next
        checkpoint; called by every process at the same points."""
        mine = [torch.get_rng_state()]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            mine.append(torch.cuda.get_rng_state())
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, mine)
        tensors = {}
        for rank, per_rank in enumerate(states):
            tensors[f"rng.rank.{rank}.torch"] = per_rank[0]
            if len(per_rank) > 1:
                tensors[f"rng.rank.{rank}.cuda"] = per_rank[1]
        shared = self.global_batch.state_dict() if self.global_batch is not None else {}
        tensors["rng.shared.cpu"] = shared.get("cpu")
        if shared.get("device") is not None:
            tensors["rng.shared.device"] = shared["device"]
        self.rng_states = {k: v for k, v in tensors.items() if v is not None}

    def restore_rng_states(self, tensors: dict[str, torch.Tensor], world_size: int | None) -> str | None:
        """Set this process's random state from a checkpoint. With the same number of processes
        the run continues exactly; otherwise a note saying what is not exact."""
        if "rng.shared.cpu" in tensors and self.global_batch is not None:
            self.global_batch.load_state_dict({"cpu": tensors["rng.shared.cpu"], "device": tensors.get("rng.shared.device")})
        own = tensors.get(f"rng.rank.{self.rank}.torch")
        if world_size == self.world_size and own is not None:
            torch.set_rng_state(own)
            if f"rng.rank.{self.rank}.cuda" in tensors and torch.cuda.is_available():
                torch.cuda.set_rng_state(tensors[f"rng.rank.{self.rank}.cuda"])
            return None
        return (f"resumed on {self.world_size} processes from a checkpoint written by {world_size or 1}: the global "
                "batch and the objective are the same, the codes' random noise is not (the run is not bit-exact).")

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        dist.barrier()

    def gather_errors(self, message: str | None) -> list[str | None]:
        """Every process's error message (None where all went well): when process 0 cannot
        create or open the run directory, the others stop with the same sentence."""
        messages: list[Any] = [None] * self.world_size
        dist.all_gather_object(messages, message)
        return messages


def own_running_sum(saved: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """This process's running sum of an interrupted epoch from a checkpoint holding one per
    process: its own with the same number of processes, else their mean (the global batch's
    sum so far, which is what the epoch's mean over processes needs)."""
    if group is not None and saved.shape[0] == group.world_size:
        return saved[group.rank]
    return saved.mean(0)


def _leave_together() -> None:
    """At exit, wait for every process before leaving the group: a process that exits first
    (say, with the code of an agreed stop) would make torchrun stop the others, possibly
    before process 0 has printed how to resume."""
    if not dist.is_initialized():
        return
    import signal

    # Leaving anyway: torchrun's SIGTERM to the last processes (sent once one has exited) must
    # not cut the exit short.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - a process already gone: nothing left to wait for
        pass
    dist.destroy_process_group()


class NoWrites:
    """The run directory as the processes other than 0 see it: they write nothing."""

    def write_checkpoint(self, which: str, data: bytes) -> None: pass
    def write_summary(self, summary: dict[str, Any]) -> None: pass
    def write_config(self, cfg: dict[str, Any]) -> None: pass
    def append_metrics(self, record: dict[str, Any]) -> None: pass
    def truncate_metrics(self, upto_epoch: int) -> None: pass
    def read_metrics(self) -> list[dict[str, Any]]: return []
    def begin_writing(self) -> None: pass
    def close(self) -> None: pass
