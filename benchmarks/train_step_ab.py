"""Whole training steps (forward, backward, Shampoo's step) of the README's main demo model, the
character LM, for two versions of the package side by side: both imported into one process, their
steps alternating (the order flipping every step), each version's own model and batches; prints
the median and mean of the full step and of ``optimizer.step()``, and new/old ratios. The
default is what a user gets: asynchronous roots, "auto" staleness, torch's 2 threads here.

    python benchmarks/train_step_ab.py --compare ../baseline            # async roots
    python benchmarks/train_step_ab.py --compare ../baseline --sync     # synchronous roots
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bucket_ab import load_package  # noqa: E402
from train_charlm import build_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, required=True, help="another checkout")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--warmup", type=int, default=40, help="steps left out of the figures")
    parser.add_argument("--sync", action="store_true", help="synchronous roots")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    packages = {
        "old": load_package(args.compare.resolve(), "torch_shampoo_old"),
        "new": load_package(ROOT, "torch_shampoo_new"),
    }
    task = build_task()
    models, opts, batches = {}, {}, {}
    for key, package in packages.items():
        torch.manual_seed(0)
        models[key] = task.build_model()
        opts[key] = package.Shampoo(models[key].parameters(), lr=0.01, async_roots=not args.sync)
        batches[key] = task.batches(0)
    full: dict[str, list[float]] = {k: [] for k in packages}
    step: dict[str, list[float]] = {k: [] for k in packages}
    mode = "synchronous" if args.sync else "async"
    print(f"load average {os.getloadavg()}, threads {torch.get_num_threads()}, {mode} roots")
    for t in range(1, args.steps + 1):
        for key in list(packages) if t % 2 else list(packages)[::-1]:
            x, y = next(batches[key])
            began = time.perf_counter()
            opts[key].zero_grad()
            F.cross_entropy(models[key](x).flatten(0, 1), y.flatten()).backward()
            stepping = time.perf_counter()
            opts[key].step()
            ended = time.perf_counter()
            if t > args.warmup:
                full[key].append(ended - began)
                step[key].append(ended - stepping)
    for key in packages:
        stats = opts[key].root_stats()  # type: ignore[attr-defined]
        print(
            f"{key}: full step median {statistics.median(full[key]) * 1e3:.2f} ms, mean "
            f"{statistics.fmean(full[key]) * 1e3:.2f} ms; optimizer.step() median "
            f"{statistics.median(step[key]) * 1e3:.2f} ms, mean "
            f"{statistics.fmean(step[key]) * 1e3:.2f} ms; staleness "
            f"{stats['root_staleness']}, stalls {stats['stalls']}"
        )
        opts[key].close()  # type: ignore[attr-defined]
    for name, times in (("full step", full), ("optimizer.step()", step)):
        median = statistics.median(times["new"]) / statistics.median(times["old"])
        mean = statistics.fmean(times["new"]) / statistics.fmean(times["old"])
        print(f"new/old {name}: median {median:.3f}, mean {mean:.3f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
