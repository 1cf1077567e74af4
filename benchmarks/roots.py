"""Benchmark inverse roots X = (A + εI)^(-1/p): eigh vs newton (vs cholesky for p = 1).

Each method is timed (median of a few interleaved repeats) next to a raw float64
`torch.linalg.eigh` of the same matrix, the yardstick for the eigh method (target: our eigh
time <= 1.2 x raw eigh). Accuracy is the relative backward error ‖X^(-p) - B‖_F / ‖B‖_F with
B = A + εI and X^(-p) evaluated from the eigendecomposition of X; "floor" is u·(1 + p·κ^(1/p)),
the best any float64 root can reach.

    python benchmarks/roots.py [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch_shampoo.matrix_roots import inverse_root

SIZES = (64, 128, 256, 512, 1024, 2048)
QUICK_MAX_SIZE = 512
CONDITIONS = (1e2, 1e6, 1e10)
EPSILON = 1e-12
UNIT_ROUNDOFF = 2.0**-53


def test_matrix(n: int, condition: float, seed: int) -> torch.Tensor:
    """A = Q diag(d) Qᵀ, Q Haar-orthogonal, d geometric from 1 down to 1/condition."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    q = q * torch.sign(torch.diagonal(r))
    d = torch.logspace(0.0, -math.log10(condition), n, dtype=torch.float64)
    a = (q * d) @ q.mT
    return 0.5 * a + 0.5 * a.mT


def backward_error(root: torch.Tensor, regularized: torch.Tensor, p: int) -> float:
    """‖X^(-p) - B‖_F / ‖B‖_F via X = V diag(μ) Vᵀ (inf if X is not positive definite)."""
    if not bool(torch.isfinite(root).all()):
        return math.inf
    mu, v = torch.linalg.eigh(root)
    if not mu[0] > 0:
        return math.inf
    power = (v * mu.pow(-float(p))) @ v.mT
    return float(
        torch.linalg.matrix_norm(power - regularized) / torch.linalg.matrix_norm(regularized)
    )


def timings(tasks: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times in seconds of each task, run interleaved after one warm-up round."""
    for task in tasks.values():
        task()
    samples: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            start = time.perf_counter()
            task()
            samples[name].append(time.perf_counter() - start)
    return samples


def run_case(n: int, condition: float, p: int, repeats: int) -> dict[str, Any]:
    """Time and accuracy of every applicable method on one matrix."""
    a = test_matrix(n, condition, seed=n)
    regularized = a.clone()
    regularized.diagonal().add_(EPSILON)
    methods = ["eigh", "newton"] + (["cholesky"] if p == 1 else [])
    tasks: dict[str, Callable[[], object]] = {"raw": lambda: torch.linalg.eigh(a)}
    for method in methods:
        tasks[method] = functools.partial(inverse_root, a, p, EPSILON, method)
    samples = timings(tasks, repeats)
    times = {name: statistics.median(values) for name, values in samples.items()}
    fastest = {name: min(values) for name, values in samples.items()}
    row: dict[str, Any] = {
        "n": n,
        "condition": condition,
        "exponent": p,
        "floor": UNIT_ROUNDOFF * (1 + p * condition ** (1.0 / p)),
        "raw_eigh_s": times["raw"],
    }
    for method in methods:
        result = inverse_root(a, p, EPSILON, method)
        row[f"{method}_s"] = times[method]
        row[f"{method}_ratio"] = times[method] / times["raw"]
        row[f"{method}_min_ratio"] = fastest[method] / fastest["raw"]
        row[f"{method}_ok"] = result.ok
        row[f"{method}_method"] = result.method
        row[f"{method}_reported_error"] = result.error
        row[f"{method}_backward_error"] = backward_error(result.root, regularized, p)
    return row


def format_row(row: dict[str, Any]) -> str:
    """One plain-text table line."""

    def method_columns(method: str) -> str:
        if f"{method}_s" not in row:
            return f"{'-':>9} {'-':>6} {'-':>8}"
        flag = "" if row[f"{method}_ok"] else "!"
        return (
            f"{row[f'{method}_s'] * 1e3:9.1f} {row[f'{method}_ratio']:6.2f} "
            f"{row[f'{method}_backward_error']:7.1e}{flag or ' '}"
        )

    return (
        f"{row['n']:5d} {row['condition']:6.0e} {row['exponent']:2d} {row['floor']:7.1e} "
        f"{row['raw_eigh_s'] * 1e3:9.1f} | {method_columns('eigh')} | "
        f"{method_columns('newton')} | {method_columns('cholesky')}"
    )


HEADER = (
    f"{'n':>5} {'cond':>6} {'p':>2} {'floor':>7} {'raw_ms':>9} | "
    f"{'eigh_ms':>9} {'/raw':>6} {'err':>8} | {'newton_ms':>9} {'/raw':>6} {'err':>8} | "
    f"{'chol_ms':>9} {'/raw':>6} {'err':>8}"
)


def environment() -> dict[str, Any]:
    """Versions, threads, load and platform of this run."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes up to {QUICK_MAX_SIZE}")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) before timing")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--exponents", default="1,4", help="comma-separated p (default 1,4)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 5, 3 for n >= 512)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [n for n in SIZES if not args.quick or n <= QUICK_MAX_SIZE]
    exponents = [int(p) for p in args.exponents.split(",")]

    env = environment()
    print(f"torch {env['torch']} | threads {env['threads']} | python {env['python']}")
    print(f"platform {env['platform']} ({env['processor']})")
    print("loadavg at start " + " ".join(f"{x:.2f}" for x in env["loadavg"]))
    print(f"epsilon {EPSILON:g}; times are medians in ms; /raw = time / raw float64 eigh time;")
    print("err = ‖X^-p - B‖_F/‖B‖_F; '!' marks ok=False; floor = u(1 + p cond^(1/p))")
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    for n in sizes:
        repeats = args.repeats or (5 if n < 512 else 3)
        for condition in CONDITIONS:
            for p in exponents:
                row = run_case(n, condition, p, repeats)
                rows.append(row)
                print(format_row(row), flush=True)
    for kind in ("ratio", "min_ratio"):
        ratios = [row[f"eigh_{kind}"] for row in rows]
        print(
            f"eigh/raw from {'medians' if kind == 'ratio' else 'fastest runs'}: "
            f"median {statistics.median(ratios):.2f}, max {max(ratios):.2f} (target <= 1.2)"
        )
    print("loadavg at end " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
