"""Minibatches from a memory-mapped .npy file against the in-memory tensor: what streaming
costs per step, and whether a prefetch thread could hide it.

For a float32 file (rows x width) in the page cache, it times, per minibatch of a random
permutation: indexing the in-memory standardised tensor; `StreamedRows` (sorted reads, the
float64 cast and the standardisation); the same with unsorted reads; and one training step of
the paper's MLP (2 x 400) on the batch. A prefetch thread can hide at most the read time, and
only if the step leaves a core free. Prints a table (seconds per minibatch, medians of 3).

    python benchmarks/bench_streaming.py [--rows 200000] [--width 256] [--batch 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def per_batch(fn, perm, batch, steps):
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(steps):
            fn(perm[i * batch:(i + 1) * batch])
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def main() -> None:
    from elbokit.data import RowView, Standardizer, StreamedRows
    from elbokit import config
    from elbokit.build import build_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.rows, args.width))
        rng = np.random.default_rng(0)
        for s in range(0, args.rows, 10000):
            mm[s:s + 10000] = rng.standard_normal((min(10000, args.rows - s), args.width), dtype=np.float32)
        mm.flush()
        del mm
        view = RowView(np.load(path, mmap_mode="r"))
        st = Standardizer.fit(view)
        streamed = StreamedRows(view, st)
        in_memory = torch.as_tensor(st.transform(np.load(path).astype(np.float64)), dtype=torch.float32)
        perm = torch.randperm(args.rows, generator=torch.Generator().manual_seed(0))

        def unsorted(idx):
            rows = np.asarray(view.array[idx.numpy()], dtype=np.float64)
            return torch.as_tensor(st.transform(rows), dtype=torch.float32)

        cfg = config.resolve({"model": {"latent_dim": 5}})
        model = build_model(cfg, (args.width,))
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def step(idx):
            x = in_memory[idx]
            batch = model(x, None)
            loss = ((batch.x_recon - x) ** 2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        rows = [("in-memory tensor, x[idx]", per_batch(lambda i: in_memory[i], perm, args.batch, args.steps)),
                ("StreamedRows (sorted reads)", per_batch(lambda i: streamed[i], perm, args.batch, args.steps)),
                ("memmap, unsorted reads", per_batch(unsorted, perm, args.batch, args.steps)),
                ("one training step, mlp 2x400", per_batch(step, perm, args.batch, args.steps))]
    print(f"rows={args.rows} width={args.width} float32 ({args.rows * args.width * 4 / 1e6:.0f} MB, page cache), "
          f"batch={args.batch}, threads={torch.get_num_threads()}")
    print(f"| {'what':<32} | ms per minibatch |")
    print(f"|{'-' * 34}|------------------|")
    for name, sec in rows:
        print(f"| {name:<32} | {sec * 1e3:16.2f} |")


if __name__ == "__main__":
    main()
