"""Time and peak memory of `elbokit.evaluate.evaluate_model` with the paper's model.

    python benchmarks/bench_evaluate.py            # the table in docs/evaluation.md
    python benchmarks/bench_evaluate.py --quick    # K = 100 only
    python benchmarks/bench_evaluate.py --repeat 3 # best of 3 timings (a busy machine inflates them)

The model is the paper's MLP VAE (20 -> 400 -> 400 -> 2x5, mirrored decoder; untrained, which
does not change the cost) on `gaussian` data. Each configuration runs in a fresh process so
that its peak resident memory (ru_maxrss) is its own; "eval peak" is that peak minus the
resident memory just before evaluating (torch, the model and the data). The importance pass
decodes at most `chunk` (example, sample) pairs at once, so the peak should not grow with N
or K, only with `chunk`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = [  # (N, K, chunk)
    (1000, 100, None),
    (1000, 1000, None),
    (5000, 1000, None),
    (1000, 1000, 1024),
    (1000, 1000, 16384),
    (1000, 1000, 65536),
]


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(n: int, k: int, chunk: int | None, repeat: int = 1) -> dict:
    import torch

    import elbokit
    from elbokit.data import Standardizer
    from elbokit.data.synthetic import generate
    from elbokit.evaluate import DEFAULT_ROWS, evaluate_model, importance_sampled_terms
    from elbokit.likelihoods import make_likelihood

    data = generate("gaussian", n=n, seed=0)
    st = Standardizer.fit(data.x)
    x = torch.as_tensor(st.transform(data.x), dtype=torch.float32)
    torch.manual_seed(0)
    model = elbokit.VAE(20, 5, hidden=(400, 400)).eval()
    prior = elbokit.make_prior("standard-normal", dim=5)
    lik = make_likelihood("mse")
    chunk = chunk or DEFAULT_ROWS
    importance_sampled_terms(model, prior, lik, x[:8], iw_samples=4)  # warm up kernels
    base = rss_mb()
    iw_seconds = total = float("inf")
    for _ in range(repeat):  # the best of `repeat`: other processes only ever add time
        start = time.perf_counter()
        importance_sampled_terms(model, prior, lik, x, iw_samples=k, chunk=chunk)
        iw_seconds = min(iw_seconds, time.perf_counter() - start)
        start = time.perf_counter()
        report = evaluate_model(model, prior, lik, x, z_true=data.z, meta=data.meta, standardizer=st,
                                iw_samples=k, chunk=chunk)
        total = min(total, time.perf_counter() - start)
    return {"n": n, "k": k, "chunk": chunk, "threads": torch.get_num_threads(),
            "iwae_pass_s": round(iw_seconds, 2), "evaluate_s": round(total, 2),
            "eval_peak_mb": round(peak_mb() - base, 1), "process_peak_mb": round(peak_mb(), 1),
            "iwae": round(report["iwae"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=4, type=int, metavar=("N", "K", "CHUNK", "REPEAT"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help="report the best of this many timings")
    parser.add_argument("--quick", action="store_true", help="only N=1000, K=100")
    args = parser.parse_args()
    if args.one:
        n, k, chunk, repeat = args.one
        print(json.dumps(one(n, k, chunk or None, repeat)))
        return
    configs = CONFIGS[:1] if args.quick else CONFIGS
    rows = []
    for n, k, chunk in configs:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), str(k), str(chunk or 0), str(args.repeat)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="elbokit.evaluate: paper's MLP (2 x 400), D=20, L=5")
    for col in ("N", "K", "chunk", "threads", "IWAE pass (s)", "evaluate (s)", "eval peak (MB)", "process peak (MB)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("n", "k", "chunk", "threads", "iwae_pass_s", "evaluate_s",
                                             "eval_peak_mb", "process_peak_mb")))
    Console().print(table)


if __name__ == "__main__":
    main()
