"""The training loop, usable from Python:

    from elbokit import config, train
    cfg = config.resolve(overrides={"objective": {"terms": "ed"}, "prior": {"name": "gmm"},
                                     "output": {"out": "runs/ed-gmm"}})
    summary = train.train(cfg)             # or train.train(resume="runs/ed-gmm")

Everything that can be wrong with the input (data, sizes, prior samples, term/prior
compatibility, output directory) is checked by `prepare` BEFORE the run directory is created,
so a bad command leaves nothing behind. The whole standardised training split lives on the
device as one tensor and minibatches are drawn with a permutation (no DataLoader); a data file
larger than `data.max_in_memory_mb` is memory-mapped instead and each minibatch of the same
permutation is read from it (`elbokit.data.StreamedRows`, docs/data.md); term values
are accumulated as tensors and read once per epoch, so the loop never waits on `.item()`.

Determinism: the model is initialised from `train.seed`; the data order comes from its own
`torch.Generator`; the validation metric is computed under `torch.random.fork_rng` with the
fixed `train.val_seed`, so validating never moves the training random stream. A checkpoint
holds every random state, so `resume` continues the exact same stream.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from . import config as config_mod
from . import build
from . import run as run_mod
from .build import (  # noqa: F401 - also importable from here, as before build.py existed
    Components, build_components, load_prior_samples, precheck, prior_samples_for, rebuild_prior, seed_everything)
from .data import positives as positives_mod
from .errors import ElbokitError
from .metrics import TERM_LOSS_PREFIX, flat_record, term_losses

# Keys that may change when a run is resumed (they do not change what was already computed).
RESUMABLE_OVERRIDES = {
    "train": {"max_epochs", "patience", "lr", "grad_clip", "device", "evaluate", "threads", "checkpoint_seconds"},
    "output": {"tensorboard", "mlflow", "name", "tags"},
}


def resume_command(run_dir: Path | str) -> str:
    """The command that resumes `run_dir`; under torchrun, with the same number of processes
    (the exact resume needs them), read from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world == 1:
        return f"elbokit train --resume {run_dir}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    where = "" if local == world else f" on each of the {world // local} machines"
    return f"torchrun --nproc-per-node {local} -m elbokit train --resume {run_dir}{where}"


class TrainingDiverged(ElbokitError):
    """The loss or the parameters became NaN or Inf; the last good checkpoint is kept.
    Not bad input: the CLI exits with code 3 (EXIT_DIVERGED)."""


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM during training. Caught at a step boundary, the state
    there, with the position in the epoch, is saved in checkpoints/last and resuming is exact
    (`step_in_epoch` steps of epoch `epoch + 1` done); a second Ctrl-C, or a KeyboardInterrupt
    raised by code, stops at once and keeps the last complete epoch (`step_in_epoch` 0)."""

    def __init__(self, run_dir: Path, epoch: int, step_in_epoch: int = 0, signum: int | None = None):
        where = f"at step {step_in_epoch} of epoch {epoch + 1}" if step_in_epoch else f"after epoch {epoch}"
        super().__init__(f"Interrupted {where}.")
        self.run_dir, self.epoch, self.step_in_epoch, self.signum = run_dir, epoch, step_in_epoch, signum


class RunWriteFailed(Exception):
    """An OS error (disk full, permissions, a read-only or vanished filesystem) while writing
    the run directory. Not bad input and not a bug: the CLI exits with code 4 (EXIT_OS_ERROR).
    Checkpoints are replaced atomically, so the last one written is intact and resumable."""

    def __init__(self, run_dir: Path, written_epoch: int | None, cause: OSError):
        import errno as _errno

        what = f"{cause.strerror or cause}" + (f" ({_errno.errorcode.get(cause.errno, cause.errno)})" if cause.errno else "")
        target = f" {cause.filename}" if getattr(cause, "filename", None) else ""
        if written_epoch is None:
            message = f"Could not create the run directory {run_dir}: {what}{':' if target else ''}{target}; nothing was written."
        elif not run_mod.checkpoint_path(run_dir, "last").is_file():
            message = (f"Could not write{target or ' the run directory'}: {what}; the run directory {run_dir} "
                       "was removed or is no longer readable, so there is nothing to resume.")
        else:
            where = "the initial state" if written_epoch == 0 else f"epoch {written_epoch}"
            message = (f"Could not write{target or ' the run directory'}: {what}; the last checkpoint ({where}) is "
                       f"intact. Free space or fix the directory, then resume with: {resume_command(run_dir)}")
        super().__init__(message)
        self.run_dir, self.written_epoch, self.cause = run_dir, written_epoch, cause


class _StopRequested(Exception):
    """Raised inside an epoch, at a step boundary, after SIGINT/SIGTERM; carries the epoch's progress."""

    def __init__(self, progress: dict[str, Any]):
        super().__init__("stop requested")
        self.progress = progress


class Reporter(Protocol):
    """What the loop tells its caller (the CLI draws a rich progress bar from it)."""

    def start(self, *, run_dir: Path, first_epoch: int, max_epochs: int, steps_per_epoch: int) -> None: ...
    def step(self) -> None: ...
    def epoch(self, record: dict[str, Any]) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


class SilentReporter:
    def start(self, **_: Any) -> None: pass
    def step(self) -> None: pass
    def epoch(self, record: dict[str, Any]) -> None: pass
    def note(self, message: str) -> None: pass
    def stop(self) -> None: pass


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LineReporter:
    """One plain line per epoch on a stream (stderr by default), for logs that are not a
    terminal (nohup, SLURM, `2>&1 | tee`): epoch, step, the training loss and each term's
    contribution, the validation metrics, steps/s, elapsed time and the ETA to max_epochs
    (patience may stop the run sooner). Lines are at most one per `min_seconds`, so that very
    short epochs do not flood a log; the last epoch is always printed (at `stop`)."""

    def __init__(self, stream: Any = None, min_seconds: float = 5.0):
        import sys

        self.stream = stream if stream is not None else sys.stderr
        self.min_seconds = min_seconds
        self._pending: dict[str, Any] | None = None

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def start(self, *, run_dir: Path, first_epoch: int, max_epochs: int, steps_per_epoch: int) -> None:
        self.first_epoch, self.max_epochs = first_epoch, max_epochs
        self.steps = 0
        self.started = self._last_line = time.perf_counter()
        self._printed_any = False
        self._write(f"Training into {run_dir} (epochs {first_epoch + 1}-{max_epochs}, {steps_per_epoch} steps each)")

    def step(self) -> None:
        self.steps += 1

    def epoch(self, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        if not self._printed_any or record["epoch"] >= self.max_epochs or now - self._last_line >= self.min_seconds:
            self._write(self.line(record, now))
            self._last_line, self._printed_any, self._pending = now, True, None
        else:
            self._pending = record

    def line(self, record: dict[str, Any], now: float) -> str:
        elapsed = now - self.started
        done = record["epoch"] - self.first_epoch
        eta = (self.max_epochs - record["epoch"]) * elapsed / done if done > 0 else 0.0
        parts = [f"epoch {record['epoch']}/{self.max_epochs}", f"step {record['step']}",
                 f"train_loss {record['train_loss']:.4g}"]
        parts += [f"{k} {record[k]:.4g}" for k in record if k.startswith(TERM_LOSS_PREFIX)]
        parts += [f"{k} {record[k]:.4g}" for k in ("val_loss", "val_neg_elbo") if record.get(k) is not None]
        parts += [f"best {record['best_val']:.4g} @ {record['best_epoch']}"]
        if record.get("lr") is not None:
            parts.append(f"lr {record['lr']:.3g}")
        parts += [f"{self.steps / elapsed if elapsed > 0 else 0.0:.1f} steps/s", f"elapsed {_clock(elapsed)}",
                  f"ETA {_clock(eta)}"]
        return "  ".join(parts)

    def note(self, message: str) -> None:
        self._write(f"Note: {message}")

    def stop(self) -> None:
        if self._pending is not None:
            self._write(self.line(self._pending, time.perf_counter()))
            self._pending = None


@dataclass
class Setup(Components):
    """The components of a run (see `elbokit.build.Components`) and where it is written."""

    run_dir: Path | None = None
    resume_from: Path | None = None
    threads_from: str = "train.threads"  # where the thread count came from (run.json)
    resume_action: str | None = None  # see _resume_action


# -- preparing ---------------------------------------------------------------------------
def prepare(cfg: dict[str, Any], *, resume: str | Path | None = None, registry: Any = None) -> Setup:
    """Build and check the data, prior, model and objective of `cfg` (resolved), or of the run
    `resume`, through `elbokit.build`; raise ElbokitError on any problem. Writes nothing."""
    from .plugins import get_registry

    stored, action = None, None
    if resume is not None:
        rd = run_mod.RunDir(resume)
        if not rd.checkpoint_path("last").is_file():
            rd.read_config()  # the clearer error first, when it is not a run at all
            raise ElbokitError(f"{rd.path} has no checkpoint to resume from (checkpoints/last.safetensors is missing).")
        provenance_warnings = run_mod.check_metadata(rd, registry or get_registry())
        _, meta = rd.read_checkpoint("last")
        stored = rd.stored_run(meta=meta)
        run_dir = rd.path
        action = _resume_action(meta, rd.read_config()["train"], cfg["train"])
    else:
        run_dir = Path(cfg["output"]["out"]) if cfg["output"]["out"] else run_mod.default_run_dir()
        run_mod.check_new_run_dir(run_dir)
    if cfg["output"]["tensorboard"]:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ElbokitError("--tensorboard needs the optional tensorboard package: pip install 'elbokit[tensorboard]' (or pip install tensorboard).")
    if cfg["output"]["mlflow"]:
        from .tracking import _mlflow

        _mlflow()  # one line naming the package when it is missing, before anything is written
    components = build_components(cfg, registry=registry, stored=stored)
    components.checked = precheck(components)
    if resume is not None:
        components.notes.extend(provenance_warnings)
    return Setup(**{f.name: getattr(components, f.name) for f in fields(Components)}, run_dir=run_dir,
                 resume_from=run_mod.checkpoint_path(run_dir, "last") if resume is not None else None,
                 resume_action=action)


def _resume_action(state: dict[str, Any], stored: dict[str, Any], asked: dict[str, Any]) -> str:
    """What resuming a run does, from its last checkpoint's state, its stored [train] config and
    the resumed one: "continue" (epochs are left), "extend" (stopped by patience, and a larger
    max_epochs was asked for: the patience counter starts again from 0), or "complete"
    (nothing is left to do; the run and its summary stay as they are)."""
    if state["bad_epochs"] >= asked["patience"]:
        asked_more = asked["max_epochs"] != stored["max_epochs"] and asked["max_epochs"] > state["epoch"]
        return "extend" if asked_more else "complete"
    return "continue" if state["epoch"] < asked["max_epochs"] else "complete"


# -- validation --------------------------------------------------------------------------
def kl_to_prior(batch: Any, prior: Any) -> torch.Tensor:
    """KL(q(z|x) || p(z)) per example by the `auto` decision of `elbokit.estimators.kl_to_prior`:
    closed form where torch has a rule down to the base distributions, else the one-sample
    Monte-Carlo estimate log q(z|x) - log p(z) at the batch's z."""
    from .estimators import kl_to_prior as decide

    return decide(batch.posterior, batch.z, prior, "auto")[0]


@torch.no_grad()
def validation_metrics(setup: Setup, split: Any, seed: int) -> dict[str, float]:
    """The selection metrics on a split, deterministic (fixed seed, forked RNG):
    `neg_elbo` = recon + KL (KL by the 'auto' estimator: analytic where registered, else one
    Monte-Carlo sample), in nats per example in the standardised space (None for a prior
    without log_prob), with `recon` and `kl`; and `loss`, the objective's own loss."""
    model, objective = setup.model, setup.objective
    was_training = model.training
    model.eval()
    objective.eval()
    n = split.x.shape[0]
    batch_size = setup.config["train"]["batch_size"]
    # Near-equal chunks (never a 1-row remainder, which batch estimators cannot handle).
    chunks = torch.arange(n, device=split.x.device).tensor_split(max(1, math.ceil(n / batch_size)))
    has_log_prob = setup.prior.has_log_prob
    devices = [split.x.device] if split.x.device.type == "cuda" else []
    sums = {"recon": 0.0, "kl": 0.0, "loss": 0.0}
    totals = {k: torch.zeros((), dtype=split.x.dtype, device=split.x.device) for k in sums}  # x may be streamed
    recon_term, kl_term = _same_as_validation(setup)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for idx in chunks:
            x = split.x[idx]
            x_pos = split.x_pos[idx] if setup.needs_positives else None
            batch = model(x, x_pos, dataset_size=setup.objective.dataset_size)
            out = objective(batch)
            recon = out.term_values[recon_term] if recon_term else -setup.likelihood.log_prob(x, batch.x_recon)
            totals["recon"] += recon.sum()
            if has_log_prob:
                totals["kl"] += (out.term_values[kl_term] if kl_term else kl_to_prior(batch, setup.prior)).sum()
            totals["loss"] += out.loss * len(idx)
    sums = {k: float(v) / n for k, v in totals.items()}
    model.train(was_training)
    objective.train(was_training)
    out: dict[str, Any] = {"recon": sums["recon"], "loss": sums["loss"]}
    if has_log_prob:
        out["kl"] = sums["kl"]
        out["neg_elbo"] = sums["recon"] + sums["kl"]
    else:
        out["neg_elbo"] = None
    return out


def _same_as_validation(setup: Setup) -> tuple[str | None, str | None]:
    """The names of the objective's terms whose reported values are, bit for bit, what the
    validation pass computes (the built-in recon term with the validation's likelihood; the
    built-in kl term with the analytic or auto estimator, both the same call as validation's
    `auto`), so that validation reads them instead of computing them again; None for none."""
    from .default_plugins.estimators import AnalyticKL, AutoKL
    from .default_plugins.terms import KL, Reconstruction

    recon = kl = None
    for name, term in setup.objective.terms.items():
        if recon is None and type(term) is Reconstruction and term.likelihood is setup.likelihood:
            recon = name
        if kl is None and type(term) is KL and type(term.estimator) in (AnalyticKL, AutoKL) and term.free_bits == 0:
            kl = name
    return recon, kl


# -- the loop ----------------------------------------------------------------------------
def _parameters(model: Any, objective: Any) -> list[torch.nn.Parameter]:
    # A prior attached to the model may hold the model's parameters too: count each once.
    seen: set[int] = set()
    params = []
    for p in [*model.parameters(), *objective.parameters()]:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _select_metric(setup: Setup) -> str:
    return "neg_elbo" if setup.config["train"]["select"] == "elbo" and setup.prior.has_log_prob else "loss"


def train(config: dict[str, Any] | None = None, *, resume: str | Path | None = None,
          reporter: Reporter | None = None, registry: Any = None) -> dict[str, Any]:
    """Train a model and return the summary (also written to RUN_DIR/summary.json).

    config: a resolved config (`elbokit.config.resolve(...)`); with `resume`, the run's own
    config.toml is used and `config` may only change the keys in RESUMABLE_OVERRIDES.
    The summary has at least run_dir, epochs, steps, best_val, best_epoch, select_metric,
    train_seconds and steps_per_second; and `test` when `elbokit.evaluate.evaluate_run` exists.
    """
    reporter = reporter or SilentReporter()
    if resume is not None:
        cfg = resume_config(resume, config)
    else:
        cfg = config if config is not None else config_mod.resolve()
    group = None
    if _world_size() > 1:  # started by torchrun: see elbokit.distributed and docs/distributed.md
        from .distributed import ProcessGroup, check_batch_split

        check_batch_split(cfg["train"]["batch_size"], _world_size())
        group = ProcessGroup.start(cfg["train"]["device"])
        cfg["train"]["device"] = group.device_for(cfg["train"]["device"])
        if not group.is_writer:
            reporter = SilentReporter()
    with _threads(cfg) as (cfg, threads_from):
        setup = prepare(cfg, resume=resume, registry=registry)
        setup.threads_from = threads_from
        if group is not None:
            check_batch_split(min(cfg["train"]["batch_size"], setup.splits["train"].x.shape[0]), group.world_size)
        for note in setup.notes:
            reporter.note(note)
        return Trainer(setup, reporter, group=group).fit()


def check(config: dict[str, Any] | None = None, *, resume: str | Path | None = None, registry: Any = None) -> Setup:
    """Every check `train` makes before it writes anything (build, contracts, one training
    step on a batch), with the same threads; writes nothing. `setup.config` is the config that
    would be recorded and `setup.run_dir` where the run would go (`elbokit train --print-config`)."""
    cfg = resume_config(resume, config) if resume is not None else (config or config_mod.resolve())
    with _threads(cfg) as (cfg, threads_from):
        setup = prepare(cfg, resume=resume, registry=registry)
        setup.threads_from = threads_from
        return setup


@contextlib.contextmanager
def _threads(cfg: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """Run with the config's torch thread count (0: the default policy, `build.default_threads`),
    the effective count written into the config; the caller's setting is restored afterwards.
    Reductions split across threads round differently, so the count is part of a run's numbers."""
    cfg, threads_from = build.resolve_threads(cfg)
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg["train"]["threads"])
    try:
        yield cfg, threads_from
    finally:
        torch.set_num_threads(previous)


def _world_size() -> int:
    """The number of processes torchrun started (1 for a plain run, which imports nothing more)."""
    import os

    if os.environ.get("WORLD_SIZE", "1") == "1":
        return 1
    from .distributed import world_size_from_environment

    return world_size_from_environment()


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The run's config with the allowed changes from `overrides` (a partial config)."""
    cfg = run_mod.read_config(run_dir)
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if key in RESUMABLE_OVERRIDES.get(section, set()):
                cfg[section][key] = value
            elif (section == "output" and key == "out") or cfg.get(section, {}).get(key) == value:
                continue  # the same value (e.g. a full config passed back in) is no change
            else:
                raise ElbokitError(f"{section}.{key} cannot change when resuming (only "
                                   f"{', '.join(sorted(k for s in RESUMABLE_OVERRIDES.values() for k in s))} can).")
    return config_mod.validate(cfg)


class _EpochTally:
    """An epoch's running sums of the loss and of each term, and its first non-finite value,
    kept on the device and read once per epoch (the steps never synchronise).

    Per step it costs three small operations (stacking the step's values, adding them to the
    sums, keeping them as the step's row): the first step with a non-finite term or loss is
    found from those rows only when asked, instead of with a dozen tiny tensor operations in
    every step. The sums are float32 and added step by step in order, so a resumed epoch adds
    up exactly as an uninterrupted one."""

    def __init__(self, names: list[str], start: int, steps: int, device: torch.device,
                 loss_sum: torch.Tensor | None = None, term_sums: dict[str, torch.Tensor] | None = None,
                 first_bad: torch.Tensor | None = None):
        self.names, self.start = names, start
        # Columns: the terms in order, then the weighted loss (the index first_bad reports).
        self.sums = torch.zeros(len(names) + 1, device=device)
        if loss_sum is not None:
            self.sums.copy_(torch.stack([*(term_sums[n].to(device) for n in names), loss_sum.to(device)]))
        # The first step whose loss was not finite, and the first non-finite column there
        # (len(names): the weighted sum overflowed although every term was finite); -1: none.
        self.first_bad = (first_bad.to(device) if first_bad is not None
                          else torch.full((2,), -1, dtype=torch.long, device=device))
        self.rows: torch.Tensor | None = None
        self.steps = steps

    def add(self, i: int, out: Any) -> None:
        values = torch.stack([*(out.terms[n].detach() for n in self.names), out.loss.detach()])
        self.sums.add_(values)
        if self.rows is None:
            self.rows = values.new_empty(self.steps - self.start, values.shape[0])
        self.rows[i - self.start] = values

    def totals(self, done: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(loss_sum, term_sums, first_bad) over the steps before `done` (an index in the epoch)."""
        sums = self.sums.clone()
        term_sums = {n: sums[k] for k, n in enumerate(self.names)}
        first_bad = self.first_bad
        if self.rows is not None and done > self.start:
            bad = ~torch.isfinite(self.rows[:done - self.start])
            bad_steps = bad.any(1)
            found = (first_bad[0] < 0) & bad_steps.any()
            step = bad_steps.long().argmax()
            first_bad = torch.where(found, torch.stack([step + self.start, bad[step].long().argmax()]), first_bad)
        return sums[-1], term_sums, first_bad


class Trainer:
    """Runs the epochs of a prepared `Setup`, writing the run directory as it goes."""

    def __init__(self, setup: Setup, reporter: Reporter | None = None, run: run_mod.RunDir | None = None,
                 group: Any = None):
        self.setup = setup
        self.reporter = reporter or SilentReporter()
        # The run directory, holding its lock: given (a resume that locked it before building),
        # or created/opened by fit(); fit() releases it when it returns or raises.
        self.run = run
        cfg = setup.config["train"]
        self.model, self.objective = setup.model, setup.objective
        # foreach: one call per update operation for all the parameters instead of one per
        # tensor; the same updates bit for bit as torch's default on CPU (tests/test_loop_bookkeeping.py)
        # and faster for small models, where Adam's per-tensor calls are a visible part of a step.
        self.optimizer = torch.optim.Adam(_parameters(self.model, self.objective), lr=cfg["lr"], foreach=True)
        self.lr_per_step, self.lr_per_epoch, self._lr_step_limit = self._lr_schedulers()
        self.data_order = torch.Generator().manual_seed(cfg["seed"])
        self.select_metric = _select_metric(setup)
        self.state: dict[str, Any] = {"epoch": 0, "step": 0, "best_value": None, "best_epoch": 0,
                                      "bad_epochs": 0, "train_seconds": 0.0}
        self.tb = None
        self.mlflow: Any = None  # elbokit.tracking.MlflowLogger with [output] mlflow, in process 0
        self.partial: dict[str, Any] | None = None  # an interrupted epoch's progress, from a checkpoint
        self.stop_signal: int | None = None  # set by the SIGINT/SIGTERM handler during fit()
        # Checkpoints are written at most every train.checkpoint_seconds: a best reached in
        # between is copied at once (under a ms) and serialised and written with the next last
        # checkpoint, or dropped unwritten when a better one replaces it first.
        self._pending_best: run_mod.CheckpointSnapshot | None = None
        self._pending_best_step = -1  # the training step the pending best was copied at
        self._last_write = time.perf_counter()
        self._written_epoch = 0  # the epoch of checkpoints/last on disk
        # Several processes (elbokit.distributed.ProcessGroup): the DDP-wrapped step, and process
        # 0 alone writes the run directory. None in a plain run.
        self.group = group
        self.step_module = group.prepare(self.model, self.objective, cfg["seed"]) if group is not None else None

    def _lr_schedulers(self) -> tuple[Any, Any, int]:
        """The learning-rate schedule of train.lr_schedule and train.lr_warmup_steps, from
        torch.optim.lr_scheduler: (per-step scheduler or None, per-epoch scheduler or None,
        the number of steps after which the per-step one holds its last value)."""
        from torch.optim import lr_scheduler as sched

        cfg = self.setup.config["train"]
        n = self.setup.splits["train"].x.shape[0]
        steps_per_epoch = n // min(cfg["batch_size"], n)
        warmup = cfg["lr_warmup_steps"]
        opt = self.optimizer
        # Step i (from 0) uses lr * (i + 1) / W: LinearLR from 1/W to 1 over W - 1 steps.
        warm = sched.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1) if warmup >= 2 else None
        per_step, limit = warm, warmup
        if cfg["lr_schedule"] == "cosine":
            length = max(1, cfg["lr_cosine_epochs"] * steps_per_epoch - warmup)
            cosine = sched.CosineAnnealingLR(opt, T_max=length, eta_min=cfg["lr_min"])
            per_step = sched.SequentialLR(opt, [warm, cosine], milestones=[warmup]) if warm is not None else cosine
            limit = warmup + length
        per_epoch = None
        if cfg["lr_schedule"] == "step":
            per_epoch = sched.StepLR(opt, step_size=cfg["lr_step_epochs"], gamma=cfg["lr_gamma"])
        elif cfg["lr_schedule"] == "plateau":
            per_epoch = sched.ReduceLROnPlateau(opt, mode="min", factor=cfg["lr_gamma"], patience=cfg["lr_plateau_patience"])
        return per_step, per_epoch, limit

    def _lr_scheduler_states(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in (("per_step", self.lr_per_step), ("per_epoch", self.lr_per_epoch))
                if s is not None}

    def _set_base_lr(self, lr: float) -> None:
        """--lr changed on resume: the whole schedule scales by the new/old ratio, from where it is."""
        for group in self.optimizer.param_groups:
            old = group.get("initial_lr", group["lr"])
            group["lr"] = group["lr"] * lr / old if (self.lr_per_step or self.lr_per_epoch) else lr
            if "initial_lr" in group:
                group["initial_lr"] = lr
        for scheduler in (self.lr_per_step, self.lr_per_epoch):
            for s in [scheduler, *getattr(scheduler, "_schedulers", [])]:
                if s is not None and hasattr(s, "base_lrs"):
                    s.base_lrs = [lr for _ in s.base_lrs]

    # -- run directory ----------------------------------------------------------------
    def _create_run_dir(self) -> run_mod.RunDir:
        """The new run directory, complete (config, run.json, data record, the initial state as
        checkpoints/last at epoch 0) and locked, or absent: see `RunDir.create`."""
        s = self.setup
        world_size = self.group.world_size if self.group is not None else 1
        return run_mod.RunDir.create(s.run_dir, config=s.config, dataset=s.dataset, indices=s.indices,
                                     standardizer=s.standardizer,
                                     metadata={**run_mod.run_metadata(s, threads_from=s.threads_from, world_size=world_size),
                                               "name": s.config["output"]["name"], "tags": s.config["output"]["tags"]},
                                     checkpoint=self.checkpoint_bytes())

    def _checkpoint_state(self) -> dict[str, Any]:
        s = self.setup
        return {**self.state, "select_metric": self.select_metric,
                "prior": {"name": s.config["prior"]["name"], "spec": s.prior.spec()},  # as looked up (PLUGIN:NAME too)
                "model": {"name": s.config["model"]["name"], "data_dim": s.dataset.dim,
                          "latent_dim": s.config["model"]["latent_dim"], "options": s.config["model"]["options"]},
                "dataset_size": len(s.indices["train"]), "has_positives": s.splits["train"].x_pos is not None,
                "terms": s.objective.term_names, "lr_schedulers": self._lr_scheduler_states()}

    def save(self, which: str, progress: dict[str, Any] | None = None) -> None:
        """Checkpoint `which` (best or last). With `progress` (an interrupted epoch), the
        epoch's permutation, the steps done and its running sums go along, so that resuming
        finishes the epoch exactly as an uninterrupted run would."""
        self.run.write_checkpoint(which, self.checkpoint_bytes(progress))

    def checkpoint_bytes(self, progress: dict[str, Any] | None = None) -> bytes:
        """The checkpoint of the current state as a safetensors file's bytes (see `save`)."""
        return self.checkpoint_snapshot(progress).to_bytes()

    def checkpoint_snapshot(self, progress: dict[str, Any] | None = None) -> run_mod.CheckpointSnapshot:
        """The checkpoint of the current state, copied now and serialised when written."""
        state, extra = self._checkpoint_state(), None
        if self.group is not None:
            state["world_size"] = self.group.world_size
            extra = dict(self.group.rng_states)
        if progress is not None:
            state["partial_epoch"] = {"steps_done": progress["steps_done"], "terms": list(progress["term_sums"])}
            extra = {**(extra or {}), "partial.perm": progress["perm"], "partial.loss_sum": progress["loss_sum"],
                     "partial.first_bad": progress["first_bad"],
                     **{f"partial.terms.{k}": v for k, v in progress["term_sums"].items()}}
        return run_mod.checkpoint_snapshot(model=self.model, objective=self.objective, optimizer=self.optimizer,
                                           data_generator=self.data_order, state=state, extra=extra)

    def _write_checkpoints(self) -> None:
        """Write the pending best (copied when it was reached) and then the last checkpoint.
        Best before last: a kill between the two resumes from the older last checkpoint, whose
        replay reaches the same best again."""
        last = None
        if self._pending_best is not None:
            best = self._pending_best.to_bytes()
            self.run.write_checkpoint("best", best)
            if self._pending_best_step == self.state["step"]:
                last = best  # the best is the current state: the same bytes
            self._pending_best = None
        self.run.write_checkpoint("last", last if last is not None else self.checkpoint_bytes())
        self._last_write = time.perf_counter()
        self._written_epoch = self.state["epoch"]

    def _restore(self, path: Path) -> None:
        tensors, meta = run_mod.read_checkpoint(path)
        run_mod.load_module_state(self.model, run_mod._sub(tensors, "model."), "model", path)
        run_mod.load_module_state(self.objective, run_mod._sub(tensors, "objective."), "objective", path)
        run_mod.load_optimizer_state(self.optimizer, tensors, meta)
        for name, scheduler in (("per_step", self.lr_per_step), ("per_epoch", self.lr_per_epoch)):
            if scheduler is not None and name in meta.get("lr_schedulers", {}):
                scheduler.load_state_dict(meta["lr_schedulers"][name])
        self._set_base_lr(self.setup.config["train"]["lr"])  # --lr may change on resume
        run_mod.set_rng_state(tensors, meta["rng"], self.data_order)
        note = None
        if self.group is not None:
            note = self.group.restore_rng_states(tensors, meta.get("world_size", 1))
        elif meta.get("world_size", 1) > 1:
            note = (f"resumed on 1 process from a checkpoint written by {meta['world_size']}: the global batch and "
                    "the objective are the same, the codes' random noise is not (the run is not bit-exact).")
        if note:
            self.setup.notes.append(note)
            self.reporter.note(note)
        for key in self.state:
            self.state[key] = meta[key]
        self._written_epoch = self.state["epoch"]
        partial = meta.get("partial_epoch")
        if partial:
            own = lambda t: t  # noqa: E731 - a one-process checkpoint holds one running sum
            if tensors["partial.loss_sum"].ndim:  # one per process (see elbokit.distributed.stack_sums)
                from .distributed import own_running_sum

                own = lambda t: own_running_sum(t, self.group)  # noqa: E731
            self.partial = {"steps_done": partial["steps_done"], "perm": tensors["partial.perm"],
                            "loss_sum": own(tensors["partial.loss_sum"]), "first_bad": tensors["partial.first_bad"],
                            "term_sums": {k: own(tensors[f"partial.terms.{k}"]) for k in partial["terms"]}}

    def _stop_requested(self) -> bool:
        """A stop was asked (SIGINT/SIGTERM); with several processes, asked of any of them."""
        if self.group is not None:
            self.stop_signal = self.group.agree_to_stop(self.stop_signal)
        return self.stop_signal is not None

    def _agreed(self, action: Any) -> Any:
        """`action()`, and with several processes the agreement that it worked everywhere: if it
        failed on any process, every process stops (with its own error, or the first one's)."""
        if self.group is None:
            return action()
        try:
            result, error = action(), None
        except BaseException as exc:
            result, error = None, exc
        messages = self.group.gather_errors(None if error is None else (str(error) or type(error).__name__))
        if error is not None:
            raise error
        first = next((m for m in messages if m), None)
        if first is not None:
            raise ElbokitError(first)
        return result

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop at the next step boundary, where
        it saves an exact checkpoint; a second one stops at once (KeyboardInterrupt: the
        checkpoints on disk stay whole, the last complete epoch is kept). Only the main
        thread can install signal handlers; elsewhere Ctrl-C is a plain KeyboardInterrupt."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.stop_signal is not None and self.group is None:
                raise KeyboardInterrupt
            # With several processes a second signal is the launcher passing the first one on
            # (torchrun, SLURM signal every process): the agreed stop proceeds; the launcher
            # kills a process that does not stop within its shutdown timeout.
            self.stop_signal = self.stop_signal or signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- the loop ---------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the end (max_epochs or patience), writing the run directory; return the summary."""
        s = self.setup
        if s.resume_action == "complete":
            summary = run_mod.RunDir(s.run_dir).read_summary()
            if summary is not None:  # finished: nothing to do, nothing written
                return {**summary, "already_complete": True}
        writer = self.group is None or self.group.is_writer
        if s.resume_from is not None:
            def open_and_restore() -> Any:
                if not writer:  # process 0 alone holds the lock and writes
                    from .distributed import NoWrites

                    self._restore(s.resume_from)
                    if s.resume_action == "extend":
                        self.state["bad_epochs"] = 0
                    return NoWrites()
                try:
                    run = self.run if self.run is not None else run_mod.RunDir.open(s.run_dir)
                except OSError as exc:  # e.g. no lock file yet (an older layout) in a directory we may not write
                    kept = run_mod.read_checkpoint(s.resume_from)[1]["epoch"]
                    raise RunWriteFailed(s.run_dir, kept, exc) from None
                try:
                    self._restore(s.resume_from)
                    run.read_metrics()  # a damaged metrics.jsonl is refused before anything is written
                    run.begin_writing()
                    self._record_status(None, run)  # running again: how it ended before no longer holds
                    if s.resume_action == "extend":
                        self.state["bad_epochs"] = 0  # a larger budget: patience counts again from here
                    run.truncate_metrics(self.state["epoch"])
                    run.write_config(s.config)  # records a changed max_epochs, lr, ...
                except OSError as exc:
                    run.close()
                    raise RunWriteFailed(s.run_dir, self._written_epoch, exc) from None
                except BaseException:
                    run.close()
                    raise
                return run

            self.run = self._agreed(open_and_restore)
        else:
            if self.group is not None:
                self.group.gather_rng_states()  # for the initial checkpoint

            def create() -> Any:
                if not writer:
                    from .distributed import NoWrites

                    return NoWrites()
                try:
                    return self._create_run_dir()
                except OSError as exc:
                    raise RunWriteFailed(s.run_dir, None, exc) from None

            self.run = self._agreed(create)
        try:
            return self._fit()
        except OSError as exc:
            raise RunWriteFailed(s.run_dir, self._written_epoch, exc) from None
        finally:
            self.run.close()

    def _fit(self) -> dict[str, Any]:
        s, cfg = self.setup, self.setup.config["train"]
        if s.config["output"]["tensorboard"] and (self.group is None or self.group.is_writer):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(s.run_dir / "tensorboard"))
        if s.config["output"]["mlflow"] and (self.group is None or self.group.is_writer):
            self._start_mlflow()
        x, x_pos = s.splits["train"].x, s.splits["train"].x_pos if s.needs_positives else None
        n, batch_size = x.shape[0], min(cfg["batch_size"], x.shape[0])
        steps_per_epoch = n // batch_size  # the incomplete last batch is dropped, as DataLoader(drop_last=True)
        self.reporter.start(run_dir=s.run_dir, first_epoch=self.state["epoch"], max_epochs=cfg["max_epochs"],
                            steps_per_epoch=steps_per_epoch)
        steps_this_process, process_start = 0, time.perf_counter()
        try:
            with self._stop_on_signals():
                while self.state["epoch"] < cfg["max_epochs"] and self.state["bad_epochs"] < cfg["patience"]:
                    if self._stop_requested():
                        raise TrainingInterrupted(s.run_dir, self.state["epoch"], 0, self.stop_signal)
                    t0 = time.perf_counter()
                    steps_before = self.partial["steps_done"] if self.partial else 0
                    try:
                        record = self._epoch(x, x_pos, batch_size, steps_per_epoch)
                    except _StopRequested as stop:
                        self.state["train_seconds"] += time.perf_counter() - t0
                        if self._pending_best is not None:
                            self._write_checkpoints()  # the complete epochs first, then the partial one
                        self.save("last", progress=stop.progress)
                        if self.group is not None:
                            self.group.barrier()  # no process exits (and is reported failed) before it is saved
                        raise TrainingInterrupted(s.run_dir, self.state["epoch"], stop.progress["steps_done"],
                                                  self.stop_signal) from None
                    steps_this_process += steps_per_epoch - steps_before
                    self.state["train_seconds"] += time.perf_counter() - t0
                    record["seconds"] = round(self.state["train_seconds"], 3)
                    record = flat_record(record)  # the names of elbokit.metrics, one per quantity
                    self.run.append_metrics(record)
                    if record["improved"]:
                        self._pending_best = self.checkpoint_snapshot()
                        self._pending_best_step = self.state["step"]
                    every = cfg["checkpoint_seconds"]
                    if every <= 0 or time.perf_counter() - self._last_write >= every:
                        self._write_checkpoints()
                    if self.tb is not None:
                        self._tensorboard(record)
                    if self.mlflow is not None:
                        self.mlflow.log_metrics(record)
                    self.reporter.epoch(record)
                if self._written_epoch != self.state["epoch"] or self._pending_best is not None:
                    self._write_checkpoints()
        except TrainingDiverged as exc:
            self._end_mlflow("FAILED")
            # The model is no longer finite: keep the last checkpoint on disk, but write a best
            # reached since (it was copied when it was reached, from a finite model).
            if self._pending_best is not None:
                self.run.write_checkpoint("best", self._pending_best.to_bytes())
            self._record_status("diverged", reason=str(exc).splitlines()[0], epoch=self.state["epoch"] + 1,
                                kept_epoch=self._written_epoch)
            if self.group is not None:
                self.group.barrier()
            raise
        except TrainingInterrupted as exc:
            self._end_mlflow("KILLED")
            self._record_status("interrupted", reason=str(exc), epoch=exc.epoch, step_in_epoch=exc.step_in_epoch,
                                signal=exc.signum)
            raise
        except KeyboardInterrupt:
            self._end_mlflow("KILLED")
            self._record_status("interrupted", reason=f"Interrupted after epoch {self.state['epoch']}.",
                                epoch=self.state["epoch"], step_in_epoch=0, signal=None)
            raise TrainingInterrupted(s.run_dir, self.state["epoch"]) from None
        except BaseException as exc:
            self._end_mlflow("KILLED")
            if not isinstance(exc, OSError):  # a failing disk would not take the record either
                self._record_status("stopped", reason=(str(exc).splitlines() or [type(exc).__name__])[0]
                                    or type(exc).__name__, epoch=self.state["epoch"])
            raise
        finally:
            self.reporter.stop()
            if self.tb is not None:
                self.tb.close()
        seconds_this_process = time.perf_counter() - process_start
        try:
            summary = self._finish(steps_this_process, seconds_this_process)
        except BaseException:
            self._end_mlflow("FAILED")
            raise
        self._end_mlflow("FINISHED")
        return summary

    def _start_mlflow(self) -> None:
        """An MLflow run for this training ([output] mlflow): the resolved config as parameters
        and, on a resume, the records of the epochs already done, so the MLflow run is whole."""
        from .tracking import MlflowLogger

        s, target = self.setup, self.setup.config["output"]["mlflow"]
        tags = {"elbokit.run_dir": str(Path(s.run_dir).resolve()),
                **{f"elbokit.tag.{t}": "1" for t in s.config["output"]["tags"]}}
        if s.resume_from is not None:
            tags["elbokit.resumed_at_epoch"] = str(self.state["epoch"])
        self.mlflow = MlflowLogger(target if isinstance(target, str) else None,
                                   runs_dir=Path(s.run_dir).resolve().parent,
                                   run_name=s.config["output"]["name"] or Path(s.run_dir).name, tags=tags)
        import tomllib

        # The config as config.toml holds it (as `elbokit.tracking.log_run` logs a run directory).
        self.mlflow.start(tomllib.loads((Path(s.run_dir) / "config.toml").read_text(encoding="utf-8")))
        if s.resume_from is not None:
            for record in self.run.read_metrics():
                self.mlflow.log_metrics(record)

    def _end_mlflow(self, status: str) -> None:
        """End the MLflow run with `status` (FINISHED, FAILED, KILLED), logging the summary and
        the run's files and figures (figures only for a finished run); at most once."""
        logger, self.mlflow = self.mlflow, None
        if logger is not None:
            logger.finish(self.setup.run_dir, status, plots=status == "FINISHED")

    def _epoch(self, x: torch.Tensor, x_pos: torch.Tensor | None, batch_size: int, steps: int) -> dict[str, Any]:
        from .io import crash_point

        s, cfg = self.setup, self.setup.config["train"]
        self.model.train()
        self.objective.train()
        dev = x.device
        names = self.objective.term_names
        if self.partial is not None:  # resumed from a checkpoint saved in the middle of this epoch
            p, self.partial = self.partial, None
            start, perm = p["steps_done"], p["perm"].to(dev)
            tally = _EpochTally(names, start, steps, dev, p["loss_sum"], p["term_sums"], p["first_bad"])
        else:
            start, perm = 0, torch.randperm(x.shape[0], generator=self.data_order).to(dev)
            tally = _EpochTally(names, 0, steps, dev)
        dataset_size = self.objective.dataset_size
        params = self.optimizer.param_groups[0]["params"]
        epoch = self.state["epoch"] + 1
        last_terms: dict[str, torch.Tensor] | None = None
        for i in range(start, steps):
            if self._stop_requested():
                loss_sum, term_sums, first_bad = tally.totals(i)
                if self.group is not None:
                    first_bad = self.group.reduce_epoch(loss_sum, term_sums, first_bad, len(names))[2]
                self._check_finite(epoch, first_bad, i - 1, last_terms)  # never save a diverged state
                if self.group is not None:
                    self.group.gather_rng_states()
                    # Every process's own running sums, so that resuming adds them up as before.
                    loss_sum, term_sums = self.group.stack_sums(loss_sum, term_sums)
                raise _StopRequested({"steps_done": i, "perm": perm, "loss_sum": loss_sum,
                                      "term_sums": term_sums, "first_bad": first_bad})
            idx = perm[i * batch_size:(i + 1) * batch_size]
            self.objective.global_step = self.state["step"] + i  # warm-up factors: a function of this alone
            # The positives of the global batch: the data's, or fresh ones drawn for this step
            # from (train.seed, step) alone (data.positives), so that a resume draws the same.
            rows_pos = None if x_pos is None else (
                x_pos[idx] if s.positives is None else s.positives.draw(x[idx], self.objective.global_step))
            try:
                if self.step_module is not None:  # this process's rows of the global batch, through DDP
                    idx = self.group.shard(idx)
                    rows_pos = None if rows_pos is None else self.group.shard(rows_pos)
                    out = self.step_module(x[idx], rows_pos, dataset_size)
                else:
                    batch = self.model(x[idx], rows_pos, dataset_size=dataset_size)
                    out = self.objective(batch)
            except ValueError:
                # torch.distributions refuses NaN/Inf parameters: the update of the previous
                # step made the model non-finite. Anything else is a bug and is raised as is.
                loss_sum, term_sums, first_bad = tally.totals(i)
                if self.group is not None:
                    loss_sum, term_sums, first_bad = self.group.reduce_epoch(loss_sum, term_sums, first_bad, len(names))
                self._check_finite(epoch, first_bad, i - 1, last_terms)
                raise
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            self.optimizer.step()
            if self.lr_per_step is not None and self.lr_per_step.last_epoch < self._lr_step_limit:
                self.lr_per_step.step()
            tally.add(i, out)
            last_terms = out.terms
            self.reporter.step()
            crash_point("step", "train")
        loss_sum, term_sums, first_bad = tally.totals(steps)
        if self.group is not None:
            loss_sum, term_sums, first_bad = self.group.reduce_epoch(loss_sum, term_sums, first_bad, len(names))
        self._check_finite(epoch, first_bad, steps - 1, last_terms)
        self.state["epoch"] = epoch
        self.state["step"] += steps
        if self.group is not None:
            with self.group.local_objective(self.objective):  # every process, the whole split
                val = validation_metrics(s, s.splits["val"], cfg["val_seed"])
            self.group.gather_rng_states()
        else:
            val = validation_metrics(s, s.splits["val"], cfg["val_seed"])
        value = val[self.select_metric]
        best = self.state["best_value"]
        improved = best is None or value < best
        if improved:
            self.state.update(best_value=value, best_epoch=epoch, bad_epochs=0)
        else:
            self.state["bad_epochs"] += 1
        if isinstance(self.lr_per_epoch, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_per_epoch.step(value)
        elif self.lr_per_epoch is not None:
            self.lr_per_epoch.step()
        weights = {f"weight_{k}": self.objective.effective_weight(k, self.state["step"] - 1)
                   for k in self.objective.warmups}  # the weight of the epoch's last step
        return {"epoch": epoch, "step": self.state["step"], "lr": self.optimizer.param_groups[0]["lr"], **weights,
                "train": {"loss": float(loss_sum) / steps,
                          "terms": {k: float(v) / steps for k, v in term_sums.items()}},
                "val": val, "select_metric": self.select_metric, "improved": improved,
                "best_value": self.state["best_value"], "best_epoch": self.state["best_epoch"]}

    def _check_finite(self, epoch: int, first_bad: torch.Tensor, last_step: int,
                      last_terms: dict[str, torch.Tensor] | None) -> None:
        """Raise TrainingDiverged if a loss of this epoch, or the parameters after the update
        of step `last_step` (index in the epoch), are NaN or Inf. Called once per epoch (and
        on the way out of one): it reads the device, which the steps themselves never do."""
        bad_step, bad_index = (int(v) for v in first_bad)
        names = self.objective.term_names
        if bad_step >= 0:
            what = f"term '{names[bad_index]}'" if bad_index < len(names) else "the weighted loss"
            raise self._diverged(f"{what} became NaN or Inf at step {self.state['step'] + bad_step + 1}", epoch,
                                 term=names[bad_index] if bad_index < len(names) else None)
        params = self.optimizer.param_groups[0]["params"]
        # A NaN or Inf anywhere makes its tensor's sum non-finite: one read of a sum per tensor
        # (a fifth of the time of isfinite(p).all() on the default model); only a sum that
        # overflowed although every value is finite would need the exact check.
        if not params or bool(torch.stack([p.detach().sum() for p in params]).isfinite().all()) or \
                all(bool(torch.isfinite(p).all()) for p in params):
            return
        where = f"in the update of step {self.state['step'] + last_step + 1}" if last_step >= 0 else "before this epoch"
        cause = ""
        if last_terms:
            name, value = max(last_terms.items(), key=lambda kv: abs(float(kv[1])))
            cause = f", where the largest term was '{name}' = {float(value):.3g}"
        raise self._diverged(f"the parameters became NaN or Inf {where}{cause} (a gradient overflowed)", epoch)

    def _diverged(self, what: str, epoch: int, term: str | None = None) -> TrainingDiverged:
        from .contracts import plugin_suspects

        cfg = self.setup.config["train"]
        clip = 1.0 if not 0 < cfg["grad_clip"] <= 1.0 else cfg["grad_clip"] / 10
        kept = self._written_epoch
        # A non-finite term computed by a plugin's component: name it instead of blaming the step size.
        suspects = plugin_suspects(self.objective, self.setup.registry, term) if term is not None else None
        if suspects:
            return TrainingDiverged(
                f"Training diverged: {what} (epoch {epoch}), computed with {suspects}: check that component "
                f"with elbokit.testing or report it to the plugin's author; the last good checkpoint (epoch {kept}"
                f"{': the initial state' if kept == 0 else ''}) is kept.")
        return TrainingDiverged(
            f"Training diverged: {what} (epoch {epoch}); the last good checkpoint (epoch {kept}"
            f"{': the initial state' if kept == 0 else ''}) is kept. Resume with a lower learning rate or "
            f"gradient clipping: {resume_command(self.setup.run_dir)} --lr {cfg['lr'] / 10:g} --grad-clip {clip:g}")

    def _tensorboard(self, record: dict[str, Any]) -> None:
        step = record["epoch"]
        self.tb.add_scalar("train/loss", record["train_loss"], step)
        for k, v in term_losses(record).items():
            self.tb.add_scalar(f"train/{k}", v, step)
        for k, v in record.items():
            if k.startswith("val_") and v is not None:
                self.tb.add_scalar(f"val/{k[4:]}", v, step)
        self.tb.flush()

    def _finish(self, steps_this_process: int, seconds_this_process: float) -> dict[str, Any]:
        s, cfg = self.setup, self.setup.config["train"]
        st = self.state
        stopped = "patience" if st["bad_epochs"] >= cfg["patience"] else "max_epochs"
        summary: dict[str, Any] = {
            "run_dir": str(s.run_dir), "dataset": s.dataset.name, "terms": s.config["objective"]["terms"],
            "prior": s.prior.name, "device": str(s.device),
            "epochs": st["epoch"], "steps": st["step"], "best_epoch": st["best_epoch"],
            "best_val": st["best_value"], "select_metric": "val_" + self.select_metric,
            "space": "standardised" if s.config["data"]["standardize"] else "original",
            "stopped_by": stopped, "train_seconds": round(st["train_seconds"], 3),
            "steps_per_second": round(steps_this_process / seconds_this_process, 2) if steps_this_process and seconds_this_process > 0 else None,
            "n_train": len(s.indices["train"]), "n_val": len(s.indices["val"]), "n_test": len(s.indices["test"]),
            "objective": build.describe_objective(s),
            "threads": torch.get_num_threads(), "threads_from": s.threads_from,
            "versions": run_mod.run_metadata(s)["versions"],
            "likelihood": {"name": s.likelihood.name, "units": s.likelihood.units},
            "positives": positives_mod.describe(s.config, s.dataset, s.positives, s.needs_positives),
            "world_size": self.group.world_size if self.group is not None else 1,
        }
        if s.notes:
            summary["notes"] = list(s.notes)
        test = self._evaluate_test() if self.group is None or self.group.is_writer else None
        if test is not None:
            summary["test"] = test
        self.run.write_summary(summary)
        self._record_status(None)
        return summary

    def _record_status(self, status: str | None, run: Any = None, reason: str = "", **extra: Any) -> None:
        """Record in run.json how the run ended other than by finishing (`elbokit runs list`
        shows it: elbokit.runs.status_record), or with None clear that record (the run was
        resumed or has finished). Best effort on the way out of a failed run: the error that
        ended it is what the user must see, not a second one about run.json."""
        from .runs import status_record

        run = run if run is not None else self.run
        if not isinstance(run, run_mod.RunDir) or not run.locked:  # processes other than 0 write nothing
            return
        try:
            meta = run.read_metadata() or {}
            if status is None:
                if "status" in meta:
                    meta.pop("status")
                    run.write_metadata(meta)
                return
            run.write_metadata({**meta, "status": status_record(status, reason, **extra)})
        except (OSError, ElbokitError):
            if status is None:
                raise  # resuming or finishing: a run.json that cannot be written is the OS error it is

    def _evaluate_test(self) -> dict[str, Any] | None:
        """The best checkpoint on the test split, through `elbokit.evaluate.evaluate_run`
        when that module exists (it is optional here; nothing else couples the two)."""
        if not self.setup.config["train"]["evaluate"] or not len(self.setup.indices["test"]):
            return None
        try:
            from .evaluate import evaluate_run
        except ImportError as exc:
            if getattr(exc, "name", None) in ("elbokit.evaluate", None) or "evaluate_run" in str(exc):
                return None
            raise
        import inspect

        run = run_mod.load_run(self.setup.run_dir, "best", device=str(self.setup.device), registry=self.setup.registry)
        kwargs = {"split": "test"} if "split" in inspect.signature(evaluate_run).parameters else {}
        return evaluate_run(run, **kwargs)
