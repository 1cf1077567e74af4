"""What a root costs: flops by method (estimates from textbook counts) and the seconds of a
float64 ``eigh`` timed on this machine, once per process and size (:func:`eigh_seconds`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch

__all__ = ["EIGH_FLOPS", "NEWTON_ITERATIONS", "eigh_seconds", "root_flops"]

EIGH_FLOPS = 9
"""float64 ``eigh`` with eigenvectors: about 9d³ flops (symmetric QR with accumulated
transformations; Golub & Van Loan, Matrix Computations, 4th ed., §8.3). An eigh root adds the
product W Wᵀ (2d³); Cholesky's inverse costs about d³ (d³/3 to factor, 2d³/3 to invert)."""

NEWTON_ITERATIONS = 10
"""Coupled Newton's iterations, assumed (it stops at its tolerance: about 10 on well-scaled
factors), each a power T^p by squaring and two more products of 2d³ flops."""


def root_flops(d: int, method: str, exponent: float, eigenbasis: bool = False) -> float:
    """Flops of one root of a factor of size ``d`` by ``method`` (an estimate: see the constants);
    ``eigenbasis``: its eigenvectors alone (SOAP)."""
    cube = float(d) ** 3
    if eigenbasis:
        return EIGH_FLOPS * cube
    if method == "cholesky":
        return cube
    if method == "newton":
        p = max(1, round(exponent))
        products = p.bit_length() - 1 + bin(p).count("1") - 1 + 2
        return NEWTON_ITERATIONS * products * 2 * cube
    return (EIGH_FLOPS + 2) * cube


_MEASURED: dict[tuple[int, int], float] = {}
MEASURED_UP_TO = 1024
"""Larger factors are timed at this size and scaled by (d / size)³."""
BUDGET_SECONDS = 0.5
"""Once timings of a call took this long, its larger sizes are scaled from the largest timed."""


def eigh_seconds(sizes: Iterable[int], threads: int) -> dict[int, float]:
    """Seconds of one float64 ``eigh`` per size, timed on this thread at ``threads`` intra-op
    threads (a root worker's count) in a batch as the pool solves them; each timing is kept for
    the process. Sizes past :data:`MEASURED_UP_TO` or the budget are scaled by d³."""
    found: dict[int, float] = {}
    spent, largest = 0.0, None
    for d in sorted(set(sizes)):
        size = min(d, MEASURED_UP_TO)
        if (size, threads) not in _MEASURED and (spent < BUDGET_SECONDS or largest is None):
            began = time.perf_counter()
            _MEASURED[size, threads] = _time_eigh(size, threads)
            spent += time.perf_counter() - began
        if (size, threads) in _MEASURED:
            largest = size
        assert largest is not None
        found[d] = _MEASURED[largest, threads] * (d / largest) ** 3
    return found


def _time_eigh(d: int, threads: int) -> float:
    rows = max(1, min(64, 2**18 // d**2))
    generator = torch.Generator().manual_seed(d)  # (not the global generator: a run is unchanged)
    a = torch.randn(rows, d, d, dtype=torch.float64, generator=generator)
    a = a @ a.mT + d * torch.eye(d, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.linalg.eigh(a[:1])  # (a first call allocates)
        best, spent, runs = math.inf, 0.0, 0
        while runs < 3 and (runs == 0 or spent < 0.02):
            began = time.perf_counter()
            torch.linalg.eigh(a)
            took = time.perf_counter() - began
            best, spent, runs = min(best, took), spent + took, runs + 1
    finally:
        torch.set_num_threads(before)
    return best / rows
