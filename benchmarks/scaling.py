"""How Shampoo's step time grows with the model: an MLP of two width×width layers, width 256 →
4096, at block sizes 128 and 1024, against Adam on the same parameters.

Only ``optimizer.step()`` is timed, with fixed random gradients; Shampoo computes its only roots
at step 1 (``precondition_frequency`` = 10⁹, ``start_preconditioning_step`` = 1), so every timed
step is a non-root step that preconditions. Adam and the Shampoo contenders of one width run in
interleaved rounds; the figures are medians and ratios within one run.

    python benchmarks/scaling.py            # widths 256…4096 (a few minutes on 2 CPU cores)
    python benchmarks/scaling.py --quick    # widths 64, 128 (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch_shampoo import Shampoo


def contenders(width: int, blocks: list[int]) -> dict[str, tuple[torch.optim.Optimizer, list]]:
    gen = torch.Generator().manual_seed(width)
    shapes = [(width, width), (width,), (width, width), (width,)]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    out: dict[str, tuple[torch.optim.Optimizer, list]] = {}

    def params() -> list[torch.Tensor]:
        return [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]

    adam_params = params()
    out["Adam"] = (torch.optim.Adam(adam_params, lr=1e-3), adam_params)
    for b in blocks:
        ps = params()
        opt = Shampoo(
            ps,
            lr=1e-3,
            block_size=b,
            precondition_frequency=10**9,
            start_preconditioning_step=1,
            async_roots=False,
        )
        out[f"Shampoo b{b}"] = (opt, ps)
    for opt, ps in out.values():  # warm-up: state, and Shampoo's only roots
        for _ in range(2):
            step(opt, ps, grads)
    return {k: (opt, [ps, grads]) for k, (opt, ps) in out.items()}


def step(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list) -> float:
    for p, g in zip(params, grads):
        p.grad = g
    began = time.perf_counter()
    opt.step()
    return time.perf_counter() - began


def run(widths: list[int], blocks: list[int], rounds: int, steps: int, log: Callable) -> list:
    rows = []
    for width in widths:
        log(f"width {width}: building (Shampoo computes its roots at step 1)")
        runs = contenders(width, blocks)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(rounds):
            names = list(runs)
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                opt, (ps, grads) = runs[name]
                times[name] += [step(opt, ps, grads) for _ in range(steps)]
        adam = statistics.median(times["Adam"])
        row = [str(width), f"{adam * 1e3:.2f}"]
        for b in blocks:
            shampoo = statistics.median(times[f"Shampoo b{b}"])
            row += [f"{shampoo * 1e3:.1f}", f"{shampoo / adam:.1f}x"]
        rows.append(row)
        log(f"width {width}: {row}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="widths 64 and 128")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per width")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = parser.parse_args(argv)
    widths = [64, 128] if args.quick else [256, 512, 1024, 2048, 4096]
    blocks = [32, 64] if args.quick else [128, 1024]

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    began = time.perf_counter()
    rows = run(widths, blocks, args.rounds, args.steps, log)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"cores {os.cpu_count()} | loadavg {load}"
    )
    print("optimizer.step() medians (ms) of an MLP with two width x width layers; ratio to Adam")
    headers = ["width", "Adam ms"]
    for b in blocks:
        headers += [f"b{b} ms", f"b{b}/Adam"]
    widths_col = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths_col)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths_col)))
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
