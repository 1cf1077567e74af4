"""Shared optimizer registry, training loop, results table and plots for the example scripts."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import torch_shampoo

Batch = tuple[Tensor, Tensor]


class _Entry(NamedTuple):
    label: str
    module: ModuleType
    class_name: str
    lr_group: str
    kwargs: dict[str, Any]


_REGISTRY = {
    "sgd": _Entry("SGD-momentum", torch.optim, "SGD", "sgd", {"momentum": 0.9}),
    "adam": _Entry("Adam", torch.optim, "Adam", "adam", {}),
    "adamw": _Entry("AdamW", torch.optim, "AdamW", "adamw", {}),
    "shampoo-sync": _Entry(
        "Shampoo sync", torch_shampoo, "Shampoo", "shampoo", {"async_roots": False}
    ),
    "shampoo-async": _Entry(
        "Shampoo async", torch_shampoo, "Shampoo", "shampoo", {"async_roots": True}
    ),
    "ngplus": _Entry("NG+", torch_shampoo, "NGPlus", "ngplus", {"statistics": "minibatch"}),
    "ngplus-ps": _Entry(
        "NG+ per-sample", torch_shampoo, "NGPlus", "ngplus", {"statistics": "per_sample"}
    ),
}
METHOD_KEYS = tuple(_REGISTRY)
LR_GROUPS = ("sgd", "adam", "adamw", "shampoo", "ngplus")


@dataclass(frozen=True)
class Method:
    """One optimizer configuration: registry key, learning rate and extra keyword arguments."""

    key: str
    lr: float
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Human-readable name used in tables and plots."""
        return _REGISTRY[self.key].label

    def optimizer_class(self) -> Callable[..., torch.optim.Optimizer] | None:
        """The optimizer class, or None if this version of the library does not provide it."""
        entry = _REGISTRY[self.key]
        return getattr(entry.module, entry.class_name, None)

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """Construct the optimizer for `model` (attaching hooks for per-sample statistics)."""
        cls = self.optimizer_class()
        if cls is None:
            raise RuntimeError(f"{self.label} is not available in this torch_shampoo version")
        kwargs = {**_REGISTRY[self.key].kwargs, **self.kwargs}
        opt = cls(model.parameters(), lr=self.lr, **kwargs)
        if kwargs.get("statistics") == "per_sample":
            opt.attach(model)  # type: ignore[attr-defined]
        return opt


def make_method(
    key: str, lrs: Mapping[str, float], weight_decay: float = 0.01, ngplus_damping: float = 1e-3
) -> Method:
    """Build a Method for registry `key`, taking its lr from `lrs` (indexed by lr group)."""
    group = _REGISTRY[key].lr_group
    kwargs: dict[str, Any] = {}
    if group == "adamw":
        kwargs["weight_decay"] = weight_decay
    if group == "ngplus":
        kwargs["damping"] = ngplus_damping
    return Method(key, lrs[group], kwargs)


def parse_keys(text: str, choices: Sequence[str]) -> list[str]:
    """Split a comma-separated list of names and check each is one of `choices`."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in choices]
    if unknown:
        raise SystemExit(f"unknown names {unknown}; choose from {', '.join(choices)}")
    return keys


def available(methods: Sequence[Method]) -> list[Method]:
    """Keep the methods whose optimizer class is importable; print a note for the others."""
    kept = []
    for method in methods:
        if method.optimizer_class() is None:
            name = _REGISTRY[method.key].class_name
            print(f"note: skipping {method.label}: torch_shampoo has no {name} yet")
        else:
            kept.append(method)
    return kept


@dataclass
class Task:
    """A classification problem: model factory, deterministic batch stream and held-out data."""

    name: str
    build_model: Callable[[], nn.Module]
    batches: Callable[[int], Iterator[Batch]]
    eval_batches: list[Batch]
    eval_name: str = "val"


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
        """Mean wall time of one training iteration (forward, backward, step) in ms."""
        return 1000.0 * self.wall / max(len(self.step_times), 1)

    def steps_to(self, target: float) -> int | None:
        """First step (1-based) at which the smoothed training loss is <= target."""
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


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for (..., classes) logits against (...) integer targets."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` over `batches`."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        loss_sum += classification_loss(logits, y).item() * y.numel()
        correct += int((logits.argmax(-1) == y).sum())
        count += y.numel()
    model.train()
    return loss_sum / count, correct / count


def warm_up(task: Task, iterations: int = 3) -> None:
    """Run a few untimed forward/backward passes so one-off setup costs hit no timed run."""
    model = task.build_model()
    x, y = next(task.batches(0))
    for _ in range(iterations):
        classification_loss(model(x), y).backward()


def train(
    task: Task,
    method: Method,
    steps: int,
    seed: int,
    eval_every: int,
    warmup: int,
    progress: bool = True,
) -> RunResult:
    """Train a fresh model (same init and batches for a given seed) and record the curves."""
    torch.manual_seed(seed)
    model = task.build_model()
    opt = method.build(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup))
    batches = task.batches(seed)
    result = RunResult(method.label, method.lr)
    bar = tqdm(range(steps), desc=f"{method.label:>14}", disable=not progress, leave=False)
    try:
        for step in bar:
            x, y = next(batches)
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = classification_loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            result.step_times.append(time.perf_counter() - start)
            if not math.isfinite(value):
                result.diverged = True
                break
            result.train_losses.append(value)
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                eval_loss, eval_acc = evaluate(model, task.eval_batches)
                result.eval_steps.append(step + 1)
                result.eval_losses.append(eval_loss)
                result.eval_accs.append(eval_acc)
                bar.set_postfix(loss=f"{result.smoothed[-1]:.3f}", val=f"{eval_loss:.3f}")
        stats = getattr(opt, "root_stats", None)
        result.root_stats = stats() if callable(stats) else None
    finally:
        bar.close()
        close = getattr(opt, "close", None)
        if callable(close):
            close()
    return result


def compare(
    task: Task,
    methods: Sequence[Method],
    steps: int,
    seed: int,
    eval_every: int,
    warmup: int,
    progress: bool,
) -> list[RunResult]:
    """Train every available method on `task` with the same seed and print one line per run."""
    warm_up(task)
    results = []
    for method in available(methods):
        result = train(task, method, steps, seed, eval_every, warmup, progress)
        status = "diverged" if result.diverged else f"final train loss {result.final_train:.4f}"
        print(f"{method.label:>14}: {status} ({result.wall:.1f} s)", flush=True)
        results.append(result)
    return results


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


def results_table(results: Sequence[RunResult], task: Task, show_accuracy: bool) -> str:
    """The comparison table, with steps-to-target and step-time ratio relative to Adam."""
    baseline = next((r for r in results if r.method == "Adam"), None)
    target = baseline.final_train if baseline else math.inf
    headers = ["method", "lr", "train loss", f"{task.eval_name} loss"]
    if show_accuracy:
        headers.append(f"{task.eval_name} acc")
    headers += ["steps to Adam", "wall (s)", "ms/step", "step time / Adam"]
    rows = []
    for r in results:
        row = [
            r.method,
            f"{r.lr:g}",
            _fmt(r.final_train, ".4f", "diverged"),
            _fmt(r.final_eval, ".4f"),
        ]
        if show_accuracy:
            row.append(_fmt(r.eval_accs[-1] if r.eval_accs and not r.diverged else None, ".2%"))
        steps = r.steps_to(target)
        ratio = r.ms_per_step / baseline.ms_per_step if baseline else None
        row += [
            "-" if steps is None else str(steps),
            f"{r.wall:.1f}",
            f"{r.ms_per_step:.1f}",
            _fmt(ratio, ".2f"),
        ]
        rows.append(row)
    note = (
        f"train loss: EMA-smoothed (beta 0.95) at the last step; steps to Adam: first step whose "
        f"smoothed train loss <= Adam's final {_fmt(target, '.4f')} ('-' = not reached);\n"
        "wall: training time without evaluation; ms/step: mean forward+backward+step time"
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


def plot_results(results: Sequence[RunResult], task: Task, path: Path, title: str) -> None:
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


def add_comparison_args(
    parser: argparse.ArgumentParser,
    *,
    steps: int,
    lrs: Mapping[str, float],
    ngplus_damping: float,
    out: str,
) -> None:
    """Flags shared by the example scripts: steps, seed, per-optimizer lrs, output, verbosity."""
    parser.add_argument("--steps", type=int, default=steps, help="training steps per optimizer")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and batch order")
    parser.add_argument(
        "--eval-every", type=int, default=None, help="evaluate every N steps (None: steps // 10)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="lr warmup steps (None: steps // 20)"
    )
    for group in LR_GROUPS:
        parser.add_argument(
            f"--lr-{group}", type=float, default=lrs[group], help=f"peak lr of {group}"
        )
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--ngplus-damping", type=float, default=ngplus_damping, help="NG+ damping")
    choices = ", ".join(METHOD_KEYS)
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {choices}")
    parser.add_argument("--out", type=Path, default=Path(out), help="where to save the plot")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_comparison(
    args: argparse.Namespace, task: Task, keys: Sequence[str], show_accuracy: bool, title: str
) -> list[RunResult]:
    """Run the comparison configured by `args`, print the table and save the plot."""
    if args.methods:
        keys = parse_keys(args.methods, METHOD_KEYS)
    lrs = {group: getattr(args, f"lr_{group}") for group in LR_GROUPS}
    methods = [make_method(k, lrs, args.weight_decay, args.ngplus_damping) for k in keys]
    eval_every = args.eval_every or max(args.steps // 10, 1)
    warmup = args.warmup if args.warmup is not None else max(args.steps // 20, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment_header(), flush=True)
    progress = not args.quiet and sys.stderr.isatty()
    start = time.perf_counter()
    results = compare(task, methods, args.steps, args.seed, eval_every, warmup, progress)
    print()
    print(results_table(results, task, show_accuracy))
    for line in root_stats_lines(results):
        print(line)
    plot_results(results, task, args.out, title)
    print(f"plot saved to {args.out}; total time {time.perf_counter() - start:.0f} s")
    return results
