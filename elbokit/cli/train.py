"""`elbokit train`: parse options into a config, call `elbokit.train.train`, show progress."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import typer.core

from .common import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OS_ERROR, fail, handle_errors, print_json

MLFLOW_DEFAULT = "default"  # the value of a bare --mlflow


class RichReporter:
    """A rich progress bar on stderr (a terminal): epochs with the ETA to max_epochs, steps of
    the epoch, the terms and the validation metric. Outside a terminal the CLI uses
    `elbokit.train.LineReporter` (one plain line per epoch) instead."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.progress = None

    def start(self, *, run_dir: Path, first_epoch: int, max_epochs: int, steps_per_epoch: int) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console.print(f"Training into [bold]{run_dir}[/bold]")
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, transient=False,
        )
        self.progress.start()
        self.epochs = self.progress.add_task("epoch", total=max_epochs, completed=first_epoch, info="")
        self.steps = self.progress.add_task("step ", total=steps_per_epoch, info="")

    def step(self) -> None:
        # rich only redraws a few times a second; advancing is cheap and never syncs the device.
        self.progress.advance(self.steps)

    def epoch(self, record: dict[str, Any]) -> None:
        from elbokit.metrics import metric as metric_entry, term_losses

        terms = " ".join(f"{k} {v:.3g}" for k, v in term_losses(record).items())
        name = record["select_metric"]
        self.progress.update(self.epochs, completed=record["epoch"],
                             info=f"{metric_entry(name).label} {record[name]:.4g} "
                                  f"(best {record['best_val']:.4g} @ {record['best_epoch']})")
        self.progress.update(self.steps, completed=0, info=terms)

    def note(self, message: str) -> None:
        self.console.print(f"Note: {message}", highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _set(overrides: dict[str, Any], section: str, key: str, value: Any) -> None:
    if value is not None:
        overrides.setdefault(section, {})[key] = value


def _hidden(text: str) -> list[int]:
    from elbokit.errors import ElbokitError

    try:
        sizes = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ElbokitError(f"--hidden must be comma-separated layer sizes such as 400,400, got '{text}'.") from None
    return sizes


def model_option_value(text: str) -> tuple[str, Any]:
    """`--model-option KEY=VALUE`: a TOML value, or numbers separated by commas as a list
    (`hidden=200,200` or `channels=[16,32]`)."""
    from elbokit import config as config_mod
    from elbokit.errors import ElbokitError

    key, _, raw = text.partition("=")
    raw = raw.strip()
    if "," in raw or (raw.startswith("[") and raw.endswith("]")):
        items = [v.strip() for v in raw.strip("[]").split(",") if v.strip()]
        try:
            values = [float(v) for v in items]
        except ValueError:
            raise ElbokitError(f"--model-option '{text}': a list must hold numbers, e.g. hidden=200,200.") from None
        if not key.strip() or not values:
            raise ElbokitError(f"--model-option must look like key=value, got '{text}'.")
        return key.strip(), [int(v) if v.is_integer() else v for v in values]
    return config_mod.parse_assignment(text, "--model-option")


def config_overrides(*, data: Optional[str] = None, data_seed: Optional[int] = None, n: Optional[int] = None,
                     data_dim: Optional[int] = None, data_latent_dim: Optional[int] = None,
                     noise_std: Optional[float] = None, radius: Optional[float] = None, data_option: list[str] = (),
                     positives: Optional[str] = None, latent_dim: Optional[int] = None, model: Optional[str] = None, model_option: list[str] = (),
                     hidden: Optional[str] = None, terms: Optional[str] = None, option: list[str] = (),
                     prior: Optional[str] = None, prior_samples: Optional[str] = None, prior_option: list[str] = (),
                     seed: Optional[int] = None, lr: Optional[float] = None, batch_size: Optional[int] = None,
                     max_epochs: Optional[int] = None, patience: Optional[int] = None, select: Optional[str] = None,
                     lr_schedule: Optional[str] = None, lr_warmup_steps: Optional[int] = None,
                     lr_min: Optional[float] = None, lr_cosine_epochs: Optional[int] = None,
                     lr_step_epochs: Optional[int] = None, lr_gamma: Optional[float] = None,
                     lr_plateau_patience: Optional[int] = None, grad_clip: Optional[float] = None,
                     device: Optional[str] = None, threads: Optional[int] = None, evaluate: Optional[bool] = None,
                     checkpoint_seconds: Optional[float] = None, out: Optional[str] = None, name: Optional[str] = None,
                     tag: list[str] = (), tensorboard: Optional[bool] = None,
                     mlflow: Optional[str] = None) -> dict[str, Any]:
    """The options of `elbokit train` as a partial config (also the options a benchmark grid
    holds fixed for all its cells)."""
    from elbokit import config as config_mod

    o: dict[str, Any] = {}
    for key, value in (("dataset", data), ("seed", data_seed), ("n", n), ("data_dim", data_dim),
                       ("latent_dim", data_latent_dim), ("noise_std", noise_std), ("radius", radius),
                       ("positives", positives)):
        _set(o, "data", key, value)
    if data_option:
        _set(o, "data", "options", dict(config_mod.parse_assignment(t, "--data-option") for t in data_option))
    _set(o, "model", "latent_dim", latent_dim)
    _set(o, "model", "name", model)
    model_options = dict(model_option_value(t) for t in model_option)
    if hidden is not None:
        model_options["hidden"] = _hidden(hidden)
    if model_options:
        _set(o, "model", "options", model_options)
    _set(o, "objective", "terms", terms)
    _set(o, "prior", "name", prior)
    _set(o, "prior", "samples", prior_samples)
    if prior_option:
        _set(o, "prior", "options", dict(config_mod.parse_assignment(t, "--prior-option") for t in prior_option))
    for key, value in (("seed", seed), ("lr", lr), ("batch_size", batch_size), ("max_epochs", max_epochs),
                       ("patience", patience), ("select", select), ("grad_clip", grad_clip), ("device", device), ("threads", threads),
                       ("evaluate", evaluate), ("checkpoint_seconds", checkpoint_seconds),
                       ("lr_schedule", lr_schedule), ("lr_warmup_steps", lr_warmup_steps), ("lr_min", lr_min),
                       ("lr_cosine_epochs", lr_cosine_epochs), ("lr_step_epochs", lr_step_epochs), ("lr_gamma", lr_gamma),
                       ("lr_plateau_patience", lr_plateau_patience)):
        _set(o, "train", key, value)
    _set(o, "output", "out", out)
    _set(o, "output", "tensorboard", tensorboard)
    _set(o, "output", "name", name)
    if mlflow is not None:  # --mlflow alone: the default local store; --mlflow URI: that store
        _set(o, "output", "mlflow", True if mlflow == MLFLOW_DEFAULT else mlflow)
    if tag:
        _set(o, "output", "tags", tag)
    if option:
        o["terms"] = config_mod.term_options(option)
    return o


def train(
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config file; options given here override it."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as TOML and exit."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from checkpoints/last."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset: gaussian, mixture (default), digits, a plugin's, or a .npz/.npy/.csv file."),
    data_seed: Optional[int] = typer.Option(None, "--data-seed", help="Seed of the data generator and the split [0]."),
    n: Optional[int] = typer.Option(None, "--n", help="Rows to generate [10000]."),
    data_dim: Optional[int] = typer.Option(None, "--data-dim", help="Data dimension of generated data [20]."),
    data_latent_dim: Optional[int] = typer.Option(None, "--data-latent-dim", help="True latent dimension of generated data [--latent-dim]."),
    noise_std: Optional[float] = typer.Option(None, "--noise-std", help="Observation noise std of generated data [0.5]."),
    radius: Optional[float] = typer.Option(None, "--radius", help="Std of the positives' noise [0.1]."),
    data_option: list[str] = typer.Option([], "--data-option", help="KEY=VALUE for a plugin dataset's loader (repeatable)."),
    positives: Optional[str] = typer.Option(None, "--positives", help="Positives x+ by augmentation, fresh every step, instead of the data's own: gaussian:RADIUS (data units), shift:PIXELS[:edge], flip[:PROB], joined by +, e.g. shift:1+flip."),
    latent_dim: Optional[int] = typer.Option(None, "--latent-dim", help="Latent dimension [5]."),
    model: Optional[str] = typer.Option(None, "--model", help="Model: mlp, conv or a plugin's (elbokit models) [auto: conv for (N, C, H, W) files, else mlp]."),
    model_option: list[str] = typer.Option([], "--model-option", help="Model option KEY=VALUE, e.g. hidden=200,200 or channels=16,32 (repeatable)."),
    hidden: Optional[str] = typer.Option(None, "--hidden", help="The mlp's hidden layer sizes, short for --model-option hidden=SIZES [400,400]."),
    terms: Optional[str] = typer.Option(None, "--terms", help="Preset (classic, ed) or name[:weight] items, e.g. recon,kl:0.5 [classic]."),
    option: list[str] = typer.Option([], "--option", "-o", help="Per-term option TERM.KEY=VALUE, e.g. infonce.critic=cosine (repeatable)."),
    prior: Optional[str] = typer.Option(None, "--prior", help="Prior: standard-normal (default), gmm, samples, or a plugin's."),
    prior_samples: Optional[str] = typer.Option(None, "--prior-samples", help="A .npy/.npz of prior samples (n, latent_dim) for gmm/samples."),
    prior_option: list[str] = typer.Option([], "--prior-option", help="Prior option KEY=VALUE, e.g. n_components=5 (repeatable)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed [0]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate [0.001]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Minibatch size [512]."),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="Most epochs [300]."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early-stopping patience in epochs [20]."),
    select: Optional[str] = typer.Option(None, "--select", help="Validation metric: elbo (-ELBO, default) or loss (the objective's)."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="Learning-rate schedule: constant, cosine, step or plateau [constant]."),
    lr_warmup_steps: Optional[int] = typer.Option(None, "--lr-warmup-steps", help="Linear learning-rate warm-up over this many optimiser steps [0]."),
    lr_min: Optional[float] = typer.Option(None, "--lr-min", help="The learning rate the cosine schedule ends at [0]."),
    lr_cosine_epochs: Optional[int] = typer.Option(None, "--lr-cosine-epochs", help="Epochs of the cosine schedule, warm-up included [--max-epochs]."),
    lr_step_epochs: Optional[int] = typer.Option(None, "--lr-step-epochs", help="Step schedule: multiply by --lr-gamma every this many epochs [30]."),
    lr_gamma: Optional[float] = typer.Option(None, "--lr-gamma", help="Factor of the step and plateau schedules [0.1]."),
    lr_plateau_patience: Optional[int] = typer.Option(None, "--lr-plateau-patience", help="Plateau schedule: epochs without improvement before a reduction [5]."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Clip the gradient norm (0: off) [0]."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu (default), cuda, cuda:N or auto."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (0: all cores) [1]."),
    checkpoint_seconds: Optional[float] = typer.Option(None, "--checkpoint-seconds", help="Write checkpoints at most this often, in seconds (0: every epoch) [10]."),
    evaluate: Optional[bool] = typer.Option(None, "--evaluate/--no-evaluate", help="Evaluate the best checkpoint on the test split at the end [on]."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory [runs/<date-time>]; must not exist yet."),
    name: Optional[str] = typer.Option(None, "--name", help="A name for the run, shown by elbokit runs [the directory's name]."),
    tag: list[str] = typer.Option([], "--tag", help="A label for finding and grouping runs (repeatable)."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard", help="Also log to RUN_DIR/tensorboard (needs tensorboard)."),
    mlflow: Optional[str] = typer.Option(None, "--mlflow", metavar="[TRACKING_URI]",
                                         help="Log to MLflow as it trains: alone, a local SQLite store RUNS/mlflow.db (mlflow ui --backend-store-uri sqlite:///RUNS/mlflow.db); or the store at TRACKING_URI (needs mlflow)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or messages."),
    log_seconds: float = typer.Option(5.0, "--log-seconds", help="When stderr is not a terminal: one line per epoch, at most every this many seconds (0: every epoch; the last epoch always)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train a VAE on an objective composed of terms, e.g. --terms recon,infonce,entropy,xent --prior gmm."""
    from elbokit import config as config_mod
    from elbokit.errors import ElbokitError
    from elbokit.train import (LineReporter, RunWriteFailed, SilentReporter, TrainingDiverged, TrainingInterrupted,
                               resume_command)
    from elbokit.train import train as run_training

    o = config_overrides(
        data=data, data_seed=data_seed, n=n, data_dim=data_dim, data_latent_dim=data_latent_dim, noise_std=noise_std,
        radius=radius, data_option=data_option, positives=positives, latent_dim=latent_dim, model=model, model_option=model_option,
        hidden=hidden, terms=terms, option=option, prior=prior, prior_samples=prior_samples, prior_option=prior_option,
        seed=seed, lr=lr, batch_size=batch_size, max_epochs=max_epochs, patience=patience, select=select,
        lr_schedule=lr_schedule, lr_warmup_steps=lr_warmup_steps, lr_min=lr_min, lr_cosine_epochs=lr_cosine_epochs,
        lr_step_epochs=lr_step_epochs, lr_gamma=lr_gamma, lr_plateau_patience=lr_plateau_patience,
        grad_clip=grad_clip, device=device, threads=threads, evaluate=evaluate,
        checkpoint_seconds=checkpoint_seconds, out=out, name=name, tag=tag, tensorboard=tensorboard,
        mlflow=mlflow)

    if resume is not None:
        from elbokit.errors import ElbokitError
        from elbokit.train import resume_config

        if config is not None:
            raise ElbokitError("--config cannot be combined with --resume: a resumed run keeps its own config.toml.")
        cfg = resume_config(resume, o)
    else:
        file_cfg = config_mod.load_toml(config) if config is not None else None
        cfg = config_mod.resolve(file_cfg, o, source=str(config) if config else "the config file")
    if print_config:
        from elbokit.train import check

        setup = check(cfg, resume=resume)  # every check train makes before writing; writes nothing
        sys.stdout.write(config_mod.dumps(setup.config))
        verb = "continue in" if resume is not None else "be written to"
        sys.stdout.write(f"# All checks passed; the run would {verb} {setup.run_dir} "
                         f"({setup.config['train']['threads']} threads: {setup.threads_from}).\n")
        return

    if not log_seconds >= 0:
        raise ElbokitError(f"--log-seconds must be a non-negative number of seconds, got {log_seconds}.")
    # Started by torchrun: process 0 alone reports (every process still exits with the same code).
    follower = int(os.environ.get("RANK", "0") or 0) > 0
    quiet = quiet or follower
    if quiet:
        reporter = SilentReporter()
    elif sys.stderr.isatty():
        reporter = RichReporter()
    else:  # a log file, a pipe, a batch system: plain lines, nothing redrawn
        reporter = LineReporter(sys.stderr, min_seconds=log_seconds)
    try:
        summary = run_training(cfg, resume=resume, reporter=reporter)
    except TrainingInterrupted as exc:
        reporter.stop()
        if exc.step_in_epoch:
            saved = f"saved at step {exc.step_in_epoch} of epoch {exc.epoch + 1} (resuming finishes that epoch exactly)"
        elif exc.epoch:
            saved = f"saved after epoch {exc.epoch}"
        else:
            saved = "saved before its first epoch"
        if not follower:
            print(f"Interrupted: the run is {saved} in {exc.run_dir}; resume with: "
                  + resume_command(exc.run_dir), file=sys.stderr)
        raise typer.Exit(128 + exc.signum if exc.signum else EXIT_INTERRUPTED) from None
    except TrainingDiverged as exc:
        reporter.stop()
        if follower:  # process 0 says it, once
            raise typer.Exit(EXIT_DIVERGED) from None
        fail(str(exc), EXIT_DIVERGED)
    except RunWriteFailed as exc:
        reporter.stop()
        fail(str(exc), EXIT_OS_ERROR)
    except BaseException:
        reporter.stop()
        raise
    if follower:
        return
    if summary.get("already_complete"):
        summary.pop("already_complete")
        if json_output:
            print_json(summary)
        elif not quiet:
            print(f"The run in {summary['run_dir']} is complete ({summary['epochs']} epochs, stopped by "
                  f"{summary['stopped_by']}); nothing was changed. To train it further, resume with a larger "
                  f"--max-epochs (more than {summary['epochs']}).")
        return
    if json_output:
        print_json(summary)
    elif not quiet:
        metric = "val -ELBO" if summary["select_metric"] == "val_neg_elbo" else "val loss"
        print(f"Done: {summary['epochs']} epochs, {summary['steps']} steps in {summary['train_seconds']:.2f} s "
              f"({summary['steps_per_second']} steps/s); best {metric} {summary['best_val']:.4f} at epoch "
              f"{summary['best_epoch']} ({summary['space']} space). Run: {summary['run_dir']}")
        test = summary.get("test") or {}
        if test.get("iwae") is not None:
            units = (summary.get("likelihood") or {}).get("units", "nats")
            print(f"Test split (N={test['n']}, lower bounds on log p(x) per example, likelihood "
                  f"'{summary.get('likelihood', {}).get('name')}' in {units}, data units): "
                  f"ELBO {test['elbo']:.2f} ± {test['elbo_se']:.2f}, IWAE (K={test['iw_samples']}) "
                  f"{test['iwae']:.2f} ± {test['iwae_se']:.2f}. All metrics: elbokit evaluate {summary['run_dir']}")


class _TrainCommand(typer.core.TyperCommand):
    """`--mlflow` takes an optional value, which Typer options cannot: a bare `--mlflow` (last,
    or followed by another option) is read as `--mlflow=default`, the local store."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        args = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if arg == "--mlflow" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                args[i] = f"--mlflow={MLFLOW_DEFAULT}"
        return super().parse_args(ctx, args)


def register(app: typer.Typer) -> None:
    app.command(name="train", cls=_TrainCommand)(handle_errors(train))


__all__ = ["register", "train", "EXIT_BAD_INPUT", "EXIT_DIVERGED"]
