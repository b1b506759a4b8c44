"""Training steps on 1 and 2 processes (torch.distributed, gloo, CPU): steps/s, samples/s and the
share of the step spent in the global batch's all-gather (forward and backward).

    python benchmarks/bench_distributed.py [--steps 60] [--repeats 3] [--batch-size 512]

The step is the one `elbokit train` takes: the paper's VAE (2 x 400 ReLU, latent 5, data 20),
the `ed` objective (recon, infonce, entropy mws, xent), Adam; the batch size is the global
batch, split evenly across processes, and every process has one intra-op thread. Each
configuration runs `--repeats` times, interleaved, in fresh processes; the table shows the
median. On a machine whose cores are busy with other work the 2-process figures are bounded by
what the scheduler gives; read the ratios, measured in the same run, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

WARMUP = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, steps: int, batch_size: int, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import elbokit
    from elbokit import distributed

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    gather_seconds = [0.0]
    forward, backward = distributed._AllGatherRows.forward, distributed._AllGatherRows.backward

    def timed(fn):
        def run(*args):
            t0 = time.perf_counter()
            result = fn(*args)
            gather_seconds[0] += time.perf_counter() - t0
            return result
        return staticmethod(run)

    distributed._AllGatherRows.forward = timed(forward)
    distributed._AllGatherRows.backward = timed(backward)

    torch.manual_seed(0)
    n, data_dim = 8192, 20
    x = torch.randn(n, data_dim)
    x_pos = x + 0.1 * torch.randn(n, data_dim)
    model = elbokit.VAE(data_dim, 5)
    prior = elbokit.make_prior("standard-normal", dim=5)
    objective = elbokit.build_objective("ed", prior, dataset_size=n, has_positives=True)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.objective = model, objective

        def forward(self, xb, xb_pos):
            return self.objective(self.model(xb, xb_pos, dataset_size=n)).loss

    step = Step()
    if world > 1:
        distributed.use_global_batch(objective, seed=0)
        step = DDP(step)
    optimiser = torch.optim.Adam(step.parameters(), lr=1e-3)
    local = batch_size // world
    generator = torch.Generator().manual_seed(0)
    start = 0.0
    for i in range(WARMUP + steps):
        if i == WARMUP:
            if world > 1:
                dist.barrier()
            gather_seconds[0], start = 0.0, time.perf_counter()
        idx = torch.randint(0, n, (batch_size,), generator=generator)[rank * local:(rank + 1) * local]
        loss = step(x[idx], x_pos[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(f"{seconds} {gather_seconds[0]}")
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, steps: int, batch_size: int) -> tuple[float, float]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_worker, args=(world, _free_port(), steps, batch_size, out), nprocs=world, join=True)
        seconds, gather = (float(v) for v in Path(out).read_text().split())
    return seconds, gather


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    worlds = (1, 2)
    runs: dict[int, list[tuple[float, float]]] = {w: [] for w in worlds}
    for _ in range(args.repeats):
        for world in worlds:
            runs[world].append(measure(world, args.steps, args.batch_size))
    print(f"global batch {args.batch_size}, {args.steps} steps, median of {args.repeats}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    print("| processes | steps/s | samples/s | speed-up | all-gather share of the step |")
    print("|---|---|---|---|---|")
    base = None
    for world in worlds:
        seconds = statistics.median(s for s, _ in runs[world])
        share = statistics.median(g / s for s, g in runs[world])
        rate = args.steps / seconds
        base = base or rate
        gather = f"{100 * share:.1f}%" if world > 1 else "- (no gather)"
        print(f"| {world} | {rate:.1f} | {rate * args.batch_size:.0f} | {rate / base:.2f}x | {gather} |")


if __name__ == "__main__":
    main()
