"""Shampoo's optimizer.step() eager vs torch.compile (inductor), side by side in one run.

For each model the two contenders take the same fixed gradients; the compiled one is warmed up
first (its compile time is reported separately), then both are timed in interleaved blocks and
the medians compared. Roots are computed once (precondition_frequency is huge), so the timed
steps are the statistics and update math that torch.compile traces.

    python benchmarks/compiled_step.py            # ~1 minute on an idle 2-core CPU
    python benchmarks/compiled_step.py --quick    # smoke run

Compile times come from inductor's on-disk cache when it is warm; point TORCHINDUCTOR_CACHE_DIR
at an empty directory for cold ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch_shampoo import Shampoo


def contender(depth: int, width: int, compiled: bool) -> tuple[Callable[[], object], float]:
    """A step function on its own copy of a depth x Linear(width, width) model, and the
    seconds its first three steps took (compilation included)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    params = list(nn.Sequential(*layers).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Shampoo(
        params,
        lr=1e-3,
        block_size=128,
        precondition_frequency=10**9,
        start_preconditioning_step=1,
        async_roots=False,
    )
    step = torch.compile(opt.step) if compiled else opt.step
    began = time.perf_counter()
    for _ in range(3):
        step()
    return step, time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | loadavg {load} | "
        f"python {platform.python_version()} | {platform.platform()}"
    )
    models = [(2, 32), (4, 16)] if args.quick else [(4, 256), (20, 64)]
    rounds, steps = (1, 3) if args.quick else (3, 20)
    print("model                  eager ms  compiled ms  eager/compiled  compile+3 steps s")
    for depth, width in models:
        eager, _ = contender(depth, width, compiled=False)
        compiled, warm = contender(depth, width, compiled=True)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(rounds):
            for name, step in (("eager", eager), ("compiled", compiled)):
                for _ in range(steps):
                    began = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - began)
        e, c = (statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))
        name = f"{depth}x Linear({width})"
        print(f"{name:<22} {e:9.2f} {c:12.2f} {e / c:15.2f} {warm:18.1f}")


if __name__ == "__main__":
    main()
