"""Root work, state and step time per rank under DDP (CPU, gloo): replicated Shampoo against
``partition_roots=True`` and ``partition_state=True``.

Spawns 2 and 4 processes (quick: 2), 1 torch thread each; each trains the same DDP MLP
(--depth hidden layers of --width) with synchronous Shampoo (roots inside the step, so their time
is on the step) for a few root cycles, then DDP + Adam in the same process, and reports per
rank: the seconds spent solving roots (``root_stats()``: mean root seconds x roots computed), the
roots solved here, the state bytes (``harness.state_bytes``, the suite's one measure), each as a
fraction of the replicated rank's, and the median and mean step (root steps included) over Adam's.

    python -m benchmarks.distributed --quick
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from . import harness as h

MODES = ("replicated", "roots", "state")


def _worker(rank: int, world: int, folder: str, steps: int, width: int, depth: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)  # fmt: skip
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, width, generator=gen), torch.randn(32, 16, generator=gen))] * 4
    results: dict[str, Any] = {}
    for name in ("adam", *MODES):
        torch.manual_seed(0)
        model = DistributedDataParallel(h.tanh_stack(depth, width, out=16))
        extra: dict[str, Any] = {} if name == "adam" else {
            "block": 128, "precondition_frequency": 5, "partition_roots": name == "roots",
            "partition_state": name == "state"}
        opt = h.optimizer("adam" if name == "adam" else "shampoo-sync", model.parameters(),
                          **extra)  # fmt: skip
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
        results[name] = {
            "median": statistics.median(times), "mean": statistics.fmean(times),
            "solved": stats.get("roots_solved_here", 0), "state_bytes": h.state_bytes(opt),
            "root_seconds": stats.get("mean_root_seconds", 0.0) * stats.get("roots_computed", 0),
        }  # fmt: skip
        h.close(opt)
    torch.save(results, f"{folder}/rank.{rank}")
    dist.barrier()
    # Exit without tearing down: a DDP Reducer dropping the last reference to gloo's process
    # group joins its run loop while holding the GIL, and that loop may wait for the GIL to free
    # a tensor (a hang seen twice on 2026-12-08, in torch's destructors, not in this package).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__, compare=False, rounds=False)
    p.add_argument("--steps", type=int, default=None, help="steps per mode (21; quick 11)")
    p.add_argument("--width", type=int, default=None, help="hidden width (256; quick 64)")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (6; quick 3)")
    p.add_argument("--worlds", default=None, help="process counts (2,4; quick 2)")
    args = p.parse_args(argv)
    steps = args.steps or (11 if args.quick else 21)
    width = args.width or (64 if args.quick else 256)
    depth = args.depth or (3 if args.quick else 6)
    report = h.Report("distributed", args)
    for world in [int(w) for w in (args.worlds or ("2" if args.quick else "2,4")).split(",")]:
        folder = tempfile.mkdtemp(prefix="bench_ddp_")
        h.log(f"{world} processes")
        mp.spawn(_worker, args=(world, folder, steps, width, depth), nprocs=world, join=True)
        ranks = [torch.load(Path(folder) / f"rank.{r}", weights_only=False) for r in range(world)]
        rows = []
        for r, res in enumerate(ranks):
            adam, repl = res["adam"], res["replicated"]
            for mode in MODES:
                m = res[mode]
                rows.append([
                    r, mode, f"{m['root_seconds']:.3f}",
                    h.ratio(m["root_seconds"], repl["root_seconds"]),
                    f"{m['solved']} / {repl['solved']}", h.mb(m["state_bytes"]),
                    h.ratio(m["state_bytes"], repl["state_bytes"]),
                    h.ratio(m["median"], adam["median"]), h.ratio(m["mean"], adam["mean"]),
                ])  # fmt: skip
        report.section(
            f"{world} processes: MLP {depth} x {width} + head 16, block 128, sync roots every 5 "
            f"steps, {steps} steps", ["rank", "mode", "root s", "/replicated", "roots solved",
            "state MB", "/replicated", "median/Adam", "mean/Adam"], rows,
            f"1 / world size = {1 / world:.2f}; {os.cpu_count()} cores", ranks,
        )  # fmt: skip
    report.finish()


if __name__ == "__main__":
    main()
