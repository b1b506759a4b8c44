"""Training speed: `elbokit train` against a plain hand-written PyTorch loop and pythae's trainer
on the same model and data, and the `ed` objective against `classic`, measured in one process.

    python benchmarks/bench_train.py [--epochs 20] [--repeats 3] [--threads 0]

Every row trains the paper's model (2 x 400 ReLU MLP encoder to a diagonal Gaussian, latent 5,
mirrored decoder, Adam 1e-3, batch 512) on elbokit's default data (dataset 2, 8000 training
rows of 20 features, standardised; 1000 validation rows) for `--epochs` epochs, with the same
torch thread count (`--threads`, 0: elbokit's default, the CPUs this process may use or
OMP_NUM_THREADS). What each row times:

- **hand-written loop, training only**: the loop a user would write: a random permutation per
  epoch, index-tensor minibatches (the incomplete last batch dropped), -ELBO with the mse
  likelihood (variance 1/2) and the analytic KL, `zero_grad`, `backward`, `Adam.step`.
- **hand-written loop + validation each epoch**: the same, plus the -ELBO of the validation
  split under `torch.no_grad()` after each epoch.
- **pythae BaseTrainer**: `pythae.trainers.BaseTrainer(...).train()` of a `pythae.models.VAE`
  built from a custom `BaseEncoder` / `BaseDecoder` holding the same layers (pythae's VAE reads
  the encoder's second half as a log-variance, elbokit's as a softplus scale) with
  reconstruction_loss="mse": its DataLoader (per-example indexing and collation, shuffled,
  the last partial batch kept), the evaluation of the validation split each epoch, a copy of
  the best model on each improvement and the final model saved at the end (its log lines
  are silenced, its progress bars go to /dev/null). Trainer construction (the sanity check)
  is not timed. Skipped with a note when pythae is not importable (`pip install --no-deps
  pythae==0.1.2 tqdm`; it is never a dependency of elbokit).
- **elbokit train ...**: `elbokit.train.Trainer(setup).fit()`: the epochs, the validation
  metrics, checkpoints (spaced by train.checkpoint_seconds) and the metrics line each epoch.
  Building the setup (data generation, the gmm prior's fit) is done before and not timed; no
  test-split evaluation (`train.evaluate = false`).

Times are wall-clock, or with `--clock process` the CPU time of the process (what to use on a
machine other jobs load: with one thread it is the work a row did, whatever the scheduler
gave to other processes). Rows run round-robin (`--repeats` rounds of every row in turn) so load on a shared machine hits
every row alike; the table gives the median over rounds, as the time per 512 training examples
(an epoch's time over the examples it trained on, x 512: ms per step for the rows that drop the
last partial batch) and its ratios; a second table gives the main ratios within each round
(median, lowest and highest over rounds). Ratios are what to read, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from elbokit import build
from elbokit import config as config_mod
from elbokit.train import Trainer, prepare

HIDDEN, LATENT = 400, 5
CLOCK = time.perf_counter  # --clock process: time.process_time


def hand_written_vae(data_dim: int, latent_dim: int = LATENT, hidden: int = HIDDEN) -> tuple[nn.Module, nn.Module]:
    encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                            nn.Linear(hidden, 2 * latent_dim))
    decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                            nn.Linear(hidden, data_dim))
    return encoder, decoder


def neg_elbo(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """-ELBO with the mse likelihood (variance 1/2) and the analytic KL to N(0, I), per example."""
    loc, pre = encoder(x).chunk(2, dim=-1)
    scale = F.softplus(pre) + 1e-4
    z = loc + scale * torch.randn_like(loc)
    recon = (x - decoder(z)).pow(2).sum(-1) + 0.5 * x.shape[1] * math.log(math.pi)
    kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum(-1) - scale.log().sum(-1)
    return recon + kl


def run_hand_written(x_train: torch.Tensor, x_val: torch.Tensor, epochs: int, batch_size: int,
                     validate: bool) -> tuple[float, int]:
    """(seconds, examples trained on)."""
    torch.manual_seed(0)
    encoder, decoder = hand_written_vae(x_train.shape[1])
    optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    n, steps = x_train.shape[0], x_train.shape[0] // batch_size
    start = CLOCK()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(steps):
            loss = neg_elbo(encoder, decoder, x_train[perm[i * batch_size:(i + 1) * batch_size]]).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if validate:
            with torch.no_grad():
                float(neg_elbo(encoder, decoder, x_val).mean())
    return CLOCK() - start, epochs * steps * batch_size


def pythae_available() -> str | None:
    """None when pythae's trainer can be imported, else why not."""
    try:
        import pythae.trainers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the row is skipped
        return f"{type(exc).__name__}: {exc}"
    return None


def run_pythae(x_train: torch.Tensor, x_val: torch.Tensor, epochs: int, batch_size: int,
               root: Path) -> tuple[float, int]:
    """(seconds of BaseTrainer.train(), examples trained on)."""
    import logging

    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    data_dim = x_train.shape[1]

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = hand_written_vae(data_dim)[0]

        def forward(self, x):
            loc, log_var = self.net(x).chunk(2, dim=-1)
            return ModelOutput(embedding=loc, log_covariance=log_var)

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = hand_written_vae(data_dim)[1]

        def forward(self, z):
            return ModelOutput(reconstruction=self.net(z))

    torch.manual_seed(0)
    model = VAE(VAEConfig(input_dim=(data_dim,), latent_dim=LATENT, reconstruction_loss="mse"),
                encoder=Encoder(), decoder=Decoder())
    config = BaseTrainerConfig(output_dir=str(root), num_epochs=epochs, per_device_train_batch_size=batch_size,
                               per_device_eval_batch_size=batch_size, learning_rate=1e-3, optimizer_cls="Adam",
                               steps_saving=None, no_cuda=True)
    for name in list(logging.root.manager.loggerDict):  # its loggers print to the terminal they found at import
        if name.startswith("pythae"):
            logging.getLogger(name).setLevel(logging.WARNING)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        trainer = BaseTrainer(model=model, train_dataset=BaseDataset(x_train, torch.zeros(len(x_train))),
                              eval_dataset=BaseDataset(x_val, torch.zeros(len(x_val))), training_config=config)
        start = CLOCK()
        trainer.train()
        seconds = CLOCK() - start
    return seconds, epochs * x_train.shape[0]


def run_elbokit(terms: str, prior: str, epochs: int, threads: int, root: Path, tag: str) -> tuple[float, int]:
    """(seconds of Trainer.fit(), examples trained on)."""
    cfg = config_mod.resolve(overrides={
        "objective": {"terms": terms},
        "prior": {"name": prior},
        "train": {"max_epochs": epochs, "patience": epochs + 1, "evaluate": False, "threads": threads},
        "output": {"out": str(root / tag)},
    })
    setup = prepare(cfg)
    start = CLOCK()
    summary = Trainer(setup).fit()
    return CLOCK() - start, summary["steps"] * cfg["train"]["batch_size"]


HAND, HAND_VAL, PYTHAE = "hand-written loop, training only", "hand-written loop + validation each epoch", "pythae BaseTrainer"
CLASSIC, CLASSIC_GMM = "elbokit train --terms classic", "elbokit train --terms classic --prior gmm"
ED, ED_GMM = "elbokit train --terms ed", "elbokit train --terms ed --prior gmm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every row (0: elbokit's default)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: the CPU time of this process (steadier on a loaded machine; with one "
                             "thread it is the work done, with several the sum over threads)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    threads, source = (args.threads, "--threads") if args.threads > 0 else build.default_threads()
    torch.set_num_threads(threads)

    setup = prepare(config_mod.resolve())  # the default data: dataset 2, standardised, 80/10/10
    x_train, x_val = setup.splits["train"].x, setup.splits["val"].x
    batch_size = setup.config["train"]["batch_size"]

    runs = {
        HAND: lambda r, i: run_hand_written(x_train, x_val, args.epochs, batch_size, False),
        HAND_VAL: lambda r, i: run_hand_written(x_train, x_val, args.epochs, batch_size, True),
        PYTHAE: lambda r, i: run_pythae(x_train, x_val, args.epochs, batch_size, r / f"pythae{i}"),
        CLASSIC: lambda r, i: run_elbokit("classic", "standard-normal", args.epochs, threads, r, f"classic{i}"),
        CLASSIC_GMM: lambda r, i: run_elbokit("classic", "gmm", args.epochs, threads, r, f"cg{i}"),
        ED: lambda r, i: run_elbokit("ed", "standard-normal", args.epochs, threads, r, f"ed{i}"),
        ED_GMM: lambda r, i: run_elbokit("ed", "gmm", args.epochs, threads, r, f"eg{i}"),
    }
    missing = pythae_available()
    if missing:
        print(f"Note: the pythae row is skipped, pythae is not importable ({missing}).\n")
        del runs[PYTHAE]
    per_512: dict[str, list[float]] = {name: [] for name in runs}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, fn in runs.items():
                seconds, examples = fn(Path(tmp), i)
                per_512[name].append(seconds / examples * 512 * 1000)
    ms = {name: statistics.median(v) for name, v in per_512.items()}
    print(f"Machine: {platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}, {threads} "
          f"thread(s) ({source}), Python {platform.python_version()}; load average at the start {load}, at the "
          f"end {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"{args.epochs} epochs of {x_train.shape[0]} rows, batch {batch_size}; {args.clock} time, median of "
          f"{args.repeats} interleaved rounds\n")
    print("| run | ms per 512 examples | vs hand-written + validation | vs pythae | speed vs classic (same prior) "
          "| speed vs classic (standard-normal) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, value in ms.items():
        prior_classic = CLASSIC_GMM if "gmm" in name else CLASSIC
        vs_pythae = f"{ms[PYTHAE] / value:.2f}x" if PYTHAE in ms else "-"
        same = f"{ms[prior_classic] / value:.2f}x" if name.startswith("elbokit") else "-"
        plain = f"{ms[CLASSIC] / value:.2f}x" if name.startswith("elbokit") else "-"
        print(f"| {name} | {value:.2f} | {ms[HAND_VAL] / value:.2f}x | {vs_pythae} | {same} | {plain} |")
    print("\n(Ratios are speeds: above 1x is faster than the row compared with.)")
    # The same ratios within each round (rows of one round ran minutes apart at most), so that
    # the spread from round to round shows how far a single figure can be trusted.
    pairs = [(CLASSIC, HAND_VAL), (CLASSIC, HAND), (CLASSIC, PYTHAE), (ED, CLASSIC), (ED_GMM, CLASSIC_GMM)]
    print("\n| speed of | vs | median over rounds | lowest | highest |")
    print("|---|---|---:|---:|---:|")
    for row, base in pairs:
        if row in per_512 and base in per_512:
            ratios = [b / r for r, b in zip(per_512[row], per_512[base])]
            print(f"| {row} | {base} | {statistics.median(ratios):.2f}x | {min(ratios):.2f}x | {max(ratios):.2f}x |")


if __name__ == "__main__":
    main()
