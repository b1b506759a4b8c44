"""How often the prior normalisation check refuses a density, by latent dimension and error.

    python benchmarks/bench_density_check.py               # the table in docs/writing-plugins.md
    python benchmarks/bench_density_check.py --seeds 5     # a quicker run

`elbokit train` runs `elbokit.contracts.check_density_matches_samples(moments=False)` on a
plugin prior of at most 10 latent dimensions before a run starts (the kit's `check_prior`
runs it with the moment checks as well). This script measures, for a prior whose log_prob is
off by a constant c nats (c = 0 is the right density), the fraction of seeds for which the
check refuses it, with the defaults n = 4000, z_threshold = 5. Priors: the standard normal,
a product of Student-t(4) and a product of Cauchy coordinates (heavy tails; the Cauchy has
no variance). The column c = 0 is the false-refusal rate; the others are the power.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import distributions as D

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import elbokit  # noqa: E402
from elbokit.contracts import ContractError, check_density_matches_samples  # noqa: E402


class Offset(elbokit.Prior):
    """A product of `base` coordinates whose log_prob is off by `offset` nats."""

    name = "offset"

    def __init__(self, dim: int, base: str = "normal", offset: float = 0.0):
        super().__init__(dim)
        self.base, self.offset = base, offset

    def distribution(self):
        zero, one = torch.zeros(self.dim), torch.ones(self.dim)
        base = {"normal": D.Normal(zero, one), "student-t(4)": D.StudentT(4.0, zero, one),
                "cauchy": D.Cauchy(zero, one)}[self.base]
        return D.Independent(base, 1)

    def log_prob(self, z):
        return self.distribution().log_prob(z) + self.offset

    def sample(self, n):
        return self.distribution().sample((n,))


def refusal_rate(dim: int, base: str, offset: float, seeds: int) -> float:
    refused = 0
    for seed in range(seeds):
        torch.manual_seed(seed)
        try:
            check_density_matches_samples(Offset(dim, base, offset), moments=False)
        except ContractError:
            refused += 1
    return refused / seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2, 5, 8, 10])
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.1, 0.15, 0.25, 0.5, 1.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"Fraction of {args.seeds} seeds refused (n = 4000, z_threshold = 5); offset c in nats")
    header = "| prior | dim | " + " | ".join(f"c = {c:g}" for c in args.offsets) + " |"
    print(header)
    print("|" + "---|" * (2 + len(args.offsets)))
    for base in ("normal", "student-t(4)", "cauchy"):
        for dim in args.dims:
            rates = [refusal_rate(dim, base, c, args.seeds) for c in args.offsets]
            print(f"| {base} | {dim} | " + " | ".join(f"{r:.2f}" for r in rates) + " |", flush=True)
    print(f"(log(2) = {math.log(2):.3f}: a density off by a factor of 2)")


if __name__ == "__main__":
    main()
