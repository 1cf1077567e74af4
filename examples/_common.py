"""Shared optimizer registry, training loop and comparison driver for the example scripts.

The reporting half (run record, results table, plots, JSON, environment) lives in `_report`;
its names are re-exported here, so scripts keep importing everything from `_common`."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from _report import (  # noqa: F401  (re-exported for the scripts, benchmarks and tests)
    RunResult,
    adam_target,
    ema,
    environment,
    environment_header,
    format_table,
    load_warning,
    plot_results,
    results_table,
    root_stats_lines,
    save_json,
    step_time_ratio,
    style_loss_axis,
    warn_if_loaded,
)
from torch import Tensor, nn
from tqdm import tqdm

import torch_shampoo

Batch = tuple[Tensor, Tensor]


class _Entry(NamedTuple):
    label: str
    module: ModuleType | str
    """The module, or the name of an optional one (a published reference, imported if there)."""
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
    # the default: async_roots="auto" (sync where the step's threads fill a CPU-only machine)
    "shampoo": _Entry("Shampoo", torch_shampoo, "Shampoo", "shampoo", {}),
    # float32 roots, a failed one solved again in float64 (benchmarks: root_dtype's default)
    "shampoo-sync-f32": _Entry(
        "Shampoo sync f32",
        torch_shampoo,
        "Shampoo",
        "shampoo",
        {"async_roots": False, "root_dtype": torch.float32},
    ),
    # warm-started roots: an exact eigh every 5th root step, a power iteration between
    "shampoo-sync-warm": _Entry(
        "Shampoo sync eigh/5",
        torch_shampoo,
        "Shampoo",
        "shampoo",
        {"async_roots": False, "eigh_every": 5},
    ),
    "shampoo-async-warm": _Entry(
        "Shampoo async eigh/5", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": True, "eigh_every": 5},
    ),
    # roots at every f-th step for every parameter (async's default staggers them by parameter)
    "shampoo-async-unstaggered": _Entry(
        "Shampoo async unstaggered", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": True, "stagger_roots": False},
    ),
    "shampoo-sync-stagger": _Entry(
        "Shampoo sync stagger", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": False, "stagger_roots": True},
    ),
    # bfloat16 state (roots, moments; factors float32), rounded stochastically; sync: bitwise
    # repeatable; square blocks paired (compact_state "auto")
    "shampoo-sync-bf16": _Entry(
        "Shampoo sync bf16",
        torch_shampoo,
        "Shampoo",
        "shampoo",
        {"async_roots": False, "state_dtype": torch.bfloat16},
    ),
    "shampoo-sync-bf16full": _Entry(
        "Shampoo sync bf16 full", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": False, "state_dtype": torch.bfloat16, "compact_state": False},
    ),
    # and compact_state=True: every block packed (unpaired ones' roots then float32)
    "shampoo-sync-bf16c": _Entry(
        "Shampoo sync bf16 compact", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": False, "state_dtype": torch.bfloat16, "compact_state": True},
    ),
    "ngplus": _Entry("NG+", torch_shampoo, "NGPlus", "ngplus", {"statistics": "minibatch"}),
    "ngplus-async": _Entry(
        "NG+ async", torch_shampoo, "NGPlus", "ngplus",
        {"statistics": "minibatch", "async_roots": True},
    ),
    "ngplus-unstaggered": _Entry(
        "NG+ unstaggered", torch_shampoo, "NGPlus", "ngplus",
        {"statistics": "minibatch", "async_roots": True, "stagger_roots": False},
    ),
    "ngplus-sync": _Entry(
        "NG+ sync", torch_shampoo, "NGPlus", "ngplus",
        {"statistics": "minibatch", "async_roots": False},
    ),
    "ngplus-f32": _Entry(
        "NG+ f32",
        torch_shampoo,
        "NGPlus",
        "ngplus",
        {"statistics": "minibatch", "root_dtype": torch.float32},
    ),
    "ngplus-ps": _Entry(
        "NG+ per-sample", torch_shampoo, "NGPlus", "ngplus", {"statistics": "per_sample"}
    ),
    # SOAP takes Adam's lr (its step is Adam's, in a rotated basis)
    "soap": _Entry("SOAP", torch_shampoo, "SOAP", "adam", {}),
    "soap-async": _Entry("SOAP async", torch_shampoo, "SOAP", "adam", {"async_roots": True}),
    "soap-sync": _Entry("SOAP sync", torch_shampoo, "SOAP", "adam", {"async_roots": False}),
    "soap-sync-bf16": _Entry(
        "SOAP sync bf16", torch_shampoo, "SOAP", "adam",
        {"async_roots": False, "state_dtype": torch.bfloat16},
    ),
    "soap-unstaggered": _Entry(
        "SOAP async unstaggered", torch_shampoo, "SOAP", "adam",
        {"async_roots": True, "stagger_roots": False},
    ),
    "soap-stale": _Entry(
        "SOAP stale=f", torch_shampoo, "SOAP", "adam", {"async_roots": True, "root_staleness": 10}
    ),
    # pytorch-optimizer's SOAP (pip install pytorch-optimizer), as a published reference
    "soap-ref": _Entry(
        "SOAP (pytorch-optimizer)", "pytorch_optimizer", "SOAP", "adam", {"weight_decay": 0.0}
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
        module = entry.module
        if isinstance(module, str):
            try:
                module = importlib.import_module(module)
            except ImportError:
                return None
        return getattr(module, entry.class_name, None)

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """Construct the optimizer for `model` (attaching hooks for per-sample statistics)."""
        cls = self.optimizer_class()
        if cls is None:
            raise RuntimeError(f"{self.label} is not available in this torch_shampoo version")
        kwargs = {**_REGISTRY[self.key].kwargs, **self.kwargs}
        if world() > 1 and _REGISTRY[self.key].module is torch_shampoo:
            kwargs["partition_state"] = True  # DDP: each parameter kept by one process
        opt = cls(model.parameters(), lr=self.lr, **kwargs)
        if kwargs.get("statistics") == "per_sample":
            opt.attach(model)  # type: ignore[attr-defined]
        return opt


def make_method(
    key: str,
    lrs: Mapping[str, float],
    weight_decay: float = 0.01,
    ngplus_damping: float | None = None,
) -> Method:
    """Build a Method for registry `key`, taking its lr from `lrs` (indexed by lr group)."""
    group = _REGISTRY[key].lr_group
    kwargs: dict[str, Any] = {}
    if group == "adamw":
        kwargs["weight_decay"] = weight_decay
    if group == "ngplus" and ngplus_damping is not None:
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
            entry = _REGISTRY[method.key]
            where = entry.module if isinstance(entry.module, str) else entry.module.__name__
            print(f"note: skipping {method.label}: {where} has no {entry.class_name} here")
        else:
            kept.append(method)
    return kept


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for (..., classes) logits against (...) integer targets."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


@dataclass
class Task:
    """A training problem: model factory, deterministic batch stream, held-out data, loss."""

    name: str
    build_model: Callable[[], nn.Module]
    batches: Callable[[int], Iterator[Batch]]
    eval_batches: list[Batch]
    eval_name: str = "val"
    loss: Callable[[Tensor, Tensor], Tensor] = classification_loss
    """The training and evaluation loss (cross-entropy unless the task says otherwise)."""
    classification: bool = True
    """Whether evaluation reports an accuracy."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `train`; `partial` holds the steps recorded until then."""

    def __init__(self, partial: RunResult) -> None:
        super().__init__(f"interrupted during {partial.method}")
        self.partial = partial


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, task: Task) -> tuple[float, float]:
    """Mean loss and accuracy (NaN for a regression task) of `model` on the task's eval data."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in task.eval_batches:
        out = model(x)
        n = y.shape[0] if not task.classification else y.numel()
        loss_sum += task.loss(out, y).item() * n
        if task.classification:
            correct += int((out.argmax(-1) == y).sum())
        count += n
    model.train()
    return loss_sum / count, correct / count if task.classification else math.nan


def warm_up(task: Task, iterations: int = 3) -> None:
    """Run a few untimed forward/backward passes so one-off setup costs hit no timed run."""
    model = task.build_model()
    x, y = next(task.batches(0))
    for _ in range(iterations):
        task.loss(model(x), y).backward()


def train(
    task: Task,
    method: Method,
    steps: int,
    seed: int,
    eval_every: int,
    warmup: int,
    progress: bool = True,
    log_every: int = 0,
) -> RunResult:
    """Train a fresh model (same init and batches for a given seed) and record the curves.

    `progress` shows a tqdm bar; `log_every` > 0 prints a plain line every that many steps.
    Ctrl-C raises `Interrupted` with the steps recorded so far."""
    run_start = time.perf_counter()
    torch.manual_seed(seed)
    model = task.build_model()
    processes, rank = world(), rank_of()
    if processes > 1:  # torchrun: DDP, each process on its share of every batch
        model = nn.parallel.DistributedDataParallel(model)
    opt = method.build(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup))
    batches = task.batches(seed)
    result = RunResult(method.label, method.lr)
    bar = tqdm(range(steps), desc=f"{method.label:>14}", disable=not progress, leave=False)
    try:
        for step in bar:
            x, y = next(batches)
            if processes > 1:
                x, y = x.chunk(processes)[rank], y.chunk(processes)[rank]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            if processes > 1:  # report the whole batch's loss
                loss = loss.detach().clone()
                torch.distributed.all_reduce(loss)
                loss /= processes
            value = loss.item()
            result.step_times.append(time.perf_counter() - start)
            if not math.isfinite(value):
                result.diverged = True
                break
            result.train_losses.append(value)
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                eval_loss, eval_acc = evaluate(model, task)
                result.eval_steps.append(step + 1)
                result.eval_losses.append(eval_loss)
                result.eval_accs.append(eval_acc)
                bar.set_postfix(loss=f"{result.smoothed[-1]:.3f}", val=f"{eval_loss:.3f}")
            if log_every > 0 and ((step + 1) % log_every == 0 or step + 1 == steps):
                elapsed = time.perf_counter() - run_start
                print(
                    f"  {method.label:>14}  step {step + 1}/{steps}  "
                    f"loss {result.smoothed[-1]:.3f}  ({elapsed:.1f} s)",
                    flush=True,
                )
        stats = getattr(opt, "root_stats", None)
        result.root_stats = stats() if callable(stats) else None
    except KeyboardInterrupt as exc:
        result.interrupted = True
        # keep the curves consistent: the interrupted step may have been half recorded
        del result.step_times[len(result.train_losses) :]
        n_eval = min(len(result.eval_steps), len(result.eval_losses), len(result.eval_accs))
        del result.eval_steps[n_eval:], result.eval_losses[n_eval:], result.eval_accs[n_eval:]
        raise Interrupted(result) from exc
    finally:
        bar.close()
        close = getattr(opt, "close", None)
        if callable(close):
            close()
    return result


def print_plan(task: Task, methods: Sequence[Method]) -> None:
    """Print ``optimizer.plan()`` of the first of this package's optimizers among ``methods``
    (on a model of its own, before any training): per parameter its blocks, state and root
    work, in total the ratio to Adam's state and a root cycle's time on this machine."""
    for method in methods:
        if _REGISTRY[method.key].module is torch_shampoo:
            model = task.build_model()
            with method.build(model) as opt:  # type: ignore[attr-defined]
                opt.plan(model=model)
            print(flush=True)
            return


def compare(
    task: Task,
    methods: Sequence[Method],
    steps: int,
    seed: int,
    eval_every: int,
    warmup: int,
    progress: bool,
    log_every: int = 0,
) -> tuple[list[RunResult], bool]:
    """Train every available method on `task` with the same seed and print one line per run.

    Returns the results and whether Ctrl-C stopped the comparison; in that case the results
    end with the interrupted run (if it recorded a step) and one line says what is kept."""
    results: list[RunResult] = []
    current = "the warm-up"
    try:
        warm_up(task)
        kept = available(methods)
        print_plan(task, kept)
        for method in kept:
            current = method.label
            result = train(task, method, steps, seed, eval_every, warmup, progress, log_every)
            status = "diverged" if result.diverged else f"final train loss {result.final_train:.4f}"
            print(
                f"{method.label:>14}: {status} "
                f"({result.wall:.1f} s, median {result.ms_per_step:.1f} ms/step)",
                flush=True,
            )
            results.append(result)
    except KeyboardInterrupt as exc:
        finished = f"the {len(results)} finished run{'' if len(results) == 1 else 's'}"
        partial = exc.partial if isinstance(exc, Interrupted) else None
        if partial is not None and partial.train_losses:
            results.append(partial)
            done = len(partial.train_losses)
            print(
                f"interrupted: saving {finished} and the partial run of {current} "
                f"({done}/{steps} steps)",
                flush=True,
            )
        else:
            print(f"interrupted during {current}: saving {finished}", flush=True)
        return results, True
    return results, False


def comparison_parser(
    doc: str,
    *,
    steps: int,
    lrs: Mapping[str, float],
    ngplus_damping: float | None,
    out: str,
) -> argparse.ArgumentParser:
    """An example script's parser (described by the first paragraph of its ``doc``) with the
    flags they share: steps, seed, per-optimizer lrs, output, verbosity."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    parser.add_argument(
        "--ngplus-damping", type=float, default=ngplus_damping, help="NG+ damping (None: default)"
    )
    choices = ", ".join(METHOD_KEYS)
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {choices}")
    parser.add_argument(
        "--out", type=Path, default=Path(out), help="plot path; the JSON goes next to it"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (or lines, when not a terminal)"
    )
    return parser


def world() -> int:
    """Processes in torch.distributed's default group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_of() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def run_comparison(
    args: argparse.Namespace, task: Task, keys: Sequence[str], show_accuracy: bool, title: str
) -> list[RunResult]:
    """Run the comparison configured by `args`, print the table and save the plot and JSON.

    Progress shows as tqdm bars on a terminal, else as plain lines (about ten per run). After
    Ctrl-C the finished runs and the partial one are reported and saved (to NAME-partial.png and
    .json, so a finished run's files stay), then SystemExit(130).
    Under ``torchrun --nproc_per_node N`` every run is DDP over N processes (gloo), each on its
    share of every batch, with ``partition_state=True``; only rank 0 prints and writes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world()))
        if rank_of() != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
            args.quiet = True
    try:
        return _run_comparison(args, task, keys, show_accuracy, title)
    finally:
        if world() > 1:
            torch.distributed.barrier()
            if rank_of() == 0:
                sys.stdout.flush()


def _run_comparison(
    args: argparse.Namespace, task: Task, keys: Sequence[str], show_accuracy: bool, title: str
) -> list[RunResult]:
    if args.methods:
        keys = parse_keys(args.methods, METHOD_KEYS)
    lrs = {group: getattr(args, f"lr_{group}") for group in LR_GROUPS}
    methods = [make_method(k, lrs, args.weight_decay, args.ngplus_damping) for k in keys]
    eval_every = args.eval_every or max(args.steps // 10, 1)
    warmup = args.warmup if args.warmup is not None else max(args.steps // 20, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment_header(), flush=True)
    warn_if_loaded()
    bars = not args.quiet and sys.stderr.isatty()
    log_every = 0 if args.quiet or bars else max(args.steps // 10, 1)
    start = time.perf_counter()
    results, interrupted = compare(
        task, methods, args.steps, args.seed, eval_every, warmup, bars, log_every
    )
    if interrupted and not results:
        raise SystemExit(130)
    print()
    print(results_table(results, task, show_accuracy))
    for line in root_stats_lines(results):
        print(line)
    out = args.out  # an interrupted run never overwrites a finished run's files
    out = out.with_name(f"{out.stem}-partial{out.suffix}") if interrupted else out
    json_path = out.with_suffix(".json")
    if rank_of() == 0:
        plot_results(results, task, out, title)
        meta = {**vars(args), "task": task.name, "interrupted": interrupted, "processes": world()}
        save_json(results, json_path, meta)
    elapsed = time.perf_counter() - start
    print(f"plot saved to {out}, results to {json_path}; total time {elapsed:.0f} s")
    warn_if_loaded()
    if interrupted:
        raise SystemExit(130)
    return results
