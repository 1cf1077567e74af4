"""optimizer.step() time of Shampoo and SOAP against Adam, the bare-ops floor and published SOAPs.

Only ``step()`` is timed, on fixed gradient sets from real backward passes (assigned untimed
before each step); contenders run interleaved (benchmarks/harness.py), roots drained untimed
after each block. Sections (``--sections``):

  core     per model: median non-root step, mean over whole precondition cycles (frequency 10:
           root steps and waits included), max; ratios to Adam and to the floor (the bare tensor
           ops of a Shampoo step on the same blocks: statistics, X_L G X_R, the Adam graft's
           moments; no checks, no roots); the non-finite guard's cost (sync, guard off) and
           compact state; SOAP sync/async; pytorch-optimizer's and HeavyBall's SOAP if installed
           ("first s": the first step, state creation and, for HeavyBall, its compilation).
  threads  the MLP's Shampoo sync/async/Adam at 1 thread (root_workers=1) and at every core;
           synchere: sync with the step's roots on the calling thread alone (as before the pool
           helped: issue 32's baseline for sync roots on every core).
  storage  the MLP at block 128: full matrices, compact (True), bfloat16 full, "auto" and
           compact; SOAP in float32 and bfloat16: what packing and bfloat16 cost the step.
  scaling  an MLP of two width x width layers, widths 256..4096: Adam vs Shampoo at blocks
           128/1024, roots only at step 1 (every timed step preconditions).
  compile  Shampoo's step eager vs torch.compile (inductor), compile time apart (CPU only).

``--compare PATH_OR_REV`` adds the other checkout's Shampoo sync/async to core and threads.
``--device cuda``: models, gradients, optimizers and floor on the GPU (Adam: AdamW fused), each
step() between two synchronizations; roots stay on the CPU.

    python -m benchmarks.step_time --quick
    python -m benchmarks.step_time --sections core,threads --compare HEAD~5
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import harness as h

FREQUENCY = 10


class Floor:
    """The floor (module docstring) on each parameter as a matrix (dim 0 x the rest; a vector as
    one row) cut into tiles of at most ``block`` per side, stacked."""

    def __init__(self, params: list[torch.Tensor], block: int) -> None:
        self.params, self.stacks = params, []
        for p in params:
            m, n = (p.shape[0], p[0].numel()) if p.dim() > 1 else (1, p.numel())
            bm, bn = min(m, block), min(n, block)
            k = math.ceil(m / bm) * math.ceil(n / bn)
            g = torch.randn(k, bm, bn, device=p.device)
            eye = [torch.eye(d, device=p.device).expand(k, d, d).clone() for d in (bm, bn)]
            self.stacks.append((g, [torch.zeros_like(e) for e in eye], eye))
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        torch._foreach_lerp_(self.m, grads, 0.1)  # type: ignore[arg-type]
        torch._foreach_mul_(self.v, 0.999)
        torch._foreach_addcmul_(self.v, grads, grads, value=0.001)  # type: ignore[arg-type]
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_add_(denom, 1e-8)
        direction = torch._foreach_div(self.m, denom)
        for g, (left, right), (xl, xr) in ((s[0], s[1], s[2]) for s in self.stacks):
            left.baddbmm_(g, g.mT, beta=0.999, alpha=0.001)
            right.baddbmm_(g.mT, g, beta=0.999, alpha=0.001)
            torch.bmm(torch.bmm(xl, g), xr)
        torch._foreach_add_(self.params, direction, alpha=-1e-3)


def contenders(model: h.Model, args: Any, blocks: tuple[int, ...], pkgs: dict[str, Any],
               keys: list[str], workers: int | None = None) -> list[h.Contender]:  # fmt: skip
    """One contender per (package, key, block): its own copy of the parameters and the fixed
    gradient sets. Keys as harness.optimizer, plus "floor"."""
    net, sets = h.gradient_sets(model, 3 if args.quick else 8, args.device)
    out: list[h.Contender] = []
    cuda = args.device == "cuda"
    for key in keys:
        tuned = key.startswith(("shampoo", "soap"))
        periodic = tuned and key != "shampoo-noroot"  # (noroot: roots only at step 1)
        for label, pkg in pkgs.items() if tuned else [("", None)]:
            for block in blocks if tuned or key == "floor" else [None]:
                params, before = h.replica(net, sets)
                tag = f" b{block}" if block else ""
                if key == "floor":
                    floor = Floor(params, block)  # type: ignore[arg-type]
                    out.append(h.Contender(f"floor{tag}", floor.step, before, cuda=cuda))
                    continue
                kw: dict[str, Any] = {"block": block, "pkg": pkg} if tuned else {}
                if periodic:
                    kw.update(precondition_frequency=FREQUENCY, root_workers=workers)
                key = "adam-fused" if key == "adam" and cuda else key
                opt = h.optimizer(key, params, **kw)
                if opt is None:
                    continue
                out.append(h.Contender(
                    label + h.LABELS.get(key, key) + tag, opt.step, before, opt,
                    FREQUENCY if periodic else None, cuda=cuda,
                    refill=FREQUENCY if key.endswith("async") else 0,
                ))  # fmt: skip
    return out


def run_models(report: h.Report, title: str, model: h.Model, args: Any, cs: list[h.Contender],
               cycles: int) -> None:  # fmt: skip
    """Warm-up (the first step timed apart), interleaved rounds, one table."""
    rounds = args.rounds or (1 if args.quick else 2)
    wall, rows, first = h.run(cs, rounds, cycles * FREQUENCY, FREQUENCY, title)
    adam = next(r for r in rows if r["name"].startswith("adam"))
    floors = {r["name"].split()[-1]: r for r in rows if r["name"].startswith("floor")}
    table = []
    for r in rows:
        floor = floors.get(r["name"].split()[-1]) if not r["name"].startswith("floor") else None
        stats = r.get("root_stats", {})
        table.append([
            r["name"], h.ms(r["median_nonroot"]), h.ms(r["mean"]), h.ms(r["max"]),
            h.ratio(r["median_nonroot"], adam["median_nonroot"]), h.ratio(r["mean"], adam["mean"]),
            h.ratio(r["median_nonroot"], floor["median_nonroot"]) if floor else "-",
            stats.get("stalls", "-"), f"{first[r['name']]:.2f}",
        ])  # fmt: skip
    params = sum(p.numel() for p in model.build().parameters())
    report.section(
        f"{title}: {model.name}, {params / 1e6:.2f} M params",
        ["contender", "med ms", "mean ms", "max ms", "med/Adam", "mean/Adam", "med/floor",
         "stalls", "first s"], table,
        f"{rounds} rounds x {cycles * FREQUENCY} timed steps each, {wall:.0f} s; med: non-root "
        f"steps; threads {torch.get_num_threads()}", {"rows": rows, "first_seconds": first},
    )  # fmt: skip


def core(report: h.Report, args: Any, pkgs: dict[str, Any], blocks: tuple[int, ...]) -> None:
    keys = ["adam", "floor", "shampoo-sync", "shampoo-noguard", "shampoo-compact", "shampoo-bf16",
            "shampoo-bf16full", "shampoo-bf16compact", "shampoo-async", "soap-sync", "soap-async",
            "pto-soap", "hb-soap"]  # fmt: skip
    for i, model in enumerate(h.models(args.quick)):
        ks = keys if i == 0 else [k for k in keys if k != "hb-soap" or not args.quick]
        cs = contenders(model, args, blocks, pkgs, ks)
        run_models(report, "core", model, args, cs, 1 if args.quick else 2)


def threads(report: h.Report, args: Any, pkgs: dict[str, Any], blocks: tuple[int, ...]) -> None:
    model = h.models(args.quick)[0]
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        keys = ["adam", "shampoo-sync", "shampoo-synchere", "shampoo-async"]
        cs = contenders(model, args, blocks, pkgs, keys, workers=1 if n == 1 else None)
        run_models(report, f"threads {n}", model, args, cs, 1 if args.quick else 3)


def storage(report: h.Report, args: Any, pkgs: dict[str, Any]) -> None:
    """The MLP at block 128 (--quick: 64) with each way of storing factors and roots (and
    SOAP's bases)."""
    keys = ["adam", "shampoo-sync", "shampoo-compact", "shampoo-bf16full", "shampoo-bf16",
            "shampoo-bf16compact", "soap-sync", "soap-bf16"]  # fmt: skip
    block = (64,) if args.quick else (128,)
    cs = contenders(h.models(args.quick)[0], args, block, pkgs, keys)
    run_models(report, "storage", h.models(args.quick)[0], args, cs, 1 if args.quick else 3)


def _two_linear(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))


def _inputs(width: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(h.BATCH, width, generator=g)


def scaling(report: h.Report, args: Any) -> None:
    widths = (64, 128) if args.quick else (256, 512, 1024, 2048, 4096)
    blocks = (32, 64) if args.quick else (128, 1024)
    rows, data = [], []
    for width in widths:
        model = h.Model(
            f"2x Linear({width})",
            functools.partial(_two_linear, width),
            functools.partial(_inputs, width),
        )
        cs = contenders(model, args, blocks, {"": h.torch_shampoo}, ["adam", "shampoo-noroot"])
        s = h.interleave(cs, args.rounds or 3, 3, 2, f"scaling {width}")
        data.append(s)
        rows.append(
            [width, h.ms(s[0]["median"])]
            + [f"{h.ms(x['median'])} ({h.ratio(x['median'], s[0]['median'])}x)" for x in s[1:]]
        )
    report.section("scaling: step() median vs width", ["width", "Adam ms"] + [
        f"Shampoo b{b} ms (/Adam)" for b in blocks], rows,
        "Shampoo's only roots at step 1; MLP of two width x width layers", data)  # fmt: skip


def compile_section(report: h.Report, args: Any) -> None:
    shapes = [(2, 32)] if args.quick else [(4, 256), (20, 64)]
    rows, data = [], []
    for depth, width in shapes:
        cs, compile_s = [], 0.0
        for compiled in (False, True):
            torch.manual_seed(0)
            net = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
            params = list(net.parameters())
            for p in params:
                p.grad = torch.randn_like(p)
            opt = h.optimizer("shampoo-noroot", params, block=128)
            step: Callable[[], Any] = torch.compile(opt.step) if compiled else opt.step
            began = time.perf_counter()
            for _ in range(3):
                step()
            compile_s = time.perf_counter() - began if compiled else compile_s
            cs.append(h.Contender("compiled" if compiled else "eager", step, opt=opt))
        e, c = h.interleave(cs, args.rounds or (1 if args.quick else 3), 3 if args.quick else 20, 0)
        data.append([e, c, compile_s])
        rows.append([f"{depth}x Linear({width})", h.ms(e["median"]), h.ms(c["median"]),
                     h.ratio(e["median"], c["median"]), f"{compile_s:.1f}"])  # fmt: skip
    report.section("compile: Shampoo step() eager vs torch.compile",
                   ["model", "eager ms", "compiled ms", "eager/compiled", "compile + 3 steps s"],
                   rows, "roots only at step 1; inductor's on-disk cache makes compiles warm",
                   data)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = h.parser(__doc__, sections="core,threads,storage,scaling,compile", device=True)
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    if args.quick:  # HeavyBall compiles with mode "default", not max-autotune (minutes)
        with contextlib.suppress(ImportError):
            importlib.import_module("heavyball").utils.compile_mode = "default"
    report = h.Report("step_time", args, quick_threads=True)
    pkgs = h.packages(args)
    blocks = (64, 128) if args.quick else (128, 1024)
    if "core" in sections:
        core(report, args, pkgs, blocks)
    if "storage" in sections:
        storage(report, args, pkgs)
    if "scaling" in sections:
        scaling(report, args)
    if "compile" in sections and args.device == "cpu":
        compile_section(report, args)
    if "threads" in sections:  # last: set_num_threads changes MKL's threading for good
        threads(report, args, pkgs, blocks[-1:])
    report.finish()


if __name__ == "__main__":
    main()
