"""What the conventions tests (test_conventions*.py) share: fast settings, a fixed staleness, a
quadratic to descend, snapshots and a recursive bitwise comparison."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

FAST: dict[str, Any] = dict(block_size=16, precondition_frequency=2, root_workers=1)
MODES = pytest.mark.parametrize("async_roots", [False, True], ids=["sync", "async"])

NAN = float("nan")
INF = float("inf")


def fixed(async_roots: bool) -> dict[str, Any]:
    """``async_roots`` with a fixed staleness: "auto" fits itself to this machine's timings
    (and grows after a stall), so two runs compared with each other, or a run and its clone,
    could install their roots at different steps on a slower or busier machine."""
    return dict(async_roots=async_roots, root_staleness=1 if async_roots else 0)


# ----------------------------------------------------------------------------------- helpers


class Quadratic:
    """f(W) = ½·mean((X W − Y)²): convex in W, with W of shape (6, 20) cut into two blocks."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 6, generator=gen).to(dtype)
        self.y = self.x @ torch.randn(6, 20, generator=gen).to(dtype)
        self.gen = gen
        self.dtype = dtype

    def param(self, transposed: bool = False) -> torch.Tensor:
        """A fresh leaf W; ``transposed`` gives a non-contiguous (transposed view) leaf."""
        if transposed:
            return torch.randn(20, 6, generator=self.gen).to(self.dtype).t().requires_grad_()
        return torch.randn(6, 20, generator=self.gen).to(self.dtype).requires_grad_()

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.x @ w - self.y) ** 2).mean()


def descend(
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
) -> list[float]:
    """``steps`` optimizer steps on ``loss_fn``; returns the loss before each step."""
    losses = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(params: Iterator[torch.Tensor] | list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def assert_same_structure(a: Any, b: Any, where: str = "") -> None:
    """Recursively equal: tensors bitwise (same dtype), everything else with ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_structure(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_structure(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
