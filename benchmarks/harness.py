"""The one harness of the benchmark suite: the contenders, the example tasks and models, a second
checkout (A/B), interleaved timing rounds and their summaries; the reports come from report.py.

Every figure a benchmark prints is compared *within one run*: the contenders run in interleaved
blocks (the order rotating per round), so a burst of load from elsewhere hits them alike. Only
the public torch_shampoo API is used: the constructors, ``step``, ``state_dict`` (to drain the
roots in flight, untimed), ``root_stats`` and ``close`` (one exception: the ``shampoo-synchere``
baseline in :func:`optimizer`).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import importlib.util
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

import torch_shampoo
from torch_shampoo.roots.pool import run_here

from .report import ROOT, Report, git, log, mb, ms, parser, ratio  # noqa: F401 (as h.*)

BATCH = 64


# ------------------------------------------------------------------------------------ A/B


def load_checkout(where: str) -> ModuleType:
    """The torch_shampoo of another checkout (a path) or git rev (``git worktree add`` into a
    temporary directory, removed at exit), imported as ``torch_shampoo_other`` (the package
    imports itself relatively, so its modules load from that tree alongside this checkout's)."""
    path = Path(where)
    if not (path / "torch_shampoo" / "__init__.py").is_file():
        path = Path(tempfile.mkdtemp(prefix="bench_ab_")) / "tree"
        run = subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), where],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode:
            raise SystemExit(f"--compare {where}: neither a checkout nor a git rev: {run.stderr}")
        atexit.register(git, "worktree", "remove", "--force", str(path))
    module = _import("torch_shampoo_other", path / "torch_shampoo" / "__init__.py", package=True)
    module.__checkout__ = f"{where} ({git('rev-parse', 'HEAD', cwd=path)[:10]})"  # type: ignore[attr-defined]
    return module


def packages(args: argparse.Namespace) -> dict[str, ModuleType]:
    """Label -> torch_shampoo package: this checkout's, and ``--compare``'s as "other"."""
    out = {"": torch_shampoo}
    if getattr(args, "compare", None):
        out["other "] = load_checkout(args.compare)
        print(f"--compare: 'other' = {out['other '].__checkout__}")
    return out


def _import(name: str, path: Path, package: bool = False) -> ModuleType:
    """The module (or package) at ``path`` imported as ``name``."""
    where = [str(path.parent)] if package else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=where)
    assert spec is not None and spec.loader is not None
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- examples, models


def example(name: str) -> ModuleType:
    """An example script's module (examples/NAME.py), imported once from the examples folder
    under its own name (they import ``_common``, ``_methods`` and ``_report`` by their plain
    names)."""
    for dep in ("_report", "_methods", "_common", name):
        if dep not in sys.modules:
            _import(dep, ROOT / "examples" / f"{dep}.py")
    return sys.modules[name]


def task(demo: str, quick: bool) -> tuple[Any, ModuleType]:
    """A demo's task (quick: smaller batches, data or model), warmed up (``_common.warm_up``:
    untimed forward/backward passes), and its example module."""
    module = example(f"train_{demo}")
    small = {"digits": {"batch": 32}, "regression": {"train_size": 512},
             "charlm": {"d_model": 32, "layers": 1, "seq_len": 32, "batch": 8,
                        "val_batches": 2}}  # fmt: skip
    built = module.build_task(**small[demo] if quick else {})
    example("_common").warm_up(built)
    return built, module


def charlm() -> Model:
    """The char-LM demo's model and its batches' shape, at its defaults."""
    built = example("train_charlm").build_task()
    shape = next(built.batches(0))[0].shape
    vocab = built.build_model().head.out_features
    return Model("char-LM (demo)", built.build_model,
                 lambda g: torch.randint(vocab, shape, generator=g))  # fmt: skip


@dataclass
class Model:
    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]


def mlp(sizes: Sequence[int]) -> Model:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers[:-1])

    return Model(
        "MLP " + "-".join(map(str, sizes)),
        build,
        lambda g: torch.randn(BATCH, sizes[0], generator=g),
    )


def tanh_stack(depth: int, width: int, out: int | None = None) -> nn.Sequential:
    """``depth`` x (Linear(width, width), Tanh), then Linear(width, out) if ``out``."""
    layers = [m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())]
    return nn.Sequential(*layers, *([nn.Linear(width, out)] if out else []))


def models(quick: bool) -> list[Model]:
    """The step-time and memory models: an MLP, a conv net, many small layers, the digits CNN."""
    channels, side = ((3, 8, 16), 8) if quick else ((3, 32, 64, 128, 256), 32)
    depth, width = (8, 16) if quick else (50, 64)

    def conv() -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(channels):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        return nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 10)
        )

    def digits() -> nn.Module:
        return example("train_digits").build_task().build_model()

    return [
        mlp((64, 128, 128, 64) if quick else (512, 1024, 1024, 512)),
        Model(f"ConvNet {'-'.join(map(str, channels[1:]))} ({side}x{side})", conv,
              lambda g: torch.randn(BATCH, 3, side, side, generator=g)),
        Model(f"{depth}x Linear({width},{width})", lambda: tanh_stack(depth, width),
              lambda g: torch.randn(BATCH, width, generator=g)),
        Model("digits CNN (demo)", digits, lambda g: torch.randn(BATCH, 1, 8, 8, generator=g)),
    ][: 2 if quick else 4]  # fmt: skip


def gradient_sets(
    model: Model, count: int, device: str = "cpu"
) -> tuple[nn.Module, list[list[torch.Tensor]]]:
    """The model built on ``device`` and ``count`` gradient sets from real batches (MSE to random
    targets)."""
    net = model.build().to(device)
    gen = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(count):
        net.zero_grad(set_to_none=True)
        out = net(model.make_input(gen).to(device))
        nn.functional.mse_loss(out, torch.randn(out.shape, generator=gen).to(device)).backward()
        sets.append([p.grad.detach().clone() for p in net.parameters()])  # type: ignore[union-attr]
    net.zero_grad(set_to_none=True)
    return net, sets


def replica(
    net: nn.Module, sets: list[list[torch.Tensor]]
) -> tuple[list[torch.Tensor], Callable[[int], None]]:
    """A fresh copy of ``net``'s parameters and the ``before`` giving them set t's gradients."""
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]

    def before(t: int) -> None:
        for p, g in zip(params, sets[t % len(sets)]):
            p.grad = g

    return params, before


# ------------------------------------------------------------------------------- contenders


def optimizer(key: str, params: Any, lr: float = 1e-3, block: int | None = None,
              pkg: ModuleType = torch_shampoo, **kwargs: Any) -> Any:  # fmt: skip
    """One contender by key; None (and a note) when its package is not installed. Keys:
    ``shampoo-{sync,synchere,async,noguard,compact,bf16,bf16full,bf16compact,noroot}``;
    ``soap-{sync,async,bf16}``; ``ngplus``; ``adam``, ``adam-fused``; ``pto-soap``
    (pytorch-optimizer), ``hb-soap`` (HeavyBall)."""
    blocks = {"block_size": block} if block else {}
    if key == "adam":
        return torch.optim.Adam(params, lr=lr)
    if key == "adam-fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if key.startswith("shampoo"):
        mode = key.split("-")[1]
        modes: dict[str, dict[str, Any]] = {
                 "sync": {"async_roots": False}, "async": {"async_roots": True},
                 "noguard": {"async_roots": False, "skip_nonfinite": False},
                 "synchere": {"async_roots": False},
                 "compact": {"async_roots": False, "compact_state": True},
                 "bf16": {"async_roots": False, "state_dtype": torch.bfloat16},
                 "bf16full": {"async_roots": False, "state_dtype": torch.bfloat16,
                              "compact_state": False},
                 "bf16compact": {"async_roots": False, "state_dtype": torch.bfloat16,
                                 "compact_state": True},
                 "noroot": {"async_roots": False, "precondition_frequency": 10**9,
                            "start_preconditioning_step": 1}}  # fmt: skip
        extra = modes[mode]
        if mode == "synchere" and pkg is not torch_shampoo:
            print("note: shampoo-synchere is this checkout's alone: no row")
            return None
        opt = pkg.Shampoo(params, lr=lr, **blocks, **{**extra, **kwargs})
        if mode == "synchere":  # (the one private hook: sync roots as before RootPool.solve_now,
            sched = opt._cycles.scheduler  # on the calling thread alone, at the workers' count)
            sched._now = lambda jobs: [run_here(j, sched.threads()) for j in jobs]
        return opt
    if key.startswith("soap"):
        if key == "soap-bf16":
            kwargs = {"state_dtype": torch.bfloat16, **kwargs}
        return pkg.SOAP(params, lr=lr, **blocks, async_roots=key == "soap-async", **kwargs)
    if key == "ngplus":
        return pkg.NGPlus(params, lr=lr, **kwargs)
    if key in LABELS:
        package = "heavyball" if key == "hb-soap" else "pytorch_optimizer"
        try:
            module = importlib.import_module(package)
        except ImportError:
            print(f"note: {LABELS[key]} is not installed: no row")
            return None
        return module.SOAP(params, lr=lr, **({"weight_decay": 0.0} if key == "pto-soap" else {}))
    raise ValueError(f"unknown optimizer {key!r}")


LABELS = {"pto-soap": "SOAP (pytorch-optimizer)", "hb-soap": "SOAP (HeavyBall)"}


def drain(opt: Any) -> None:
    """Wait for roots in flight (untimed): torch_shampoo's ``state_dict()`` waits for them."""
    if hasattr(opt, "root_stats"):
        opt.state_dict()


def close(opt: Any) -> None:
    if hasattr(opt, "close"):
        opt.close()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """THE state measure of the suite, the same for every optimizer: the bytes of the storages
    that the tensors in ``opt.state`` hold, each storage once (views share one)."""
    seen: dict[tuple[int, str], int] = {}

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            seen[(s.data_ptr(), str(v.device))] = s.nbytes()
        elif isinstance(v, (dict, list, tuple)):
            for x in v.values() if isinstance(v, dict) else v:
                visit(x)

    visit(list(opt.state.values()))
    return sum(seen.values())


# --------------------------------------------------------------------------------- timing


@dataclass
class Contender:
    """One timed thing. ``step`` is timed; it may return inner seconds (e.g. the
    ``optimizer.step()`` part of a training step). ``before(t)`` runs untimed before each step
    (assign gradients, a simulated forward/backward). ``opt`` is drained and closed."""

    name: str
    step: Callable[[], Any]
    before: Callable[[int], Any] | None = None
    opt: Any = None
    root_every: int | None = None
    """Steps t (counted from 1) with t % root_every == 0 are root steps."""
    refill: int = 0
    """Untimed steps at the start of each block (an async pipeline refilling)."""
    cuda: bool = False
    t: int = 0
    records: list[tuple[int, int, float, float | None]] = field(default_factory=list)

    def advance(self, round_index: int, timed: bool) -> None:
        self.t += 1
        if self.before is not None:
            self.before(self.t)
        if self.cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        inner = self.step()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        if timed:
            inner = inner if isinstance(inner, float) else None  # (a step's own return value)
            self.records.append((round_index, self.t, seconds, inner))

    def summary(self) -> dict[str, Any]:
        times = [r[2] for r in self.records]
        is_root = [bool(self.root_every and r[1] % self.root_every == 0) for r in self.records]
        roots = [s for s, root in zip(times, is_root) if root]
        nonroot = [s for s, root in zip(times, is_root) if not root]
        inner = [r[3] for r in self.records if r[3] is not None]
        out = {"name": self.name, "steps": len(times), "median": statistics.median(times),
               "median_nonroot": statistics.median(nonroot or times),
               "mean": statistics.fmean(times),
               "max": max(times), "median_root": statistics.median(roots) if roots else None,
               "inner_median": statistics.median(inner) if inner else None,
               "inner_mean": statistics.fmean(inner) if inner else None}  # fmt: skip
        if hasattr(self.opt, "root_stats"):
            stats = self.opt.root_stats()
            out["root_stats"] = {k: v for k, v in stats.items() if k != "last_error"}
        return out


def interleave(
    contenders: list[Contender], rounds: int, steps: int, warmup: int, label: str = ""
) -> list[dict[str, Any]]:
    """Warm every contender up (``warmup`` untimed steps, then drained), then ``rounds`` rounds
    of one block per contender, the order rotating: ``refill`` untimed steps, ``steps`` timed
    steps, the roots in flight drained (untimed), a garbage collection. Closes the optimizers at
    the end. Returns the contenders' summaries."""
    try:
        for c in contenders:
            log(f"{label} warm-up {c.name}")
            for _ in range(warmup):
                c.advance(-1, timed=False)
            drain(c.opt)
        for r in range(rounds):
            shift = r % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                log(f"{label} round {r + 1}/{rounds} {c.name}")
                for _ in range(c.refill):
                    c.advance(r, timed=False)
                for _ in range(steps):
                    c.advance(r, timed=True)
                drain(c.opt)
                gc.collect()
    finally:
        for c in contenders:
            close(c.opt)
    return [c.summary() for c in contenders]


def run(
    contenders: list[Contender], rounds: int, steps: int, warmup: int, label: str
) -> tuple[float, list[dict[str, Any]], dict[str, float]]:
    """The first step of each contender timed apart (state creation, compilation), then
    ``interleave``: the wall time, the summaries and the first steps' seconds."""
    first: dict[str, float] = {}
    for c in contenders:
        began = time.perf_counter()
        c.advance(-1, timed=False)
        first[c.name] = time.perf_counter() - began
    began = time.perf_counter()
    rows = interleave(contenders, rounds, steps, warmup, label)
    return time.perf_counter() - began, rows, first
