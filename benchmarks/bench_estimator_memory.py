"""Peak resident memory and speed of each pairwise estimator, one subprocess per row.

    python benchmarks/bench_estimator_memory.py                       # the table in docs/benchmarks.md
    python benchmarks/bench_estimator_memory.py --before /tmp/old     # and the same rows from another tree

Each row is one estimator (quantity, name, options) at one batch size M and latent size L,
measured in a fresh Python process (so that one row's freed-but-kept memory cannot hide another
row's peak):

- memory: the process's resident set size after the inputs exist (z, posterior loc and scale,
  positives, float32, requiring grad; the prior fitted), read from /proc/self/statm, and the
  peak resident set size after one forward and backward of the estimator's mean
  (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the kernel's high-water mark). The row reports
  the difference: what the estimator itself needed on top of its inputs. Measured at the large
  batch (default 16384).
- speed: the median CPU time of the process (`time.process_time`, 1 thread: steadier than
  wall time on a machine other jobs load) of forward+backward of the mean at the small batch
  (default 512), after two warm-up runs, over at least 20 runs and 1 s.

With --before PATH the same rows are also run with PYTHONPATH=PATH (an export of an earlier
commit), interleaved row by row with the current tree, so the two columns share the load.
--no-before-large skips the earlier tree's memory row at the large batch (printed "-"): a tree
that forms dense (M, M) matrices needs gigabytes and minutes there, and only the current
tree's peak is what the table is for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROWS = [
    ("entropy", "mws", {}, "standard-normal"),
    ("entropy", "mss", {}, "standard-normal"),
    ("entropy", "knn", {}, "standard-normal"),
    ("entropy", "gaussian", {}, "standard-normal"),
    ("mi", "mws", {}, "standard-normal"),
    ("mi", "infonce", {"critic": "cosine"}, "standard-normal"),
    ("mi", "infonce", {"critic": "dot"}, "standard-normal"),
    ("mi", "infonce", {"critic": "encoder"}, "standard-normal"),
    ("cross_entropy", "mc", {}, "gmm"),
    ("cross_entropy", "knn", {}, "standard-normal"),
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_row(quantity: str, name: str, options: dict, prior_name: str, m: int, dim: int, mode: str) -> dict:
    import torch

    from elbokit.batch import Batch, gaussian_posterior
    from elbokit.plugins import Registry, set_registry

    torch.set_num_threads(1)
    registry = Registry.build(load_entry_points=False, strict=True)
    set_registry(registry)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, dim, generator=g)
    loc = x.clone().requires_grad_()
    scale = (0.1 + torch.rand(m, dim, generator=g)).requires_grad_()
    eps, eps_pos = torch.randn(m, dim, generator=g), torch.randn(m, dim, generator=g)
    prior_cls = registry.prior(prior_name)
    prior = prior_cls(dim=dim, samples=torch.randn(2000, dim, generator=g).numpy()) if prior_name == "gmm" \
        else prior_cls(dim=dim)
    estimator = registry.estimator(quantity, name)(**options)

    def step() -> None:
        loc.grad = scale.grad = None
        z = loc + scale * eps
        batch = Batch(x=x, posterior=gaussian_posterior(loc, scale), z=z, dataset_size=max(10 * m, 60000),
                      x_pos=x, z_pos=loc + scale * eps_pos)
        estimator(batch, prior).mean().backward()

    if mode == "memory":
        base = _rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"extra_mib": (peak - base) / 2**20}
    step()
    step()
    times: list[float] = []
    while len(times) < 20 or sum(times) < 1.0:
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return {"ms": 1e3 * statistics.median(times)}


def run_row(tree: str, row: tuple, m: int, dim: int, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    spec = json.dumps([*row, m, dim, mode])
    out = subprocess.run([sys.executable, __file__, "--row", spec], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout)


def label(row: tuple) -> str:
    quantity, name, options, prior = row
    extra = "".join(f" {k}={v}" for k, v in options.items())
    return f"{quantity} {name}{extra}" + (f" ({prior} prior)" if quantity == "cross_entropy" else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--large", type=int, default=16384, help="batch size of the memory rows")
    parser.add_argument("--small", type=int, default=512, help="batch size of the speed rows")
    parser.add_argument("--dims", type=int, nargs="+", default=[5, 64])
    parser.add_argument("--before", help="an earlier tree (its directory holds the elbokit package)")
    parser.add_argument("--only", nargs="+", help="rows whose label contains one of these words")
    parser.add_argument("--before-large", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the earlier tree's peak memory at the large batch (default: yes)")
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(one_row(*json.loads(args.row))))
        return 0
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"now": here, **({"before": os.path.abspath(args.before)} if args.before else {})}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"Machine: {platform.machine()}, {os.cpu_count()} logical cores, 1 torch thread per row, "
          f"Python {platform.python_version()}; load average at the start {load}")
    print()
    cols = " | ".join(f"peak MiB over inputs, M={args.large} ({t})" for t in trees)
    speed = " | ".join(f"ms fwd+bwd, M={args.small} ({t})" for t in trees)
    print(f"| estimator | L | {cols} | {speed} |")
    print("|---|---:|" + "---:|" * (2 * len(trees)))
    for dim in args.dims:
        for row in ROWS:
            if args.only and not any(w in label(row) for w in args.only):
                continue
            mem = {t: run_row(p, row, args.large, dim, "memory") if t == "now" or args.before_large else {}
                   for t, p in trees.items()}
            # Speed: the trees alternate three times and each keeps its fastest median.
            ms = {t: {"ms": math.inf} for t in trees}
            for _ in range(3):
                for t, p in trees.items():
                    r = run_row(p, row, args.small, dim, "speed")
                    ms[t] = r if "error" in r else {"ms": min(ms[t].get("ms", math.inf), r["ms"])}
            fmt = lambda r, key, f: (r.get("error", "")[:60] if "error" in r  # noqa: E731
                                     else format(r[key], f) if key in r else "-")
            print(f"| {label(row)} | {dim} | " + " | ".join(fmt(mem[t], "extra_mib", ".0f") for t in trees) + " | "
                  + " | ".join(fmt(ms[t], "ms", ".2f") for t in trees) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
