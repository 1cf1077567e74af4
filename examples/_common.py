"""The training loop and comparison driver the example scripts share.

The optimizer registry lives in `_methods`, the reporting half (run record, results table,
plots, JSON, environment) in `_report`; their names are re-exported here, so scripts keep
importing everything from `_common`."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _methods import (
    LR_GROUPS,
    METHOD_KEYS,
    REGISTRY,
    Method,
    available,
    make_method,
    parse_keys,
    rank_of,
    world,
)
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
        if REGISTRY[method.key].module is torch_shampoo:
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
