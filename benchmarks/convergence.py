"""Convergence on the three demos (digits CNN, character LM, teacher regression): steps and wall
time to Adam's loss over a learning-rate grid, and NG+'s damping x lr grid and ablations.

Every run trains the example's model from the same initialization on the same batches with the
example's warm-up and cosine schedule (examples/_common.py's ``train``). Sections:

  grid    per task, every method at the example's default lr x --lr-scales: final EMA-smoothed
          training losses; per method's best lr the steps and wall time to reach Adam's best
          final loss (the target), the steps to SGD-momentum's best loss and their ratio to
          SGD's own, the lrs that diverged, the median and mean step; curves in a PNG beside the
          JSON (docs/render.py --run: docs/images/demos.png).
  ngplus  NG+: damping x lr (3 x 3), then one change at a time from the defaults, each run's
          final loss and steps to SGD-momentum's best loss.
  seeds   per task, Adam and --methods at their default lr over --seeds: the steps to Adam's
          final loss of the same seed, their mean and its ratio to the first method's (the
          baseline, e.g. shampoo-sync), the mean final loss and its ratio, the mean wall time.

    python -m benchmarks.convergence --quick
    python -m benchmarks.convergence --sections ngplus --tasks digits
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from . import harness as h

METHODS = ("sgd", "adam", "shampoo-async", "soap-async", "soap-sync", "soap-stale", "soap-ref",
           "ngplus", "ngplus-ps")  # fmt: skip
TASKS = ("digits", "charlm", "regression")
ABLATIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("defaults", "ngplus", {}), ("nesterov=False", "ngplus", {"nesterov": False}),
    ("inverse_frequency=50", "ngplus", {"inverse_frequency": 50}),
    ("grafting='sgd'", "ngplus", {"grafting": "sgd"}),
    ("damping=1000 (~identity)", "ngplus", {"damping": 1000.0}),
    ("statistics='per_sample'", "ngplus-ps", {}),
]  # fmt: skip


def build(name: str, quick: bool) -> tuple[Any, Any, int]:
    task, module = h.task(name, quick)
    return task, module, {"digits": 40, "charlm": 20, "regression": 30}[name] if quick else (
        module.DEFAULT_STEPS)  # fmt: skip


def train(task: Any, method: Any, steps: int, seed: int = 0) -> Any:
    return h.example("_common").train(task, method, steps, seed, max(steps // 10, 1),
                                      max(steps // 20, 1), False)  # fmt: skip


def num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def grid(report: h.Report, name: str, args: Any, curves: dict[str, Any]) -> None:
    common = h.example("_common")
    task, module, steps = build(name, args.quick)
    scales = [float(s) for s in (args.lr_scales or ("1" if args.quick else "0.3,1,3")).split(",")]
    keys = common.parse_keys(args.methods, common.METHOD_KEYS)
    methods = common.available([
        common.make_method(k, {g: lr * s for g, lr in module.DEFAULT_LRS.items()},
                           ngplus_damping=module.NGPLUS_DAMPING)
        for k in keys for s in scales])  # fmt: skip
    runs = []
    for method in methods:
        h.log(f"{name}: {method.label} lr {method.lr:g}")
        runs.append(train(task, method, steps))
    best: dict[str, Any] = {}
    for r in runs:
        if r.method not in best or r.final_train < best[r.method].final_train:
            best[r.method] = r
    target = best["Adam"].final_train if "Adam" in best else math.inf
    sgd = best.get("SGD-momentum")
    sgd_loss = sgd.final_train if sgd and not sgd.diverged else math.inf
    sgd_steps = sgd.steps_to(sgd_loss) if sgd and math.isfinite(sgd_loss) else None
    rows = []
    for r in best.values():
        to_sgd = r.steps_to(sgd_loss) if math.isfinite(sgd_loss) else None
        rows.append([
            r.method, f"{r.lr:g}", "diverged" if r.diverged else num(r.final_train),
            num(r.final_eval), r.steps_to(target) or "-", num(r.wall_to(target), ".1f"),
            to_sgd or "-", f"{to_sgd / sgd_steps:.2f}" if to_sgd and sgd_steps else "-",
            ",".join(f"{x.lr:g}" for x in runs if x.method == r.method and x.diverged) or "none",
            f"{r.ms_per_step:.1f}", f"{r.mean_ms_per_step:.1f}",
        ])  # fmt: skip
    records = [{"method": r.method, "lr": r.lr, "diverged": r.diverged,
                "final_train": num(r.final_train), "train_losses": r.train_losses,
                "step_times": r.step_times, "root_stats": r.root_stats} for r in runs]  # fmt: skip
    curves[name] = (target, best)
    report.section(
        f"grid {name}: {steps} steps, lr scales {scales}; target = Adam's best {num(target)}",
        ["method", "best lr", "train loss", "eval loss", "steps to target", "wall to target s",
         "steps to SGD's", "/ SGD's", "diverged lrs", "ms/step", "mean ms/step"], rows,
        f"SGD-momentum's best final loss {num(sgd_loss)}; ms/step: median training step; mean: "
        "wall / steps (root steps and waits included)", {"target": target, "runs": records},
    )  # fmt: skip


def ngplus(report: h.Report, name: str, args: Any) -> None:
    common = h.example("_common")
    task, module, steps = build(name, args.quick)
    scales = (1.0,) if args.quick else (0.3, 1.0, 3.0)
    sgd = [train(task, common.Method("sgd", module.DEFAULT_LRS["sgd"] * s), steps) for s in scales]
    best = min(sgd, key=lambda r: r.final_train if not r.diverged else math.inf)
    target, sgd_steps = best.final_train, best.steps_to(best.final_train)
    base = module.DEFAULT_LRS["ngplus"]
    configs = [(f"damping {d:g}", "ngplus", {"damping": d}, base * s)
               for d in ((3.0,) if args.quick else (0.3, 1.0, 3.0)) for s in scales]  # fmt: skip
    configs += [(label, key, kw, best.lr if kw.get("grafting") == "sgd" else base)
                for label, key, kw in (ABLATIONS[:2] if args.quick else ABLATIONS)]  # fmt: skip
    rows = []
    for label, key, kwargs, lr in configs:
        h.log(f"ngplus {name}: {label} lr {lr:g}")
        r = train(task, common.Method(key, lr, kwargs), steps)
        reached = None if r.diverged else r.steps_to(target)
        rows.append([label, f"{lr:.2g}", "diverged" if r.diverged else num(r.final_train),
                     reached or "-",
                     f"{reached / sgd_steps:.2f}" if reached and sgd_steps else "-"])  # fmt: skip
    report.section(
        f"ngplus {name}: {steps} steps; SGD-momentum's best (lr {best.lr:g}) {num(target)} at "
        f"step {sgd_steps}", ["config", "lr", "train loss", "steps to SGD's", "/ SGD's"], rows,
    )  # fmt: skip


def seeds(report: h.Report, name: str, args: Any) -> None:
    common = h.example("_common")
    task, module, steps = build(name, args.quick)
    keys = [k for k in common.parse_keys(args.methods, common.METHOD_KEYS) if k != "adam"]
    methods = common.available([common.make_method(k, module.DEFAULT_LRS, ngplus_damping=module.
                                                   NGPLUS_DAMPING) for k in ["adam", *keys]])
    runs: dict[str, list[Any]] = {m.label: [] for m in methods}
    targets = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        for method in methods:
            h.log(f"seeds {name}: {method.label} seed {seed}")
            runs[method.label].append(train(task, method, steps, seed))
        targets.append(runs["Adam"][-1].final_train)
    rows, mean = [], {}
    for label, rs in runs.items():
        reached = [r.steps_to(t) for r, t in zip(rs, targets)]
        loss = statistics.mean(r.final_train for r in rs)
        steps_mean = statistics.mean(x or steps + 1 for x in reached)  # (not reached: steps + 1)
        mean[label] = (steps_mean, loss)
        base = mean[methods[1].label] if len(methods) > 1 and label != "Adam" else None
        rows.append([label, "/".join(str(x or "-") for x in reached), f"{steps_mean:.1f}",
                     f"{steps_mean / base[0]:.3f}" if base else "-", num(loss),
                     f"{loss / base[1]:.4f}" if base else "-",
                     f"{statistics.mean(sum(r.step_times) for r in rs):.1f}"])  # fmt: skip
    report.section(
        f"seeds {name}: {steps} steps, seeds {args.seeds}, default lrs",
        ["contender", "steps to Adam's (per seed)", "mean steps", "steps / base", "mean loss",
         "loss / base", "mean wall s"], rows,
        f"base: {methods[1].label if len(methods) > 1 else '-'}; Adam's final loss per seed "
        f"{', '.join(num(t) for t in targets)}; not reached counts as {steps + 1} steps",
    )  # fmt: skip


def plot(curves: dict[str, Any], path: Any) -> None:
    """Best-lr smoothed training curves per task, against steps (top) and wall time (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(curves), figsize=(6 * len(curves), 8), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    for col, (task, (target, best)) in enumerate(curves.items()):
        for r in best.values():
            label = f"{r.method} (lr {r.lr:g})"
            axes[0, col].plot(range(1, len(r.train_losses) + 1), r.smoothed, label=label)
            axes[1, col].plot(r.cumulative_wall, r.smoothed, label=label)
        for row, xlabel in enumerate(["step", "training wall time (s)"]):
            if math.isfinite(target):
                axes[row, col].axhline(target, color="gray", linestyle="--", linewidth=1)
            axes[row, col].set_xlabel(xlabel)
            axes[row, col].set_ylabel("train loss (EMA)")
            h.example("_common").style_loss_axis(axes[row, col])
        axes[0, col].set_title(f"{task} (dashed: Adam's best final loss)")
        axes[0, col].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__, compare=False, rounds=False, sections="grid,ngplus")  # (or seeds)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lr-scales", default=None, help="multiples of the default lr (0.3,1,3)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the seeds section")
    args = p.parse_args(argv)
    report = h.Report("convergence", args, quick_threads=True)
    curves: dict[str, Any] = {}
    for name in args.tasks.split(","):
        if "grid" in args.sections:
            grid(report, name, args, curves)
        if "ngplus" in args.sections and (not args.quick or name == "digits"):
            ngplus(report, name, args)
        if "seeds" in args.sections.split(","):
            seeds(report, name, args)
    out = report.finish()
    if curves:
        plot(curves, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')} (threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
