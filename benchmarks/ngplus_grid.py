"""The grid behind NG+'s defaults: damping x lr, then one change at a time from the defaults.

Every run trains the example's model from the same initialization on the same batches (seed 0)
for the example's default steps, with the example's warm-up and cosine schedule. Printed per run:
the final EMA-smoothed train loss ("diverged" if it became non-finite) and the steps it took to
reach SGD-momentum's final loss at SGD-momentum's best lr of a 3-point grid (run first).

    python benchmarks/ngplus_grid.py                 # ~6 minutes on a 2-core CPU, 1 thread
    python benchmarks/ngplus_grid.py --tasks digits  # ~30 seconds
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402
import train_charlm  # noqa: E402
import train_digits  # noqa: E402
import train_regression  # noqa: E402
from _common import Method, Task  # noqa: E402

TASKS = {
    "digits": (train_digits.build_task, train_digits),
    "charlm": (train_charlm.build_task, train_charlm),
    "regression": (train_regression.build_task, train_regression),
}

# One change at a time from the defaults, at the example's NG+ lr (the SGD graft: at SGD's).
ABLATIONS: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("nesterov=False", {"nesterov": False}),
    ("inverse_frequency=50", {"inverse_frequency": 50}),
    ("grafting='sgd'", {"grafting": "sgd"}),
    ("damping=1000 (~identity)", {"damping": 1000.0}),
    ("statistics='per_sample'", {"statistics": "per_sample"}),
]
DAMPINGS = (0.3, 1.0, 3.0)
SCALES = (0.3, 1.0, 3.0)


def run(task: Task, method: Method, steps: int, target: float) -> str:
    result = _common.train(task, method, steps, 0, max(steps // 10, 1), max(steps // 20, 1), False)
    if result.diverged:
        return "diverged"
    reached = result.steps_to(target) if math.isfinite(target) else None
    return f"{result.final_train:.4f}  steps to SGD's {'-' if reached is None else reached}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="override the examples' steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(_common.environment_header(), flush=True)
    for name in _common.parse_keys(args.tasks, tuple(TASKS)):
        build, module = TASKS[name]
        task = build()
        steps = args.steps or module.DEFAULT_STEPS
        _common.warm_up(task)
        sgd_lr = module.DEFAULT_LRS["sgd"]
        sgd = [
            _common.train(
                task, Method("sgd", sgd_lr * s), steps, 0, steps, max(steps // 20, 1), False
            )
            for s in SCALES
        ]
        best = min(sgd, key=lambda r: r.final_train)
        target = best.final_train
        sgd_steps = best.steps_to(target)
        print(
            f"\n== {name}: {steps} steps; SGD-momentum's best lr {best.lr:g}: final loss "
            f"{target:.4f}, reached at step {sgd_steps} ==",
            flush=True,
        )
        base = module.DEFAULT_LRS["ngplus"]
        for damping in DAMPINGS:
            for s in SCALES:
                method = Method("ngplus", base * s, {"damping": damping})
                outcome = run(task, method, steps, target)
                print(f"  damping {damping:<5g} lr {base * s:<8.2g} {outcome}", flush=True)
        for label, kwargs in ABLATIONS:
            key = "ngplus-ps" if kwargs.get("statistics") == "per_sample" else "ngplus"
            kwargs = {k: v for k, v in kwargs.items() if k != "statistics"}
            lr = best.lr if kwargs.get("grafting") == "sgd" else base
            method = Method(key, lr, kwargs)
            print(f"  {label:<26} lr {lr:<8.2g} {run(task, method, steps, target)}", flush=True)


if __name__ == "__main__":
    main()
