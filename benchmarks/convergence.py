"""Convergence benchmark: tasks x optimizers x a small learning-rate grid.

For every task (digits CNN, character LM, teacher regression; built by the example scripts) and
optimizer, each lr in the grid (the example's default lr times --lr-scales) trains from the same
initialization on the same batches. The targets are Adam's and SGD-momentum's best final
(EMA-smoothed) training losses; for every optimizer's best lr the benchmark reports the final
losses, the steps (and their ratio to SGD-momentum's own) and training wall time it took to reach
them, and which lrs of the grid diverged. Results go to convergence.json and convergence.png in
--out-dir.

    python benchmarks/convergence.py            # full run (~11 minutes on a 2-core CPU)
    python benchmarks/convergence.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402
import train_charlm  # noqa: E402
import train_digits  # noqa: E402
import train_regression  # noqa: E402
from _common import RunResult, Task  # noqa: E402

METHODS = (
    "sgd",
    "adam",
    "shampoo-async",
    "soap",
    "soap-sync",
    "soap-stale",
    "soap-ref",
    "ngplus",
    "ngplus-ps",
)


@dataclass(frozen=True)
class TaskSpec:
    """How to build one benchmark task, its base lrs and its default step count."""

    build: Callable[[bool], Task]
    lrs: dict[str, float]
    ngplus_damping: float | None
    steps: int
    quick_steps: int


TASKS = {
    "digits": TaskSpec(
        lambda quick: train_digits.build_task(batch=32 if quick else 64),
        train_digits.DEFAULT_LRS,
        train_digits.NGPLUS_DAMPING,
        steps=train_digits.DEFAULT_STEPS,
        quick_steps=40,
    ),
    "charlm": TaskSpec(
        lambda quick: (
            train_charlm.build_task(d_model=32, layers=1, seq_len=32, batch=8, val_batches=2)
            if quick
            else train_charlm.build_task()
        ),
        train_charlm.DEFAULT_LRS,
        train_charlm.NGPLUS_DAMPING,
        steps=train_charlm.DEFAULT_STEPS,
        quick_steps=20,
    ),
    "regression": TaskSpec(
        lambda quick: train_regression.build_task(train_size=512 if quick else 4096),
        train_regression.DEFAULT_LRS,
        train_regression.NGPLUS_DAMPING,
        steps=train_regression.DEFAULT_STEPS,
        quick_steps=30,
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument(
        "--lr-scales",
        default=None,
        help="lr grid as multiples of the default lr (default 0.3,1,3; --quick: 1)",
    )
    parser.add_argument("--steps", type=int, default=None, help="override every task's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models and step counts")
    parser.add_argument("--out-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.lr_scales is None:
        args.lr_scales = "1" if args.quick else "0.3,1,3"
    return args


SGD = "SGD-momentum"


def summarize(runs: Sequence[RunResult]) -> tuple[float, dict[str, RunResult]]:
    """Adam's best final train loss (the target) and each method's best-lr run."""
    best: dict[str, RunResult] = {}
    for run in runs:
        if run.method not in best or run.final_train < best[run.method].final_train:
            best[run.method] = run
    target = best["Adam"].final_train if "Adam" in best else math.inf
    return target, best


def sgd_target(best: dict[str, RunResult]) -> tuple[float, int | None]:
    """SGD-momentum's best final train loss and the steps its best run took to reach it."""
    if SGD not in best or best[SGD].diverged:
        return math.inf, None
    run = best[SGD]
    return run.final_train, run.steps_to(run.final_train)


def run_record(run: RunResult, target: float, sgd_loss: float = math.inf) -> dict[str, Any]:
    """JSON-serializable summary and curves of one run (non-finite numbers become null)."""

    def num(x: float | None) -> float | None:
        return x if x is not None and math.isfinite(x) else None

    return {
        "method": run.method,
        "lr": run.lr,
        "diverged": run.diverged,
        "final_train_loss": num(run.final_train),
        "final_eval_loss": num(run.final_eval),
        "final_eval_acc": run.eval_accs[-1] if run.eval_accs and not run.diverged else None,
        "steps_to_target": run.steps_to(target),
        "steps_to_sgd_best": run.steps_to(sgd_loss) if math.isfinite(sgd_loss) else None,
        "wall_to_target": run.wall_to(target),
        "wall": run.wall,
        "ms_per_step": run.ms_per_step,
        "mean_ms_per_step": run.mean_ms_per_step,
        "root_stats": run.root_stats,
        "train_losses": run.train_losses,
        "step_times": run.step_times,
        "eval_steps": run.eval_steps,
        "eval_losses": run.eval_losses,
    }


def grid_table(runs: Sequence[RunResult]) -> str:
    """Final smoothed train loss for every (method, lr) in the grid."""
    rows = [
        [r.method, f"{r.lr:g}", "diverged" if r.diverged else f"{r.final_train:.4f}"] for r in runs
    ]
    return _common.format_table(["method", "lr", "final train loss"], rows)


def summary_table(best: dict[str, RunResult], target: float, runs: Sequence[RunResult]) -> str:
    """Best-lr results with steps and wall time to the target loss, steps to SGD-momentum's
    best loss (and their ratio to SGD-momentum's own), and the diverged lrs of the grid."""
    sgd_loss, sgd_steps = sgd_target(best)
    rows = []
    for r in best.values():
        wall = r.wall_to(target)
        steps = r.steps_to(target)
        to_sgd = r.steps_to(sgd_loss) if math.isfinite(sgd_loss) else None
        ratio = "-" if to_sgd is None or not sgd_steps else f"{to_sgd / sgd_steps:.2f}"
        diverged = [f"{x.lr:g}" for x in runs if x.method == r.method and x.diverged]
        rows.append(
            [
                r.method,
                f"{r.lr:g}",
                "diverged" if r.diverged else f"{r.final_train:.4f}",
                f"{r.final_eval:.4f}" if math.isfinite(r.final_eval) else "-",
                "-" if steps is None else str(steps),
                "-" if wall is None else f"{wall:.1f}",
                "-" if to_sgd is None else str(to_sgd),
                ratio,
                ",".join(diverged) or "none",
                f"{r.ms_per_step:.1f}",
                f"{r.mean_ms_per_step:.1f}",
            ]
        )
    headers = [
        "method",
        "best lr",
        "train loss",
        "eval loss",
        "steps to target",
        "wall to target (s)",
        "steps to SGD's",
        "/ SGD's",
        "diverged lrs",
    ]
    table = _common.format_table([*headers, "ms/step", "mean ms/step"], rows)
    return table + (
        "\nms/step: median training step (forward, backward, step); mean ms/step: training "
        "wall time / steps (root steps and waits for roots included)"
    )


def plot(summaries: dict[str, tuple[float, dict[str, RunResult]]], path: Path) -> None:
    """Best-lr smoothed training curves per task, against steps (top) and wall time (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(summaries), figsize=(6 * len(summaries), 8), squeeze=False, constrained_layout=True
    )
    for col, (task, (target, best)) in enumerate(summaries.items()):
        for r in best.values():
            label = f"{r.method} (lr {r.lr:g})"
            axes[0, col].plot(range(1, len(r.train_losses) + 1), r.smoothed, label=label)
            axes[1, col].plot(r.cumulative_wall, r.smoothed, label=label)
        for row, xlabel in enumerate(["step", "training wall time (s)"]):
            ax = axes[row, col]
            if math.isfinite(target):
                ax.axhline(target, color="gray", linestyle="--", linewidth=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("train loss (EMA)")
            _common.style_loss_axis(ax)
        axes[0, col].set_title(f"{task} (dashed: Adam's best final loss)")
        axes[0, col].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON report that is also written to --out-dir."""
    args = parse_args(argv)
    scales = [float(s) for s in args.lr_scales.split(",")]
    tasks = _common.parse_keys(args.tasks, tuple(TASKS))
    keys = _common.parse_keys(args.methods, _common.METHOD_KEYS)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(_common.environment_header(), flush=True)
    progress = not args.quiet and sys.stderr.isatty()
    report: dict[str, Any] = {
        "environment": _common.environment(),
        "config": {**vars(args), "out_dir": str(args.out_dir)},
        "tasks": {},
    }
    summaries = {}
    for name in tasks:
        spec = TASKS[name]
        task = spec.build(args.quick)
        steps = args.steps or (spec.quick_steps if args.quick else spec.steps)
        eval_every = max(steps // 10, 1)
        warmup = max(steps // 20, 1)
        methods = _common.available(
            [
                _common.make_method(
                    k, {g: lr * s for g, lr in spec.lrs.items()}, ngplus_damping=spec.ngplus_damping
                )
                for k in keys
                for s in scales
            ]
        )
        print(f"\n== {name}: {steps} steps, lr scales {scales} ==", flush=True)
        _common.warm_up(task)
        runs = []
        for method in methods:
            run = _common.train(task, method, steps, args.seed, eval_every, warmup, progress)
            status = "diverged" if run.diverged else f"{run.final_train:.4f}"
            print(f"{run.method:>14} lr {run.lr:<8g} final train loss {status}", flush=True)
            runs.append(run)
        target, best = summarize(runs)
        summaries[name] = (target, best)
        print(f"\n{name}: final train loss over the lr grid\n{grid_table(runs)}")
        print(f"\n{name}: best lr per method; target = Adam's best final train loss {target:.4f}")
        sgd_loss = sgd_target(best)[0]
        print(f"(SGD-momentum's best final train loss {sgd_loss:.4f})")
        print(summary_table(best, target, runs))
        report["tasks"][name] = {
            "steps": steps,
            "target": target if math.isfinite(target) else None,
            "best_lr": {m: r.lr for m, r in best.items()},
            "sgd_best": sgd_loss if math.isfinite(sgd_loss) else None,
            "runs": [run_record(r, target, sgd_loss) for r in runs],
        }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / "convergence.json"
    json_path.write_text(json.dumps(report, indent=1))
    plot(summaries, args.out_dir / "convergence.png")
    print(f"\nwrote {json_path} and {args.out_dir / 'convergence.png'}")
    return report


if __name__ == "__main__":
    main()
