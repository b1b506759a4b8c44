"""Re-run the paper's Table II comparison with honest evaluation, and print it beside the
paper's numbers.

    python benchmarks/table2.py --out runs/table2 [--seeds 0 1 2] [--jobs 2]

Trains classic (VAE) and ed (ED-VAE) objectives, each with the standard-normal and the gmm
prior, on the paper's datasets 1 (gaussian) and 2 (mixture) with elbokit's defaults
(DESIGN.md section 6), one run per seed, through the `elbokit train` command; runs already
finished in --out are reused (the script can be stopped and started again). Every model is
scored by `elbokit evaluate` on its test split against its own prior (K = 1000). The table
gives the mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATASETS = {"gaussian": "dataset 1", "mixture": "dataset 2"}
MODELS = [("classic", "standard-normal"), ("classic", "gmm"), ("ed", "standard-normal"), ("ed", "gmm")]
PAPER = {  # Table II of the paper: MSE, KLD, "ELBO" (= -MSE - KLD), mean over 5 seeds
    ("classic", "gaussian"): (2.78, 10.2, -12.98), ("ed", "gaussian"): (1.54, 0.0, -1.54),
    ("classic", "mixture"): (20.7, 12.5, -33.2), ("ed", "mixture"): (19.36, 0.05, -19.41),
}
COLUMNS = ["elbo", "iwae", "exact_loglik", "recon", "kl", "mi", "marginal_kl", "active_units",
           "latent_r2", "paper_mse", "paper_kld", "paper_elbo"]


def run_one(out: Path, dataset: str, terms: str, prior: str, seed: int) -> dict:
    run_dir = out / f"{dataset}-{terms}-{prior}-s{seed}"
    summary = run_dir / "summary.json"
    if not summary.is_file():
        if run_dir.exists():  # an interrupted run: continue it
            cmd = ["train", "--resume", str(run_dir), "--quiet"]
        else:
            cmd = ["train", "--data", dataset, "--terms", terms, "--prior", prior, "--seed", str(seed),
                   "--out", str(run_dir), "--quiet"]
        subprocess.run([sys.executable, "-m", "elbokit.cli", *cmd], check=True)
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/table2"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(d, t, p, s) for d in DATASETS for t, p in MODELS for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = list(pool.map(lambda j: run_one(args.out, *j), jobs))
    results: dict[tuple[str, str, str], list[dict]] = {}
    for (d, t, p, _), summary in zip(jobs, summaries):
        results.setdefault((d, t, p), []).append({**summary["test"], "epochs": summary["epochs"]})

    def cell(rows: list[dict], key: str) -> str:
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    print(f"Test split, nats per example, mean ± sd over seeds {args.seeds}; log-likelihoods in data units.\n")
    print("| data | terms | prior | epochs | " + " | ".join(COLUMNS) + " |")
    print("|---" * (4 + len(COLUMNS)) + "|")
    for (d, t, p), rows in results.items():
        print(f"| {DATASETS[d]} | {t} | {p} | {cell(rows, 'epochs')} | " + " | ".join(cell(rows, c) for c in COLUMNS) + " |")
    print("\nThe paper's Table II (MSE, KLD, -MSE-KLD; not a bound):\n")
    print("| data | model | MSE | KLD | ELBO |\n|---|---|---|---|---|")
    for (t, d), (mse, kld, elbo) in PAPER.items():
        print(f"| {DATASETS[d]} | {'VAE' if t == 'classic' else 'ED-VAE'} | {mse} | {kld} | {elbo} |")


if __name__ == "__main__":
    main()
