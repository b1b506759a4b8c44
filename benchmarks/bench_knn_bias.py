"""Finite-sample bias of the k-NN cross-entropy H[q, p] against the number of prior samples M_p.

    python benchmarks/bench_knn_bias.py                 # the table in docs/design.md
    python benchmarks/bench_knn_bias.py --repeats 3     # quicker

Setting: latent dimension 5 (elbokit's default), k = 3 (the default), q = p so that the truth is
H[p]: for p = N(0, I_5) the closed form 2.5 log(2 pi e); for p a 3-component Gaussian mixture
(equal weights, means -3, 0, 3 times the all-ones vector, isotropic scales 0.5, 0.75, 1.0) the
Monte-Carlo value -mean log p(z) over 400,000 draws (its standard error is printed). Each
repeat draws a fresh bank of M_p prior samples (the `samples` prior, which now draws without
replacement) and 2048 codes z ~ q, and runs elbokit's `knn` cross-entropy estimator with
n_prior = M_p. The bias is the mean over repeats minus the truth, with the standard error of
that mean over repeats.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import distributions as D

from elbokit.batch import Batch, gaussian_posterior
from elbokit.default_plugins.estimators import CrossEntropyKNN
from elbokit.default_plugins.priors import SamplePrior

DIM, K = 5, 3


def gmm() -> D.Distribution:
    means = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)[:, None].expand(3, DIM)
    scales = torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64)[:, None].expand(3, DIM)
    return D.MixtureSameFamily(D.Categorical(torch.ones(3, dtype=torch.float64)),
                               D.Independent(D.Normal(means, scales), 1))


def normal() -> D.Distribution:
    return D.Independent(D.Normal(torch.zeros(DIM, dtype=torch.float64), torch.ones(DIM, dtype=torch.float64)), 1)


def truth(p: D.Distribution, name: str) -> tuple[float, float]:
    if name == "N(0, I)":
        return 0.5 * DIM * math.log(2 * math.pi * math.e), 0.0
    values = -p.log_prob(p.sample((400_000,)))
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"k = {K}, latent dimension {DIM}, {args.queries} codes per repeat, {args.repeats} repeats, q = p")
    print()
    print("| p | truth H[p] | M_p (prior samples) | knn estimate (mean) | bias | SE of bias |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, make in (("N(0, I)", normal), ("GMM (3 components)", gmm)):
        p = make()
        h, h_se = truth(p, name)
        estimator = CrossEntropyKNN(k=K, n_prior=max(args.sizes))
        for m_p in args.sizes:
            estimator.n_prior = m_p
            values = []
            for _ in range(args.repeats):
                prior = SamplePrior(samples=p.sample((m_p,)).float())
                z = p.sample((args.queries,)).float()
                batch = Batch(x=z, posterior=gaussian_posterior(z, torch.ones_like(z)), z=z)
                with torch.no_grad():
                    values.append(estimator(batch, prior).double().mean().item())
            v = torch.tensor(values, dtype=torch.float64)
            se = math.sqrt((v.std().item() / math.sqrt(len(values))) ** 2 + h_se**2) if len(values) > 1 else float("nan")
            print(f"| {name} | {h:.3f} | {m_p} | {v.mean().item():.3f} | {v.mean().item() - h:+.3f} | {se:.3f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
