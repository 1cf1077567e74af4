"""optimizer.step() time of SOAP against Shampoo, Adam and pytorch-optimizer's SOAP.

Only ``optimizer.step()`` is timed, on fixed gradients from real backward passes (assigned
untimed before each step). The machine is shared, so the contenders run in interleaved blocks
of whole precondition cycles, the order rotating per round, and every figure is a ratio within
this run: the median step (no root work on the step) and the mean step over whole cycles
(amortized: the root steps and any wait for a late root included). Async contenders start each
block with one untimed cycle and drain their roots in flight (untimed) at its end.

    python benchmarks/soap_step.py              # ~4 minutes on a 2-core CPU
    python benchmarks/soap_step.py --quick      # seconds
    python benchmarks/soap_step.py --device cuda --quick    # on the GPU (each timed step()
                                                            # between two synchronizations)
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import itertools

import _common

import torch_shampoo


def mlp(quick: bool, where: torch.device) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    widths = [64, 128, 128, 64] if quick else [512, 1024, 1024, 512]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).to(where)
    x = torch.randn(64, widths[0]).to(where)
    return model, lambda: model(x).pow(2).mean()


def charlm(quick: bool, where: torch.device) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    import train_charlm

    task = (
        train_charlm.build_task(d_model=32, layers=1, seq_len=32, batch=8)
        if quick
        else (train_charlm.build_task())
    )
    x, y = (t.to(where) for t in next(iter(task.batches(0))))
    model = task.build_model().to(where)
    return model, lambda: task.loss(model(x), y)


def contenders(block_size: int) -> dict[str, Callable[[Any], torch.optim.Optimizer]]:
    made: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
        "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "Shampoo sync f=10": lambda p: torch_shampoo.Shampoo(
            p, lr=1e-3, block_size=block_size, precondition_frequency=10, async_roots=False
        ),
        "Shampoo async f=10": lambda p: torch_shampoo.Shampoo(
            p, lr=1e-3, block_size=block_size, precondition_frequency=10
        ),
        "Shampoo async f=20 (default)": lambda p: torch_shampoo.Shampoo(
            p, lr=1e-3, block_size=block_size
        ),
        "SOAP sync": lambda p: torch_shampoo.SOAP(
            p, lr=1e-3, block_size=block_size, async_roots=False
        ),
        "SOAP async": lambda p: torch_shampoo.SOAP(p, lr=1e-3, block_size=block_size),
        "SOAP async eigh_every=1": lambda p: torch_shampoo.SOAP(
            p, lr=1e-3, block_size=block_size, eigh_every=1
        ),
    }
    try:
        reference = importlib.import_module("pytorch_optimizer").SOAP
        made["pytorch-optimizer SOAP"] = lambda p: reference(p, lr=1e-3, weight_decay=0.0)
    except ImportError:
        print("note: pytorch-optimizer not installed: no reference row")
    return made


def drain(opt: torch.optim.Optimizer) -> None:
    roots = getattr(opt, "_roots", None)
    if roots is not None:
        roots.send()
        for pending in list(roots.pending.values()):
            for ticket in pending.tickets:
                ticket.wait()


def measure(build: Callable[[bool], Any], args: argparse.Namespace) -> list[list[str]]:
    torch.manual_seed(0)
    model, loss = build(args.quick, torch.device(args.device))
    cuda = args.device == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for _ in range(3):
        model.zero_grad()
        loss().backward()
        grads.append([p.grad.clone() for p in params])  # type: ignore[union-attr]
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=1e-3)
    opts = {name: make(params) for name, make in contenders(args.block_size).items()}
    times: dict[str, list[float]] = {name: [] for name in opts}
    names = list(opts)
    cycle = 20  # whole cycles of both frequencies
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            opt = opts[name]
            for step in range(cycle * (args.cycles + 1)):
                for p, g in zip(params, grads[step % len(grads)]):
                    p.grad = g.clone()
                if cuda:
                    torch.cuda.synchronize()
                began = time.perf_counter()
                opt.step()
                if cuda:
                    torch.cuda.synchronize()
                if step >= cycle:
                    times[name].append(time.perf_counter() - began)
            drain(opt)
    for opt in opts.values():
        if hasattr(opt, "close"):
            opt.close()
    adam = statistics.mean(times["Adam"])
    shampoo = statistics.mean(times["Shampoo async f=10"])
    rows = []
    for name, t in times.items():
        mean, median = statistics.mean(t), statistics.median(t)
        rows.append(
            [
                name,
                f"{median * 1e3:.2f}",
                f"{mean * 1e3:.2f}",
                f"{mean / adam:.2f}",
                f"{mean / shampoo:.2f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=2, help="timed 20-step cycles per block")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.cycles = 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no usable GPU here")
    print(_common.environment_header(), flush=True)
    headers = ["optimizer", "median ms", "mean ms", "mean / Adam", "mean / Shampoo async f=10"]
    for label, build in (("MLP 512-1024-1024-512", mlp), ("char-LM demo", charlm)):
        rows = measure(build, args)
        print(f"\n== {label}: {args.rounds} rounds x {args.cycles} cycles of 20 steps ==")
        print(_common.format_table(headers, rows), flush=True)


if __name__ == "__main__":
    main()
