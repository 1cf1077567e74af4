"""Whole training step (forward, backward, step) of SOAP against Shampoo and Adam on the demos.

Each contender trains the demo's model from the same initialization on the same batches for
the demo's default steps, at the demo's default lr; contenders run one after another in
interleaved rounds (the order rotating), so a burst of load from elsewhere hits them alike.
Printed per demo: the median step and the mean step (training wall time / steps: root steps
and waits for roots included, what a run pays per step), both as ratios to Shampoo async's.
On a CPU-only machine the root pool shares the cores with training, so an async run's median
holds the pool's contention while a sync run's leaves out its root steps; the mean counts both.
"SOAP async e=1" is SOAP with ``eigh_every=1`` (the pool's eigh at every root step, the
default before 2026-12-01's ``eigh_every=5``).

    python benchmarks/soap_train_step.py                 # ~8 minutes on 2 cores
    python benchmarks/soap_train_step.py --quick         # seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import train_charlm
import train_digits

import torch_shampoo

CONTENDERS: dict[str, Callable[[Any, float, float], torch.optim.Optimizer]] = {
    "Adam": lambda p, adam_lr, shampoo_lr: torch.optim.Adam(p, lr=adam_lr),
    "Shampoo async": lambda p, adam_lr, shampoo_lr: torch_shampoo.Shampoo(p, lr=shampoo_lr),
    "Shampoo sync": lambda p, adam_lr, shampoo_lr: torch_shampoo.Shampoo(
        p, lr=shampoo_lr, async_roots=False
    ),
    "SOAP async": lambda p, adam_lr, shampoo_lr: torch_shampoo.SOAP(p, lr=adam_lr),
    "SOAP sync": lambda p, adam_lr, shampoo_lr: torch_shampoo.SOAP(
        p, lr=adam_lr, async_roots=False
    ),
    "SOAP async e=1": lambda p, adam_lr, shampoo_lr: torch_shampoo.SOAP(
        p, lr=adam_lr, eigh_every=1
    ),
}


def measure(demo: str, rounds: int, quick: bool) -> None:
    if demo == "digits":
        task, lrs, steps = train_digits.build_task(), train_digits.DEFAULT_LRS, 150
    else:
        task = (
            train_charlm.build_task(d_model=32, layers=1, seq_len=32, batch=8)
            if quick
            else train_charlm.build_task()
        )
        lrs, steps = train_charlm.DEFAULT_LRS, 300
    steps = 30 if quick else steps
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    names = list(CONTENDERS)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            torch.manual_seed(0)
            model = task.build_model()
            opt = CONTENDERS[name](model.parameters(), lrs["adam"], lrs["shampoo"])
            batches = task.batches(0)
            for _ in range(steps):
                x, y = next(batches)
                began = time.perf_counter()
                opt.zero_grad()
                task.loss(model(x), y).backward()
                opt.step()
                times[name].append(time.perf_counter() - began)
            if hasattr(opt, "close"):
                opt.close()
    base = times["Shampoo async"]
    mean0, median0 = statistics.mean(base), statistics.median(base)
    print(f"\n== {demo}: {steps} steps x {rounds} rounds; loadavg {os.getloadavg()}")
    print("method            median ms  mean ms  median / Shampoo async  mean / Shampoo async")
    for name, t in times.items():
        mean, median = statistics.mean(t), statistics.median(t)
        print(
            f"{name:<16}  {median * 1e3:>9.2f}  {mean * 1e3:>7.2f}  {median / median0:>22.2f}  "
            f"{mean / mean0:>20.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--demos", default="digits,charlm")
    parser.add_argument("--rounds", type=int, default=None, help="default: digits 4, charlm 2")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for demo in args.demos.split(","):
        rounds = args.rounds or (1 if args.quick else 4 if demo == "digits" else 2)
        measure(demo, rounds, args.quick)


if __name__ == "__main__":
    main()
