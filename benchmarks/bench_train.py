"""Training speed: `elbokit train` against a plain hand-written PyTorch loop of the same model,
and the `ed` objective against `classic`, per step, measured in one process.

    python benchmarks/bench_train.py [--epochs 20] [--repeats 3] [--threads 1]

Each configuration runs `--repeats` times, interleaved (so load on a shared machine hits all
of them alike); the table shows the median. Ratios are what to read, not absolute times.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from elbokit import config as config_mod
from elbokit.train import Trainer, prepare


def hand_written_vae(data_dim: int, latent_dim: int = 5, hidden: int = 400) -> tuple[nn.Module, nn.Module]:
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
    """The loop a user would write: index tensors, Adam, drop the incomplete last batch."""
    torch.manual_seed(0)
    encoder, decoder = hand_written_vae(x_train.shape[1])
    optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    n, steps = x_train.shape[0], x_train.shape[0] // batch_size
    start = time.perf_counter()
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
    return time.perf_counter() - start, epochs * steps


def run_elbokit(terms: str, prior: str, epochs: int, root: Path, tag: str) -> tuple[float, int]:
    """Wall time of `Trainer.fit()`: the epochs, validation, checkpoints and metrics written
    each epoch (data generation and the prior fit, done once before, are not counted)."""
    cfg = config_mod.resolve(overrides={
        "objective": {"terms": terms},
        "prior": {"name": prior},
        "train": {"max_epochs": epochs, "patience": epochs + 1, "evaluate": False, "threads": torch.get_num_threads()},
        "output": {"out": str(root / tag)},
    })
    setup = prepare(cfg)
    start = time.perf_counter()
    summary = Trainer(setup).fit()
    return time.perf_counter() - start, summary["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    setup = prepare(config_mod.resolve())  # the default data: dataset 2, standardised, 80/10/10
    x_train, x_val = setup.splits["train"].x, setup.splits["val"].x
    batch_size = setup.config["train"]["batch_size"]

    runs = {
        "hand-written loop, training only": lambda r, i: run_hand_written(x_train, x_val, args.epochs, batch_size, False),
        "hand-written loop + validation each epoch": lambda r, i: run_hand_written(x_train, x_val, args.epochs, batch_size, True),
        "elbokit train --terms classic": lambda r, i: run_elbokit("classic", "standard-normal", args.epochs, r, f"classic{i}"),
        "elbokit train --terms ed": lambda r, i: run_elbokit("ed", "standard-normal", args.epochs, r, f"ed{i}"),
        "elbokit train --terms classic --prior gmm": lambda r, i: run_elbokit("classic", "gmm", args.epochs, r, f"cg{i}"),
        "elbokit train --terms ed --prior gmm": lambda r, i: run_elbokit("ed", "gmm", args.epochs, r, f"eg{i}"),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    steps: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, fn in runs.items():
                seconds, n_steps = fn(Path(tmp), i)
                times[name].append(seconds)
                steps[name] = n_steps
    per_step = {name: statistics.median(ts) / steps[name] * 1000 for name, ts in times.items()}
    base = per_step["hand-written loop + validation each epoch"]
    classic = {"standard-normal": per_step["elbokit train --terms classic"],
               "gmm": per_step["elbokit train --terms classic --prior gmm"]}
    print(f"{args.epochs} epochs x {steps['elbokit train --terms classic'] // args.epochs} steps of 512, "
          f"{args.threads} thread(s), median of {args.repeats}\n")
    print(f"| run | ms/step | vs hand-written + validation | speed vs classic (same prior) |")
    print("|---|---|---|---|")
    for name, ms in per_step.items():
        prior = "gmm" if "gmm" in name else "standard-normal"
        vs_classic = f"{classic[prior] / ms:.2f}x" if name.startswith("elbokit") else "-"
        print(f"| {name} | {ms:.2f} | {ms / base:.3f} | {vs_classic} |")


if __name__ == "__main__":
    main()
