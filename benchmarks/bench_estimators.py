"""Time and peak memory of the pairwise Gaussian log-density behind the mws/mss/infonce estimators.

    python benchmarks/bench_estimators.py                  # the table in docs/benchmarks.md
    python benchmarks/bench_estimators.py --sizes 128 512  # a quicker run
    python benchmarks/bench_estimators.py --knn            # the k-NN table in docs/benchmarks.md

What is measured, for M codes of dimension L: out_i = logsumexp_j log N(z_i; loc_j, scale_j^2),
forward and then backward of out.sum() into z, loc and scale (all three require grad), float32
inputs, 2 threads. Methods:

- naive:    the (M, M, L) broadcast of z_i - loc_j, then a sum over L and the logsumexp.
- matmul:   `elbokit.ops.pairwise_gaussian_log_density` (the square expanded into matrix
            products, formed in float64 for accuracy) giving the full (M, M) matrix, then the
            logsumexp.
- matmul32: the same expansion in float32 without centring (what the library did before it
            was made accurate for small scales), to show what the accuracy costs.
- chunked:  `elbokit.ops.logsumexp_gaussian_mixture`, rows in chunks of 256 with activation
            checkpointing (what the estimators call).

Time: after one warm-up run each, the methods are timed in interleaved rounds (one run of
each per round, at least 5 rounds and 2 s in all) in the same process, and the median is
reported, so that a change in the machine's load affects all methods alike and the ratios
compare like with like. "max abs diff" is the largest difference of out from the naive float32
result (the naive float32 result is itself off by ~1e-6 from float64).

With --knn: the k-th-neighbour distances behind the knn entropy and cross-entropy, old
(float32 `torch.cdist` of the whole (M, M) matrix, then topk: what the library did before) against
new (`elbokit.ops.kth_neighbour_distance`: float64 blocks after centring to find neighbours,
direct differences for the distances), forward and backward of the knn entropy of
N(c, 0.01^2 I_3) at offsets c = 0, 10, 100, with its error against the closed form.

Memory, two numbers, both from PyTorch itself (tracemalloc does not see torch's CPU allocator):
- peak: the largest number of bytes held by torch's CPU allocator during forward+backward,
  counted from the start of the run. It is read from torch.profiler (profile_memory=True): the
  profiler records every allocation and free with the allocator's running total ("Total
  Allocated"), and the peak is the maximum of that total. Inputs allocated before the run are
  not counted.
- saved: the bytes autograd keeps between forward and backward, summed over the distinct
  storages passed to a torch.autograd.graph.saved_tensors_hooks pack hook, leaving out the
  storages of the inputs themselves (they exist anyway).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from elbokit.ops import (LOG_2PI, kth_neighbour_distance, log_unit_ball_volume, logsumexp_gaussian_mixture,
                         pairwise_gaussian_log_density)


def naive(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    diff = (z[:, None, :] - loc[None]) / scale[None]  # (M, M, L)
    s = -0.5 * diff.pow(2).sum(-1) - scale.log().sum(-1) - 0.5 * z.shape[1] * LOG_2PI
    return torch.logsumexp(s, dim=1)


def matmul(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(pairwise_gaussian_log_density(z, loc, scale), dim=1)


def matmul32(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    precision = scale.pow(-2)
    quad = (z * z) @ precision.T - 2.0 * z @ (loc * precision).T
    const = (loc * loc * precision).sum(-1) + 2.0 * scale.log().sum(-1) + z.shape[1] * LOG_2PI
    return torch.logsumexp(-0.5 * (quad + const), dim=1)


def chunked(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return logsumexp_gaussian_mixture(z, loc, scale, chunk=256, max_unchunked=0)


METHODS = {"naive": naive, "matmul": matmul, "matmul32": matmul32, "chunked": chunked}


def inputs(m: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(m, dim, generator=g)
    scale = 0.1 + torch.rand(m, dim, generator=g)
    z = loc + scale * torch.randn(m, dim, generator=g)
    return tuple(t.requires_grad_() for t in (z, loc, scale))  # type: ignore[return-value]


def run_once(fn, leaves) -> torch.Tensor:
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    out.sum().backward()
    return out.detach()


CLOCK = time.perf_counter  # --clock process: CPU time of this process, robust to other jobs' load


def time_ms(fns: dict, leaves, min_rounds: int = 5, min_total: float = 2.0) -> dict[str, float]:
    """Median time of each method, timed in interleaved rounds (one run of every method per
    round) so that a change in the machine's load hits all methods alike."""
    for fn in fns.values():
        run_once(fn, leaves)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < min_rounds or sum(map(sum, times.values())) < min_total:
        for name, fn in fns.items():
            start = CLOCK()
            run_once(fn, leaves)
            times[name].append(CLOCK() - start)
        rounds += 1
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def peak_bytes(fn, leaves) -> int:
    """Maximum of the CPU allocator's running total during one forward+backward."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_once(fn, leaves)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max([0, *totals])


def saved_bytes(fn, leaves) -> int:
    """Bytes autograd saves for backward (distinct storages, inputs excluded)."""
    own = {t.untyped_storage().data_ptr() for t in leaves}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    for t in leaves:
        t.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
    out.sum().backward()
    return sum(seen.values())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}; load average at the start {load}")


def knn_entropy_old(z: torch.Tensor, k: int = 3) -> torch.Tensor:
    dist = torch.cdist(z, z) + torch.diag(torch.full((z.shape[0],), float("inf"), dtype=z.dtype))
    rho = dist.topk(k, dim=1, largest=False).values[:, -1].clamp_min(1e-12)
    return _knn_terms(rho, z.shape[0], z.shape[1], k)


def knn_entropy_new(z: torch.Tensor, k: int = 3) -> torch.Tensor:
    rho = kth_neighbour_distance(z, z, k, exclude_self=True).clamp_min(1e-12)
    return _knn_terms(rho, z.shape[0], z.shape[1], k)


def _knn_terms(rho: torch.Tensor, m: int, d: int, k: int) -> torch.Tensor:
    const = float(torch.special.digamma(torch.tensor(float(m))) - torch.special.digamma(torch.tensor(float(k))))
    return const + log_unit_ball_volume(d) + d * rho.log()


def knn_table(sizes: list[int], offsets: list[float]) -> None:
    d, spread = 3, 0.01
    truth = 0.5 * d * math.log(2 * math.pi * math.e * spread**2)
    clock = "CPU time of the process" if CLOCK is time.process_time else "wall time"
    print(f"k-NN entropy (k = 3) of N(c, {spread}^2 I_{d}), closed form {truth:.3f}; fwd+bwd of the mean, "
          f"float32 input; times are {clock}.")
    print()
    print("| M | offset c | method | fwd+bwd ms (median) | old / new time | peak MB | estimate | error vs closed form |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for m in sizes:
        base = spread * torch.randn(m, d, generator=torch.Generator().manual_seed(0))
        for offset in offsets:
            z = (base + offset).requires_grad_()
            fns = {"old": lambda z: knn_entropy_old(z).mean()[None], "new": lambda z: knn_entropy_new(z).mean()[None]}
            timings = time_ms(fns, [z])
            for name, fn in fns.items():
                value = run_once(fn, [z]).item()
                ratio = timings["old"] / timings[name]
                peak = peak_bytes(fn, [z]) / 2**20
                print(f"| {m} | {offset:g} | {name} | {timings[name]:.1f} | {ratio:.2f}x | {peak:.1f} | "
                      f"{value:.3f} | {value - truth:+.3f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048], help="batch sizes M")
    parser.add_argument("--dims", type=int, nargs="+", default=[5, 32], help="latent dimensions L")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--knn", action="store_true", help="the k-NN table instead (sizes default to 512 2048 8192)")
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 10.0, 100.0], help="with --knn")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="wall time, or the process's CPU time (steadier on a loaded machine; use with --threads 1)")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(args.threads)

    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/bench_estimators.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print()
    if args.knn:
        given = argv if argv is not None else sys.argv[1:]
        sizes = args.sizes if "--sizes" in given else [512, 2048, 8192]
        knn_table(sizes, args.offsets)
        return 0
    print("| M | L | method | fwd+bwd ms (median) | speed-up vs naive | peak MB | saved for backward MB | max abs diff vs naive |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for dim in args.dims:
        for m in args.sizes:
            leaves = inputs(m, dim)
            reference = run_once(naive, leaves).double()
            timings = time_ms({name: METHODS[name] for name in args.methods}, leaves)
            base_ms = timings.get("naive")
            for name in args.methods:
                fn = METHODS[name]
                out = run_once(fn, leaves).double()
                diff = (out - reference).abs().max().item()
                ms = timings[name]
                ratio = f"{base_ms / ms:.2f}x" if base_ms else "n/a"
                peak = peak_bytes(fn, leaves) / 2**20
                saved = saved_bytes(fn, leaves) / 2**20
                print(f"| {m} | {dim} | {name} | {ms:.2f} | {ratio} | {peak:.1f} | {saved:.2f} | {diff:.1e} |", flush=True)
    expected = {m: 4 * m * m * max(args.dims) / 2**20 for m in args.sizes}
    print()
    print("For scale: one float32 (M, M, L) tensor at the largest L is "
          + ", ".join(f"{v:.0f} MB at M={m}" for m, v in expected.items()) + ".")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
