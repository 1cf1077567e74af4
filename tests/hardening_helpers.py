"""What the hardening tests (test_hardening*.py) share: the front ends with small blocks and
frequent roots, state clones and comparisons, the blockwise state keys."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torch_shampoo import NGPlus, Shampoo

NAN = float("nan")
INF = float("inf")
MODES = pytest.mark.parametrize("async_roots", [False, True], ids=["sync", "async"])
FRONTS = pytest.mark.parametrize("front", ["shampoo", "ngplus"])


# ----------------------------------------------------------------------------------- helpers


def make_optimizer(front: str, params: Any, **kwargs: Any) -> Shampoo | NGPlus:
    """A front end with small blocks and frequent roots, so the preconditioner is used early."""
    if kwargs.get("async_roots", True) and "root_staleness" not in kwargs:
        kwargs["root_staleness"] = 1  # not "auto", whose fitted value depends on timing
    if front == "shampoo":
        base: dict[str, Any] = dict(
            lr=0.02, block_size=16, precondition_frequency=2, momentum=0.5, root_workers=1
        )
        return Shampoo(params, **{**base, **kwargs})
    base = dict(
        lr=0.02, damping=0.1, block_size=16, inverse_frequency=2, momentum=0.5, root_workers=1
    )
    return NGPlus(params, **{**base, **kwargs})


def clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: [t.clone() for t in v] if isinstance(v, list) else v.clone()
        for k, v in state.items()
        if isinstance(v, (torch.Tensor, list))
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for key in a:
        xs, ys = (a[key], b[key]) if isinstance(a[key], list) else ([a[key]], [b[key]])
        assert len(xs) == len(ys), key
        for x, y in zip(xs, ys):
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x, y), key


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)

BLOCKWISE = ("exp_avg", "graft_v", "momentum_buffer")
