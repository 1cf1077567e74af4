"""Shampoo without a graft (``grafting="none"``) across ε and lr, against the default Adam graft.

Without a graft the step size is Shampoo's own: X = (F + εI)^(−1/4) per side scales the
directions that the gradients have barely reached by up to ε^(−1/4), so the default ε = 1e-12
(chosen for a grafted step, whose size is Adam's) is far too small there. The task is a small
regression MLP (8-70-12-3 with a LayerNorm, batch 32, full-data MSE after the last step), every
run from the same initial weights and batches. A run that diverges ends in a non-finite loss or
in the optimizer's error after ``max_root_failures`` non-finite factors.

    python benchmarks/ungrafted_eps.py             # about a minute on 1 CPU thread
    python benchmarks/ungrafted_eps.py --quick     # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch_shampoo import Shampoo

EPSILONS = (1e-12, 1e-8, 1e-6, 1e-4)
LRS = (1e-2, 1e-3, 1e-4)


def _task() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen)
    return x, torch.tanh(x @ torch.randn(8, 3, generator=gen))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 70), nn.Tanh(), nn.Linear(70, 12), nn.LayerNorm(12), nn.Linear(12, 3)
    )  # fmt: skip


def final_loss(steps: int, **kwargs: Any) -> float:
    """Full-data MSE after ``steps`` Shampoo steps (synchronous roots every 5 steps); NaN or
    ±inf when the run diverged."""
    x, y = _task()
    model = _model()
    opt = Shampoo(model.parameters(), precondition_frequency=5, async_roots=False, **kwargs)
    batches = torch.Generator().manual_seed(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (failed roots, kept as they were)
            for _ in range(steps):
                rows = torch.randint(0, len(x), (32,), generator=batches)
                opt.zero_grad()
                nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
                opt.step()
    except RuntimeError:  # max_root_failures consecutive non-finite factors
        return math.nan
    finally:
        opt.close()
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="10 steps, two ε, two lrs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = 10 if args.quick else args.steps
    epsilons = EPSILONS[::3] if args.quick else EPSILONS
    lrs = LRS[:2] if args.quick else LRS
    print(f"load average {os.getloadavg()}, 1 thread, {steps} steps, batch 32")
    graft = final_loss(steps, lr=1e-3)
    print(f"Adam graft (default), eps 1e-12, lr 1e-3: {graft:.4g}")
    print("grafting='none'   " + "".join(f"lr {lr:<10g}" for lr in lrs))
    for eps in epsilons:
        losses = [final_loss(steps, lr=lr, grafting="none", epsilon=eps) for lr in lrs]
        cells = "".join(f"{f'{v:.4g}' if math.isfinite(v) else 'diverged':<13s}" for v in losses)
        print(f"eps {eps:<13g}{cells}")


if __name__ == "__main__":
    main()
