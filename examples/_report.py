"""Reporting for the examples: the run record, results table, plots, JSON and environment."""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


class _EvalNamed(Protocol):
    """What the report needs of a task: the name of its held-out split (e.g. `_common.Task`)."""

    eval_name: str


@dataclass
class RunResult:
    """Per-step losses and timings of one training run."""

    method: str
    lr: float
    train_losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    eval_accs: list[float] = field(default_factory=list)
    diverged: bool = False
    interrupted: bool = False
    root_stats: dict[str, Any] | None = None

    @property
    def smoothed(self) -> list[float]:
        """Bias-corrected exponential moving average of the training loss."""
        return ema(self.train_losses)

    @property
    def final_train(self) -> float:
        """Smoothed training loss at the last step (inf if the run diverged)."""
        return math.inf if self.diverged or not self.train_losses else self.smoothed[-1]

    @property
    def final_eval(self) -> float:
        """Held-out loss at the last evaluation (inf if the run diverged)."""
        return math.inf if self.diverged or not self.eval_losses else self.eval_losses[-1]

    @property
    def wall(self) -> float:
        """Total training time in seconds (evaluation excluded)."""
        return sum(self.step_times)

    @property
    def cumulative_wall(self) -> list[float]:
        """Training seconds elapsed after each recorded step."""
        return list(itertools.accumulate(self.step_times[: len(self.train_losses)]))

    @property
    def ms_per_step(self) -> float:
        """Median wall time of one training iteration (forward, backward, step) in ms; nan if
        no step ran. The median ignores the slow first steps and bursts of load from elsewhere."""
        return 1000.0 * statistics.median(self.step_times) if self.step_times else math.nan

    @property
    def mean_ms_per_step(self) -> float:
        """Mean wall time of one training iteration in ms (training wall time / steps; nan if
        no step ran): what a run pays per step, the root steps and any wait for a root
        included, which the median leaves out."""
        return 1000.0 * statistics.mean(self.step_times) if self.step_times else math.nan

    def steps_to(self, target: float) -> int | None:
        """First step (1-based) at which the smoothed training loss is <= target (None without
        a finite target: every loss is below an unfinished Adam run's infinite one)."""
        if not math.isfinite(target):
            return None
        return next((i + 1 for i, v in enumerate(self.smoothed) if v <= target), None)

    def wall_to(self, target: float) -> float | None:
        """Training seconds spent until the smoothed training loss first reached target."""
        steps = self.steps_to(target)
        return None if steps is None else self.cumulative_wall[steps - 1]


def ema(values: Sequence[float], beta: float = 0.95) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam's moment estimates)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    if value is None or not math.isfinite(value):
        return missing
    return format(value, spec)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a plain-text table with right-aligned columns (first column left-aligned)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts)

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def adam_target(results: Sequence[RunResult]) -> float:
    """Final smoothed train loss of the completed Adam run (inf if there is none)."""
    adam = [r.final_train for r in results if r.method == "Adam" and not r.interrupted]
    return adam[0] if adam else math.inf


def step_time_ratio(run: RunResult, results: Sequence[RunResult]) -> float | None:
    """Median step time of `run` over that of the Adam run in `results` (None without one)."""
    adam = next((r.ms_per_step for r in results if r.method == "Adam"), math.nan)
    ratio = run.ms_per_step / adam if math.isfinite(adam) and adam > 0 else math.nan
    return ratio if math.isfinite(ratio) else None


def results_table(results: Sequence[RunResult], task: _EvalNamed, show_accuracy: bool) -> str:
    """The comparison table, with steps-to-target and median step-time ratio relative to Adam."""
    target = adam_target(results)
    headers = ["method", "lr", "train loss", f"{task.eval_name} loss"]
    if show_accuracy:
        headers.append(f"{task.eval_name} acc")
    headers += ["steps to Adam", "wall (s)", "ms/step", "step time / Adam"]
    rows = []
    for r in results:
        row = [
            f"{r.method} (stopped at {len(r.train_losses)})" if r.interrupted else r.method,
            f"{r.lr:g}",
            _fmt(r.final_train, ".4f", "diverged" if r.diverged else "-"),
            _fmt(r.final_eval, ".4f"),
        ]
        if show_accuracy:
            row.append(_fmt(r.eval_accs[-1] if r.eval_accs and not r.diverged else None, ".2%"))
        steps = r.steps_to(target)
        row += [
            "-" if steps is None else str(steps),
            f"{r.wall:.1f}",
            _fmt(r.ms_per_step, ".1f"),
            _fmt(step_time_ratio(r, results), ".2f"),
        ]
        rows.append(row)
    reach = (
        f"first step whose smoothed train loss <= Adam's final {target:.4f} ('-' = not reached)"
        if math.isfinite(target)
        else "no finished Adam run, so no target"
    )
    note = (
        f"train loss: EMA-smoothed (beta 0.95) at the last step; steps to Adam: {reach};\n"
        "wall: training time without evaluation; ms/step: median forward+backward+step time; "
        "step time / Adam: ratio of the medians"
    )
    return format_table(headers, rows) + "\n" + note


def root_stats_lines(results: Sequence[RunResult]) -> list[str]:
    """One line per run that reports inverse-root statistics (Shampoo), numbers only."""
    lines = []
    for r in results:
        numbers = {k: v for k, v in (r.root_stats or {}).items() if isinstance(v, int | float)}
        if numbers:
            stats = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()
            )
            lines.append(f"{r.method} root stats: {stats}")
    return lines


def style_loss_axis(ax: Any) -> None:
    """Log y scale when the plotted losses span more than a decade; a light grid."""
    low, high = ax.dataLim.y0, ax.dataLim.y1
    if low > 0 and high > 10 * low:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)


def plot_results(results: Sequence[RunResult], task: _EvalNamed, path: Path, title: str) -> None:
    """Save smoothed train loss vs step, held-out loss vs step and train loss vs wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), constrained_layout=True)
    for r in results:
        axes[0].plot(range(1, len(r.train_losses) + 1), r.smoothed, label=r.method)
        axes[1].plot(r.eval_steps, r.eval_losses, marker="o", markersize=3, label=r.method)
        axes[2].plot(r.cumulative_wall, r.smoothed, label=r.method)
    labels = [
        ("step", "train loss (EMA)"),
        ("step", f"{task.eval_name} loss"),
        ("training wall time (s)", "train loss (EMA)"),
    ]
    for ax, (xlabel, ylabel) in zip(axes, labels, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        style_loss_axis(ax)
    axes[0].legend()
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict[str, Any]:
    """Software and machine the timings were measured on."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def environment_header() -> str:
    """One line with torch version, thread count, load average and platform."""
    env = environment()
    load = ", ".join(f"{x:.2f}" for x in env["loadavg"]) if env["loadavg"] else "n/a"
    return (
        f"torch {env['torch']} | threads {env['threads']} | load avg {load} | "
        f"python {env['python']} | {env['platform']}"
    )


def load_warning() -> str | None:
    """A warning when the 1-minute load average exceeds the CPU count, else None."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return f"warning: load average {load:.2f} on {cores} cores: timings are unreliable"


def warn_if_loaded() -> None:
    """Print `load_warning()`, if any."""
    if warning := load_warning():
        print(warning, flush=True)


def save_json(results: Sequence[RunResult], path: Path, config: Mapping[str, Any]) -> None:
    """Write the environment, `config` and every run's curves and summary numbers to `path`."""
    target = adam_target(results)

    def num(x: float | None) -> float | None:
        return x if x is not None and math.isfinite(x) else None

    runs = [
        {
            **asdict(r),
            "final_train_loss": num(r.final_train),
            "final_eval_loss": num(r.final_eval),
            "steps_to_adam": r.steps_to(target),
            "wall": r.wall,
            "median_ms_per_step": num(r.ms_per_step),
            "mean_ms_per_step": num(r.mean_ms_per_step),
            "step_time_vs_adam": step_time_ratio(r, results),
        }
        for r in results
    ]
    report = {"environment": environment(), "config": dict(config), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
