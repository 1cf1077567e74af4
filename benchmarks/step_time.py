"""optimizer.step() time of Shampoo against Adam and a GEMM floor; sync vs async roots.

Only ``optimizer.step()`` is timed. Every model gets a few fixed gradient sets, precomputed once
from real forward/backward passes at batch 64 and assigned to ``.grad`` (untimed) before each step.
The machine is shared, so every figure is compared *within one run*: the contenders (Adam, the
GEMM floor, each Shampoo configuration) run in interleaved blocks, the order rotating per round,
and the summaries pool all blocks (medians). An async contender starts each block with one
untimed precondition cycle (its root pipeline refills) and drains its roots in flight (untimed)
at the end of the block, so no background root work leaks into another contender's timing.

Sections:
  1. core table per model (MLP 512-1024-1024-512, a conv net, 50 small layers): median non-root
     step, mean (amortized over whole precondition cycles) and max step, ratios to Adam and to the
     GEMM floor (just the statistics and preconditioning matrix products of the rule, timed with
     torch.mm on the same shapes), optimizer-state bytes, and the non-finite guard's cost (sync
     Shampoo with ``skip_nonfinite`` on and off). The MLP run doubles as section 2(b).
  2. sync vs async roots on the MLP, precondition_frequency=10, block sizes 128 and 1024:
     (a) torch.set_num_threads(1), root_workers=1: 2 rounds x 50 timed steps per mode (and
     the guard's cost again, at the steadier single-thread timing);
     (b) section 1's setting (torch/library defaults unless --threads / --root-workers): 2 rounds
     x 20 timed steps by default, because at torch's default 2 threads on a loaded 2-core machine
     one synchronous root step of the b1024 MLP can take tens of seconds; --cycles-b 5 gives 100.
  3. the root window: async with a fixed "model compute" (time.sleep, standing for a forward and
     backward pass on an accelerator, during which the CPU is free) before every step, sized from
     the synchronous root work measured in 2(a), against a sync contender whose only root is at
     step 1 (so every one of its steps is a non-root step), with the same sleep.

torch.set_num_threads is called only for 2(a)/3 and for --threads: calling it, even with the
default value, changes MKL's threading for the rest of the process, so section 1 runs first.

--device cuda (default cpu) puts the models, the gradient sets, the optimizers' parameters and
state and the GEMM floor on the GPU; the Adam contender becomes
``torch.optim.AdamW(params, lr=1e-3, fused=True)``; every timed ``step()`` sits between two
``torch.cuda.synchronize()`` calls, so the GPU work of the step counts and no earlier work does.
Shampoo's roots are still computed on the CPU, so the torch.set_num_threads calls above still
apply to them, and section 3 still stands for the forward/backward with time.sleep. Without a
GPU, --device cuda stops with an error.

    python benchmarks/step_time.py            # full run (~6 minutes on an idle 2-core CPU)
    python benchmarks/step_time.py --quick    # smoke run (< 30 s; torch threads 1 unless --threads)
    python benchmarks/step_time.py --device cuda --quick    # the same on the GPU
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch_shampoo import Shampoo
from torch_shampoo.blocking import block_layout
from torch_shampoo.telemetry import held_bytes

FREQUENCY = 10
MAX_FACTOR_DIM = 8192  # Shampoo's default
BATCH = 64
CPU = torch.device("cpu")


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models, gradients


@dataclass
class ModelSpec:
    name: str
    model: nn.Module
    make_input: Callable[[torch.Generator], torch.Tensor]


def mlp_spec(quick: bool) -> ModelSpec:
    sizes = (64, 128, 128, 64) if quick else (512, 1024, 1024, 512)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    name = "MLP " + "-".join(map(str, sizes))
    first = sizes[0]
    return ModelSpec(name, nn.Sequential(*layers), lambda g: torch.randn(BATCH, first, generator=g))


def conv_spec(quick: bool) -> ModelSpec:
    channels = (3, 8, 16) if quick else (3, 32, 64, 128, 256)
    side = 8 if quick else 32
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(channels):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 10)]
    name = "ConvNet " + "-".join(map(str, channels[1:])) + f" ({side}x{side})"
    return ModelSpec(
        name, nn.Sequential(*layers), lambda g: torch.randn(BATCH, 3, side, side, generator=g)
    )


def small_spec(quick: bool) -> ModelSpec:
    depth, width = (8, 16) if quick else (50, 64)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    name = f"{depth}x Linear({width},{width}) ({2 * depth} params)"
    return ModelSpec(name, nn.Sequential(*layers), lambda g: torch.randn(BATCH, width, generator=g))


def gradient_sets(
    spec: ModelSpec, count: int, device: torch.device = CPU
) -> list[list[torch.Tensor]]:
    """``count`` gradients of the model's parameters from real batches (MSE to random targets),
    on ``device`` (the model is moved there; the batches are drawn on the CPU, the same on every
    device)."""
    spec.model.to(device)
    gen = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(count):
        spec.model.zero_grad(set_to_none=True)
        out = spec.model(spec.make_input(gen).to(device))
        target = torch.randn(out.shape, generator=gen).to(device)
        nn.functional.mse_loss(out, target).backward()
        sets.append([p.grad.detach().clone() for p in spec.model.parameters()])  # type: ignore[union-attr]
    spec.model.zero_grad(set_to_none=True)
    return sets


def factor_sizes(shapes: Sequence[tuple[int, ...]], block_size: int) -> list[int]:
    """The sides of every Shampoo factor of these parameter shapes (one root each per cycle)."""
    sizes = []
    for shape in shapes:
        layout = block_layout(shape, block_size, MAX_FACTOR_DIM)
        for b in range(layout.num_blocks):
            sizes += layout.factor_dims(b)
    return sizes


# --------------------------------------------------------------------------------- contenders


class GemmFloor:
    """Just the matrix products of one Shampoo step: per block and factored dim d (block of n
    elements), the statistics product (d × n/d)·(n/d × d) and the preconditioning product
    (n/d × d)·(d × d), with torch.mm into preallocated outputs (X_L·M·X_R of a 2-D block is exactly
    these two products for its two dims), on ``device``."""

    def __init__(
        self, shapes: Sequence[tuple[int, ...]], block_size: int, device: torch.device = CPU
    ) -> None:
        gen = torch.Generator().manual_seed(1)
        self.ops: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.flops = 0
        for shape in shapes:
            layout = block_layout(shape, block_size, MAX_FACTOR_DIM)
            for block_shape in layout.block_shapes:
                numel = math.prod(block_shape)
                for d, factored in zip(block_shape, layout.factored):
                    if not factored or d == 0:
                        continue
                    rest = numel // d
                    unfolded = torch.randn(d, rest, generator=gen).to(device)
                    self.ops.append((unfolded, unfolded.T, torch.empty(d, d, device=device)))
                    moment = torch.randn(rest, d, generator=gen).to(device)
                    root = torch.randn(d, d, generator=gen).to(device)
                    self.ops.append((moment, root, torch.empty(rest, d, device=device)))
                    self.flops += 4 * d * d * rest

    def step(self) -> None:
        for a, b, out in self.ops:
            torch.mm(a, b, out=out)


@dataclass
class StepRecord:
    round: int
    step: int
    seconds: float
    root: bool
    stall_seconds: float


@dataclass
class Contender:
    """One timed thing: an optimizer on its own copy of the parameters, or a GEMM floor."""

    name: str
    kind: str  # "adam", "floor", "sync", "noguard" (sync, skip_nonfinite=False), "async", "noroot",
    # "compact" (sync, compact_state=True)
    block_size: int | None
    step_fn: Callable[[], Any]
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[list[torch.Tensor]] = field(default_factory=list)
    opt: torch.optim.Optimizer | None = None
    floor: GemmFloor | None = None
    compute_seconds: float = 0.0
    t: int = 0
    records: list[StepRecord] = field(default_factory=list)
    synchronize: bool = False
    """CUDA: time each step between two ``torch.cuda.synchronize()`` calls."""

    @property
    def is_async(self) -> bool:
        return self.kind == "async"

    @property
    def is_shampoo(self) -> bool:
        return isinstance(self.opt, Shampoo)

    def is_root_step(self, t: int) -> bool:
        if self.kind in ("sync", "noguard", "compact", "async"):
            return t >= FREQUENCY and t % FREQUENCY == 0
        return self.kind == "noroot" and t == 1

    def stall_seconds(self) -> float:
        return float(self.opt.root_stats()["stall_seconds"]) if self.is_async else 0.0  # type: ignore[union-attr]

    def advance(self, round_index: int, timed: bool) -> None:
        if self.params:
            for p, g in zip(self.params, self.grads[self.t % len(self.grads)]):
                p.grad = g
        if self.compute_seconds > 0 and (timed or self.is_async):  # async: also while refilling
            time.sleep(self.compute_seconds)  # the model's forward/backward on an accelerator
        stalled = self.stall_seconds()
        if self.synchronize:
            torch.cuda.synchronize()  # work queued before this step is not its time
        begin = time.perf_counter()
        self.step_fn()
        if self.synchronize:
            torch.cuda.synchronize()  # the step's own GPU work is
        elapsed = time.perf_counter() - begin
        self.t += 1
        if timed:
            stalled = self.stall_seconds() - stalled
            self.records.append(
                StepRecord(round_index, self.t, elapsed, self.is_root_step(self.t), stalled)
            )

    def drain(self) -> None:
        """Wait (untimed) for the roots in flight: ``state_dict()`` waits for them."""
        if self.is_async:
            self.opt.state_dict()  # type: ignore[union-attr]

    def close(self) -> None:
        if self.is_shampoo:
            self.opt.close()  # type: ignore[union-attr]


def make_contender(
    kind: str,
    spec: ModelSpec,
    grads: list[list[torch.Tensor]],
    block_size: int | None = None,
    root_workers: int | None = None,
    device: torch.device = CPU,
) -> Contender:
    """A contender on ``device`` (the model's parameters and ``grads`` must already be there)."""
    shapes = [tuple(p.shape) for p in spec.model.parameters()]
    cuda = device.type == "cuda"
    if kind == "floor":
        assert block_size is not None
        floor = GemmFloor(shapes, block_size, device)
        return Contender(
            f"GEMM floor b{block_size}",
            kind,
            block_size,
            floor.step,
            floor=floor,
            synchronize=cuda,
        )
    params = [p.detach().clone().requires_grad_(True) for p in spec.model.parameters()]
    opt: torch.optim.Optimizer
    if kind == "adam" and cuda:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        name = "AdamW (fused=True)"
    elif kind == "adam":
        opt = torch.optim.Adam(params, lr=1e-3)
        name = f"Adam (foreach={opt.defaults['foreach']})"
    else:
        assert block_size is not None
        opt = Shampoo(
            params,
            lr=1e-3,
            block_size=block_size,
            # the no-root contender computes its only root at step 1, then never again
            precondition_frequency=10**9 if kind == "noroot" else FREQUENCY,
            start_preconditioning_step=1 if kind == "noroot" else None,
            async_roots=kind == "async",
            root_workers=root_workers,
            skip_nonfinite=kind != "noguard",
            compact_state=kind == "compact",
        )
        labels = {
            "noroot": "sync, no roots after step 1",
            "noguard": "sync, guard off",
            "compact": "sync, compact_state",
        }
        label = labels.get(kind, kind)
        name = f"Shampoo b{block_size} {label}"
    return Contender(
        name, kind, block_size, opt.step, params=params, grads=grads, opt=opt, synchronize=cuda
    )


def run_interleaved(contenders: list[Contender], rounds: int, cycles: int, label: str) -> float:
    """Warm every contender up (Shampoo: one cycle), then ``rounds`` rounds of one block per
    contender (rotating order): ``cycles`` precondition cycles timed, preceded by one untimed cycle
    for async contenders; roots in flight are drained after each block. Returns the wall time."""
    began = time.perf_counter()
    for c in contenders:
        log(f"{label}: warm-up {c.name}")
        # Shampoo: past its first root step (start = frequency); Adam, floor: a few steps
        for _ in range(FREQUENCY if c.is_shampoo else 3):
            c.advance(-1, timed=False)
        c.drain()
    for r in range(rounds):
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            log(f"{label}: round {r + 1}/{rounds} {c.name}")
            if c.is_async:
                for _ in range(FREQUENCY):
                    c.advance(r, timed=False)
            for _ in range(cycles * FREQUENCY):
                c.advance(r, timed=True)
            c.drain()
            gc.collect()
    return time.perf_counter() - began


# ---------------------------------------------------------------------------------- summaries


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    return 0


def state_bytes(c: Contender) -> int:
    """The memory the state holds: each storage once (per-block views of a bucket's stacks)."""
    return held_bytes(list(c.opt.state.values())) if c.opt is not None else 0


def staging_bytes(c: Contender) -> int:
    """Host snapshot/result buffers of the root pipeline (kept outside ``opt.state``)."""
    roots = getattr(c.opt, "_roots", None)
    staging = roots.staging if roots is not None else {}
    buffers = [[s.snapshot, s.result] for per_param in staging.values() for s in per_param]
    return tensor_bytes(buffers)


@dataclass
class Summary:
    name: str
    kind: str
    block_size: int | None
    steps: int
    median_nonroot: float
    mean: float
    max: float
    median_root: float | None
    stalls_timed: int
    stall_seconds_timed: float
    state_bytes: int
    staging_bytes: int
    root_stats: dict[str, Any] | None
    compute_seconds: float

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(c: Contender) -> Summary:
    times = [r.seconds for r in c.records]
    nonroot = [r.seconds for r in c.records if not r.root] or times
    root = [r.seconds for r in c.records if r.root]
    stats = None
    if c.is_shampoo:
        stats = {k: v for k, v in c.opt.root_stats().items() if k != "last_error"}  # type: ignore[union-attr]
    return Summary(
        name=c.name,
        kind=c.kind,
        block_size=c.block_size,
        steps=len(times),
        median_nonroot=statistics.median(nonroot),
        mean=statistics.fmean(times),
        max=max(times),
        median_root=statistics.median(root) if root else None,
        stalls_timed=sum(1 for r in c.records if r.stall_seconds > 0),
        stall_seconds_timed=sum(r.stall_seconds for r in c.records),
        state_bytes=state_bytes(c),
        staging_bytes=staging_bytes(c),
        root_stats=stats,
        compute_seconds=c.compute_seconds,
    )


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{1e3 * seconds:.2f}" if seconds < 1 else f"{1e3 * seconds:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = [
        "  ".join(
            str(x).ljust(w) if i == 0 else str(x).rjust(w)
            for i, (x, w) in enumerate(zip(line, widths))
        )
        for line in [headers, *rows]
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- sections


def model_suite(
    spec: ModelSpec,
    grads: list[list[torch.Tensor]],
    block_sizes: Sequence[int],
    root_workers: int | None,
    rounds: int,
    cycles: int,
    label: str,
    guard_off: bool = False,
    device: torch.device = CPU,
) -> tuple[list[Summary], float]:
    """Adam, the GEMM floors, sync and async Shampoo per block size (and, with ``guard_off``,
    sync with the non-finite guard off and sync with compact state), interleaved."""
    contenders = [make_contender("adam", spec, grads, device=device)]
    contenders += [make_contender("floor", spec, grads, b, device=device) for b in block_sizes]
    for b in block_sizes:
        for kind in ("sync", "noguard", "compact", "async") if guard_off else ("sync", "async"):
            contenders.append(make_contender(kind, spec, grads, b, root_workers, device))
    try:
        wall = run_interleaved(contenders, rounds, cycles, label)
        return [summarize(c) for c in contenders], wall
    finally:
        for c in contenders:
            c.close()


def core_table(spec: ModelSpec, summaries: list[Summary], rounds: int, cycles: int) -> str:
    adam = next(s for s in summaries if s.kind == "adam")
    floors = {s.block_size: s for s in summaries if s.kind == "floor"}
    params = sum(p.numel() for p in spec.model.parameters())
    tensors = len(list(spec.model.parameters()))
    head = (
        f"-- {spec.name}: {params / 1e6:.2f} M params in {tensors} tensors; {rounds} rounds x "
        f"{cycles * FREQUENCY} timed steps per contender"
    )
    headers = [
        "config",
        "med ms",
        "mean ms",
        "max ms",
        "med/Adam",
        "mean/Adam",
        "med/GEMM",
        "state MB",
        "/Adam",
        "staging MB",
    ]
    rows = []
    for s in summaries:
        shampoo = s.kind in ("sync", "noguard", "compact", "async")
        floor = floors.get(s.block_size) if shampoo else None
        rows.append(
            [
                s.name,
                ms(s.median_nonroot),
                ms(s.mean),
                ms(s.max),
                ratio(s.median_nonroot, adam.median_nonroot),
                ratio(s.mean, adam.mean),
                ratio(s.median_nonroot, floor.median_nonroot) if floor else "-",
                f"{s.state_bytes / 2**20:.1f}" if s.kind != "floor" else "-",
                ratio(s.state_bytes, adam.state_bytes) if s.kind != "floor" else "-",
                f"{s.staging_bytes / 2**20:.1f}" if shampoo else "-",
            ]
        )
    return head + "\n" + table(headers, rows) + "\n" + guard_cost(summaries)


def guard_cost(summaries: list[Summary]) -> str:
    """The non-finite guard's cost: sync non-root median with the guard on over off."""
    guard = [
        f"b{s.block_size} {ratio(s.median_nonroot, off.median_nonroot)}x"
        for s in summaries
        if s.kind == "sync"
        for off in summaries
        if off.kind == "noguard" and off.block_size == s.block_size
    ]
    return "non-finite guard cost (sync median, guard on / off): " + ", ".join(guard)


def targets(sync: Summary, asyn: Summary) -> dict[str, Any]:
    max_ratio = asyn.max / asyn.median_nonroot
    mean_ratio = asyn.mean / sync.median_nonroot
    stalls = asyn.stalls_timed
    return {
        "async_max_over_median": max_ratio,
        "async_max_ok": max_ratio <= 1.5,
        "async_mean_over_sync_nonroot_median": mean_ratio,
        "async_mean_ok": mean_ratio <= 1.05,
        "async_stalls": stalls,
        "async_stalls_ok": stalls == 0,
    }


def verdict(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def pair_table(
    pairs: Sequence[tuple[Summary, Summary]],
    shapes: Sequence[tuple[int, ...]],
    workers: int,
    baseline: str,
) -> tuple[str, dict[str, Any]]:
    """Rows for (baseline, async) pairs with root stats and the window, then the targets.

    ``root med`` is the median of the root steps (submit and/or install); ``stalls``,
    ``stall s``, ``mean root s`` and ``roots`` are ``root_stats()`` over the optimizer's life
    (a stall is counted per parameter); ``root s/cycle`` is the root work of one precondition
    cycle on the pool (factor count x mean root seconds / workers); ``window s`` is what the
    async pipeline has to hide it in: s x (median step + compute), where s is the staleness the
    async optimizer used (``root_stats()["root_staleness"]``: the fitted "auto" value)."""
    with_compute = any(s.compute_seconds > 0 for pair in pairs for s in pair)
    headers = ["block", "mode", *(["compute/step"] if with_compute else [])]
    headers += ["med ms", "root med", "mean ms", "max ms", "max/med", f"mean/{baseline} med"]
    headers += ["stalls", "stall s", "mean root s", "roots", "root s/cycle", "s", "window s"]
    rows, lines, report = [], [], {}
    for base, asyn in pairs:
        b = asyn.block_size
        assert b is not None
        nroots = len(factor_sizes(shapes, b))
        for s in (base, asyn):
            st = s.root_stats or {}
            mean_root = float(st.get("mean_root_seconds", 0.0))
            workers_here = workers if s.kind == "async" else 1
            row = [str(b), s.kind, *([f"{s.compute_seconds:.3f} s"] if with_compute else [])]
            row += [
                ms(s.median_nonroot),
                ms(s.median_root),
                ms(s.mean),
                ms(s.max),
                ratio(s.max, s.median_nonroot),
                ratio(s.mean, base.median_nonroot),
                str(st.get("stalls", "-")),
                f"{float(st.get('stall_seconds', 0.0)):.1f}",
                f"{mean_root:.4f}",
                str(st.get("roots_computed", "-")),
                f"{nroots * mean_root / workers_here:.2f}" if s.kind != "noroot" else "-",
                str(st.get("root_staleness", "-")) if s.kind == "async" else "-",
                f"{_staleness(s) * (s.median_nonroot + s.compute_seconds):.2f}"
                if s.kind == "async"
                else "-",
            ]
            rows.append(row)
        t = targets(base, asyn)
        report[str(b)] = t
        lines.append(
            f"targets b{b}: async max <= 1.5x its median: {t['async_max_over_median']:.3f}x "
            f"{verdict(t['async_max_ok'])} | async mean <= 1.05x {baseline} non-root median: "
            f"{t['async_mean_over_sync_nonroot_median']:.3f}x {verdict(t['async_mean_ok'])} | "
            f"timed steps that stalled: {t['async_stalls']} {verdict(t['async_stalls_ok'])}"
        )
    return table(headers, rows) + "\n" + "\n".join(lines), report


def _staleness(s: Summary) -> int:
    """The staleness an async contender's later root cycles used (its group's fitted value)."""
    value = (s.root_stats or {}).get("root_staleness")
    return int(value) if isinstance(value, int) else FREQUENCY


def sync_async_pairs(summaries: list[Summary]) -> list[tuple[Summary, Summary]]:
    pairs = []
    for b in sorted({s.block_size for s in summaries if s.kind == "async"}):  # type: ignore[type-var]
        base = next(s for s in summaries if s.kind in ("sync", "noroot") and s.block_size == b)
        asyn = next(s for s in summaries if s.kind == "async" and s.block_size == b)
        pairs.append((base, asyn))
    return pairs


def window_suite(
    spec: ModelSpec,
    grads: list[list[torch.Tensor]],
    compute: dict[int, float],
    rounds: int,
    cycles: int,
    device: torch.device = CPU,
) -> list[Summary]:
    """Async vs a sync no-root contender per block size, each with ``compute[b]`` s of sleep
    before every step; threads and workers as in 2(a)."""
    contenders = []
    for b, seconds in compute.items():
        for kind in ("noroot", "async"):
            c = make_contender(kind, spec, grads, b, root_workers=1, device=device)
            c.compute_seconds = seconds
            contenders.append(c)
    try:
        run_interleaved(contenders, rounds, cycles, "3 window")
        return [summarize(c) for c in contenders]
    finally:
        for c in contenders:
            c.close()


# ------------------------------------------------------------------------------------------ main


SECTIONS = ("core", "hetero", "window")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps (< 30 s)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the models, gradients and optimizers live (default cpu; roots: always CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) for section 1 and 2(b) (default: never called; quick: 1)",
    )
    parser.add_argument(
        "--root-workers",
        type=int,
        default=None,
        help="root_workers for section 1 and 2(b) (default: the library's)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--cycles",
        type=int,
        default=None,
        help="2(a): timed precondition cycles per block (default 5: 100 timed steps)",
    )
    parser.add_argument(
        "--cycles-b",
        type=int,
        default=None,
        help="section 1's MLP run = 2(b): timed cycles per block (default 2; 5 for 100 steps)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)"
    )
    parser.add_argument(
        "--window-cycles",
        type=int,
        default=None,
        help="section 3: timed cycles per block (default 1)",
    )
    parser.add_argument(
        "--coverage",
        type=float,
        default=2.0,
        help="section 3: model compute per step = coverage x the sync root work per cycle "
        "measured in 2(a) / frequency (default 2)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in args.sections:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r}")
    if "window" in args.sections and "hetero" not in args.sections:
        parser.error("section 'window' sizes its model compute from section 'hetero'")
    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        parser.error(
            f"--device cuda: no usable GPU (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, {build}); use --device cpu"
        )
    return args


def environment(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        adam_foreach: Any = _default_to_fused_or_foreach([torch.zeros(1)], False, False)[1]
    except Exception:  # private helper; only informative
        adam_foreach = "unknown"
    gpu: dict[str, Any] = {}
    if args.device == "cuda":
        gpu = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return {
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "adam_foreach_resolves_to": adam_foreach,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **gpu,
    }


def load() -> str:
    return "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    began = time.perf_counter()
    torch.manual_seed(0)
    env = environment(args)
    print(
        f"torch {env['torch']} | torch.get_num_threads() {env['num_threads']} | "
        f"interop threads {env['interop_threads']} | os.cpu_count() {env['cpu_count']} | {load()}"
    )
    print(f"platform {env['platform']} | python {env['python']}")
    print(f"command: {env['command']}")
    device = torch.device(args.device)
    if device.type == "cuda":
        print(
            f"device cuda: {env['gpu']} (CUDA {env['cuda']}): models, gradients, optimizers and "
            "GEMM floors on the GPU, roots on the CPU; each step() timed between two "
            "torch.cuda.synchronize() calls"
        )
        adam_note = "Adam = torch.optim.AdamW(fused=True)"
    else:
        adam_note = f"Adam foreach=None resolves to {env['adam_foreach_resolves_to']} on CPU"
    print(
        f"step() only, fixed batch-{BATCH} gradients; precondition_frequency={FREQUENCY}; "
        f"{adam_note}; times in ms; every ratio is within one interleaved run"
    )
    quick = args.quick
    block_sizes = (64, 128) if quick else (128, 1024)
    nsets = 4 if quick else 16
    cycles_a = args.cycles or (1 if quick else 5)
    cycles_b = args.cycles_b or (1 if quick else 2)
    rounds = args.rounds or (1 if quick else 2)
    window_cycles = args.window_cycles or 1
    workers = args.root_workers or max(1, (os.cpu_count() or 2) // 2)  # the library's default
    report: dict[str, Any] = {"environment": env, "sections": {}}

    mlp = mlp_spec(quick)
    mlp_grads = gradient_sets(mlp, nsets, device)
    mlp_shapes = [tuple(p.shape) for p in mlp.model.parameters()]
    # The untimed gc.collect() between blocks scans only objects created after this point.
    gc.collect()
    gc.freeze()

    # Section 1 first: torch.set_num_threads is called only when asked for, because calling it
    # (even with the default value) changes MKL's threading for the rest of the process.
    text_b = ""
    if "core" in args.sections:
        if args.threads is None and quick:
            # a smoke run must finish quickly: tiny ops on 2 threads of a loaded 2-core machine
            # can take milliseconds each
            args.threads = 1
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        threads = torch.get_num_threads()
        print(
            f"\n== 1. step time per configuration: torch threads {threads}"
            f"{' (set)' if args.threads else ' (default, never set)'}, root_workers {workers} =="
        )
        core: dict[str, Any] = {}
        for spec in (mlp, conv_spec(quick), small_spec(quick)):
            is_mlp = spec is mlp
            grads = mlp_grads if is_mlp else gradient_sets(spec, nsets, device)
            cycles = cycles_b if is_mlp else 1
            summaries, wall = model_suite(
                spec,
                grads,
                block_sizes,
                args.root_workers,
                rounds,
                cycles,
                f"1 {spec.name}",
                guard_off=True,
                device=device,
            )
            print(core_table(spec, summaries, rounds, cycles) + f"  [{wall:.0f} s, {load()}]")
            core[spec.name] = [s.row() for s in summaries]
            if is_mlp:
                text_b, targets_b = pair_table(
                    sync_async_pairs(summaries), mlp_shapes, workers, "sync"
                )
                text_b = (
                    f"(b) = section 1's MLP run: torch threads {threads}, root_workers {workers}"
                    f"{' (defaults)' if not (args.threads or args.root_workers) else ''}; "
                    f"{rounds} rounds x {cycles * FREQUENCY} timed steps\n{text_b}"
                )
                report["sections"]["defaults"] = {"targets": targets_b}
        report["sections"]["core"] = core

    hetero: list[Summary] = []
    if "hetero" in args.sections or text_b:
        print(f"\n== 2. sync vs async roots, {mlp.name}, root_staleness = 'auto' (the default) ==")
    if "hetero" in args.sections:
        torch.set_num_threads(1)
        hetero, wall = model_suite(
            mlp, mlp_grads, block_sizes, 1, rounds, cycles_a, "2(a)", guard_off=True, device=device
        )
        adam = next(s for s in hetero if s.kind == "adam")
        floors = ", ".join(
            f"GEMM floor b{s.block_size} {ms(s.median_nonroot)}"
            for s in hetero
            if s.kind == "floor"
        )
        print(
            f"(a) heterogeneous: torch.set_num_threads(1) (main and worker), root_workers=1; "
            f"{rounds} rounds x {cycles_a * FREQUENCY} timed steps; medians: Adam "
            f"{ms(adam.median_nonroot)} ms, {floors} ms  [{wall:.0f} s, {load()}]"
        )
        text, targets_a = pair_table(sync_async_pairs(hetero), mlp_shapes, 1, "sync")
        print(text)
        print(guard_cost(hetero) + " (1 thread: the steadiest timing in this script)")
        report["sections"]["hetero"] = {
            "summaries": [s.row() for s in hetero],
            "targets": targets_a,
        }
    if text_b:
        print(text_b)

    if "window" in args.sections:
        torch.set_num_threads(1)
        compute = {}
        for sync, _ in sync_async_pairs(hetero):
            # the root cost on a core of its own: the synchronous roots of 2(a)
            assert sync.block_size is not None and sync.root_stats is not None
            work = (
                len(factor_sizes(mlp_shapes, sync.block_size))
                * sync.root_stats["mean_root_seconds"]
            )
            compute[sync.block_size] = args.coverage * work / FREQUENCY
        summaries = window_suite(mlp, mlp_grads, compute, rounds, window_cycles, device)
        print(
            f"\n== 3. root window, setup (a): time.sleep(S) before each step stands for the "
            f"forward/backward on an accelerator (CPU free); S = {args.coverage} x sync root "
            f"work per cycle in 2(a) / {FREQUENCY}; baseline 'noroot' = sync Shampoo whose only "
            f"root is at step 1, same sleep; {rounds} rounds x {window_cycles * FREQUENCY} timed "
            f"steps  [{load()}]"
        )
        text, targets_w = pair_table(sync_async_pairs(summaries), mlp_shapes, 1, "noroot")
        print(text)
        report["sections"]["window"] = {
            "compute_seconds": compute,
            "summaries": [s.row() for s in summaries],
            "targets": targets_w,
        }

    total = time.perf_counter() - began
    print(f"\ntotal {total:.0f} s, {load()}")
    report["total_seconds"] = total
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
