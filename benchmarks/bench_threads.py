"""The cost of oversubscription: several trainings started at once, each with a thread count.

    python benchmarks/bench_threads.py [--epochs 8] [--rounds 2]

Each row starts P `elbokit train` processes at the same moment (the README's `classic` model
on `mixture`, batch 512, no test evaluation), each with `--threads T`, and reports the steps
per second of each process (median over processes and rounds, from its summary.json: training
steps over training seconds, validation included) and their sum, the throughput of the
machine. Rows are interleaved round by round so that a change in the machine's load hits every
row alike. T = C is what the default gives every process on a machine with C usable CPUs when
nothing sets OMP_NUM_THREADS; P x T > C is oversubscribed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_round(processes: int, threads: int, epochs: int, root: Path) -> list[float]:
    env = {**os.environ, "ELBOKIT_DISABLE_PLUGINS": "1"}
    env.pop("OMP_NUM_THREADS", None)
    procs = []
    for i in range(processes):
        out = root / f"p{processes}-t{threads}-{i}"
        procs.append((out, subprocess.Popen(
            [sys.executable, "-c", "from elbokit.cli import console_main; console_main()", "train", "--terms", "classic", "--max-epochs", str(epochs),
             "--patience", str(epochs + 1), "--no-evaluate", "-q", "--threads", str(threads), "--out", str(out)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    rates = []
    for out, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(err.decode())
        summary = json.loads((out / "summary.json").read_text())
        rates.append(summary["steps"] / summary["train_seconds"])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from elbokit.build import available_cpus

    cpus = available_cpus()
    rows = [(1, 1), (1, cpus), (cpus, 1), (cpus, cpus)]
    results: dict[tuple[int, int], list[float]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for row in rows:
                results[row] += run_round(*row, args.epochs, Path(tmp) / f"round{r}")
                print(f"round {r + 1}: {row[0]} x {row[1]} threads done", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    print(f"{cpus} usable CPUs, {args.epochs} epochs per run, {args.rounds} rounds; load average at the end {load:.1f}")
    print(f"{'processes':>9} {'threads':>7} {'P x T / CPUs':>12} {'steps/s per process':>20} {'total steps/s':>14}")
    for (p, t), rates in results.items():
        per = statistics.median(rates)
        print(f"{p:>9} {t:>7} {p * t / cpus:>12.1f} {per:>20.1f} {per * p:>14.1f}")


if __name__ == "__main__":
    main()
