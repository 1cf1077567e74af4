"""Root work and state memory per rank under DDP: replicated, ``partition_roots=True`` and
``partition_state=True`` (CPU, gloo).

Spawns 2 and 4 processes (1 torch thread each); each trains the same DDP MLP (``--depth``
hidden layers of ``--width``) with synchronous Shampoo (the roots inside the step, so their
time is on the step) for a few root cycles, replicated and with each partition, and reports
per rank: the seconds spent solving roots (``root_stats()``) and the optimizer's state bytes
(moments, factors, roots: ``root_stats()["state_bytes"]``), each as a fraction of the
replicated rank's, and the median and mean step time (root steps included) against DDP + Adam
in the same process.

    python benchmarks/distributed_roots.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


MODES = ("replicated", "roots", "state")


def _worker(
    rank: int, world: int, store: str, out: str, steps: int, width: int, depth: int
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import torch_shampoo

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, width, generator=gen), torch.randn(32, 16, generator=gen))] * 4
    results = {}
    for name in ("adam", *MODES):
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        model = DistributedDataParallel(nn.Sequential(*layers, nn.Linear(width, 16)))
        if name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        else:
            opt = torch_shampoo.Shampoo(
                model.parameters(),
                lr=1e-3,
                block_size=128,
                precondition_frequency=5,
                async_roots=False,
                partition_roots=name == "roots",
                partition_state=name == "state",
            )
        times = []
        for step in range(steps):
            x, y = data[step % len(data)]
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            dist.barrier()
            began = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - began)
        stats = opt.root_stats() if hasattr(opt, "root_stats") else {}
        if hasattr(opt, "close"):
            opt.close()
        solved = stats.get("roots_solved_here", 0)
        seconds = stats.get("mean_root_seconds", 0.0) * stats.get("roots_computed", 0)
        held = stats.get("state_bytes", 0)
        results[name] = (statistics.median(times), statistics.mean(times), solved, seconds, held)
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, loadavg {os.getloadavg()}")
    for world in (2, 4):
        folder = Path(tempfile.mkdtemp())
        mp.spawn(
            _worker,
            args=(
                world,
                str(folder / "store"),
                str(folder / "rank"),
                args.steps,
                args.width,
                args.depth,
            ),
            nprocs=world,
            join=True,
        )
        ranks = [torch.load(folder / f"rank.{r}", weights_only=False) for r in range(world)]
        print(
            f"\n== {world} processes: MLP {args.depth} x {args.width} + head 16, block 128, "
            f"sync roots every 5 steps, {args.steps} steps"
        )
        print(
            "rank  mode        root s  fraction  roots solved  state MB  fraction  "
            "median/Adam  mean/Adam"
        )
        for r, res in enumerate(ranks):
            adam, repl = res["adam"], res["replicated"]
            for mode in MODES:
                m = res[mode]
                print(
                    f"{r:>4}  {mode:<10}  {m[3]:>6.3f}  {m[3] / repl[3]:>8.2f}  "
                    f"{m[2]:>5} / {repl[2]:<5}  {m[4] / 2**20:>8.2f}  {m[4] / repl[4]:>8.2f}  "
                    f"{m[0] / adam[0]:>11.1f}  {m[1] / adam[1]:>9.1f}"
                )
        print(f"(1 / world size = {1 / world:.2f}; loadavg {os.getloadavg()})")


if __name__ == "__main__":
    main()
