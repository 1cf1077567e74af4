"""NG+ damping 1 against 3 (both statistics), interleaved in one run, with the protocol of
benchmarks/convergence.py (its tasks and steps, lr grid 0.3/1/3, best lr, steps to SGD-momentum's
best final loss). The measurement behind NG+'s default damping.

    python benchmarks/ngplus_damping_ab.py      # ~8 minutes on 2 cores
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import convergence  # noqa: E402

print(os.getloadavg())
for task_name, spec in convergence.TASKS.items():
    task = spec.build(False)
    steps = spec.steps
    ev, wu = max(steps // 10, 1), max(steps // 20, 1)
    _common.warm_up(task)
    sgd = [
        _common.train(
            task,
            _common.Method("sgd", spec.lrs["sgd"] * s, {"momentum": 0.9}),
            steps,
            0,
            ev,
            wu,
            False,
        )
        for s in (0.3, 1, 3)
    ]
    best_sgd = min((r for r in sgd if not r.diverged), key=lambda r: r.final_train)
    target, sgd_steps = best_sgd.final_train, best_sgd.steps_to(best_sgd.final_train)
    for key in ("ngplus", "ngplus-ps"):
        runs = {1.0: [], 3.0: []}
        for s in (0.3, 1, 3):
            for damping in (1.0, 3.0):  # interleaved
                runs[damping].append(
                    _common.train(
                        task,
                        _common.Method(key, spec.lrs["ngplus"] * s, {"damping": damping}),
                        steps,
                        0,
                        ev,
                        wu,
                        False,
                    )
                )
        for damping, rs in runs.items():
            best = min(rs, key=lambda r: r.final_train if not r.diverged else float("inf"))
            n = best.steps_to(target)
            div = [r.lr for r in rs if r.diverged]
            ratio = "-" if n is None else f"{n / sgd_steps:.3f}"
            print(
                f"{task_name:10s} {key:10s} damping {damping}: best lr {best.lr:g}, "
                f"to SGD's loss {n} ({ratio}), diverged lrs {div}",
                flush=True,
            )
print(os.getloadavg())
