"""The engine's step as a unit: a step that raises changes nothing (a retry after fixing the
cause steps bitwise as a run that never failed), and a model of many shapes is checked and
planned once, however many shapes it has."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import torch_shampoo.ledger
import torch_shampoo.roots.pool
from torch_shampoo import SOAP, Shampoo


def _grads(params: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


def _tensors(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> list[Any]:
    """Every weight and every state tensor (with its key), in a fixed order."""
    out: list[Any] = [p.detach().clone() for p in params]
    for p in params:
        for key, value in sorted(opt.state[p].items()):
            values = value if isinstance(value, list) else [value]
            out += [(key, v.clone() if isinstance(v, torch.Tensor) else v) for v in values]
    return out


def _assert_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert x[0] == y[0]
            x, y = x[1], y[1]
        if isinstance(x, torch.Tensor):
            bits = (x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(*bits), x
        else:
            assert x == y


def _failing_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Roots (and eigenbases) of 3 x 3 factors fail (written non-finite, as a bad solve's
    would be); the others are fine."""
    for name in ("inverse_roots", "eigenbases"):
        original = getattr(torch_shampoo.roots.pool, name)

        def failing(
            matrices: torch.Tensor, *args: Any, original: Any = original, **kwargs: Any
        ) -> Any:
            found = original(matrices, *args, **kwargs)
            if matrices.shape[-1] != 3:
                return found
            for f in found:
                f.root.fill_(float("nan"))
            return [dataclasses.replace(f, ok=False, reason="forced") for f in found]

        monkeypatch.setattr(torch_shampoo.roots.pool, name, failing)


@pytest.mark.parametrize("async_roots", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("fail_at", [1, 4], ids=["first-cycle", "later-cycle"])
@pytest.mark.parametrize("front", ["shampoo", "soap"])
def test_a_step_whose_roots_fail_past_the_limit_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, async_roots: bool, fail_at: int, front: str
) -> None:
    """Roots that fail ``max_root_failures`` times raise before the step changes any state:
    catching the error, fixing its cause and stepping again gives, bitwise, the weights and
    state of a run that never failed (the step count, moments, factors and roots were
    advanced before the error, and a retry counted the step twice)."""

    def run(fail: bool) -> list[Any]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((5, 3), (6, 4), (4,))]
        kwargs: dict[str, Any] = dict(lr=0.1, async_roots=async_roots, root_staleness=0,
                                      stagger_roots=False)  # (every root at steps 2, 4, 6)
        if front == "shampoo":
            kwargs.update(precondition_frequency=2, start_preconditioning_step=1, momentum=0.5)
            kwargs.update(max_root_failures=1)
            opt: torch.optim.Optimizer = Shampoo(params, block_size=8, **kwargs)
        else:
            kwargs.update(precondition_frequency=2, eigh_every=1, max_root_failures=1)
            opt = SOAP(params, **kwargs)
        with opt:
            for t in range(1, 7):
                _grads(params, t)
                if fail and t == fail_at:
                    before = _tensors(opt, params)
                    with monkeypatch.context() as patch:
                        _failing_roots(patch)
                        with pytest.raises(RuntimeError, match="max_root_failures=1"):
                            opt.step()
                    _assert_same(_tensors(opt, params), before)  # nothing changed
                opt.step()  # (a retry, once the cause is gone)
            return _tensors(opt, params)

    _assert_same(run(True), run(False))


def test_many_shapes_are_checked_and_planned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,100 parameters of distinct shapes: after the first step, a step checks no state and
    plans no buckets again (a layout cache of 1,024 entries compared by identity made every
    step of such a model re-check and re-plan)."""
    params = [torch.nn.Parameter(torch.zeros(2, 1 + i)) for i in range(1100)]
    calls = {"check": 0, "plan": 0}
    check, plan = torch_shampoo.ledger.check_state, torch_shampoo.ledger.plan_buckets

    def counting_check(*args: Any, **kwargs: Any) -> Any:
        calls["check"] += 1
        return check(*args, **kwargs)

    def counting_plan(*args: Any, **kwargs: Any) -> Any:
        calls["plan"] += 1
        return plan(*args, **kwargs)

    monkeypatch.setattr(torch_shampoo.ledger, "check_state", counting_check)
    monkeypatch.setattr(torch_shampoo.ledger, "plan_buckets", counting_plan)
    with Shampoo(params, precondition_frequency=100, async_roots=False) as opt:
        for t in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            if t == 2:
                calls.update(check=0, plan=0)
            opt.step()
    assert calls == {"check": 0, "plan": 0}
