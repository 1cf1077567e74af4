"""Staggered roots (``stagger_roots``): each parameter's later root steps at its own phase of the
frequency, the phases spreading the root work evenly; the rule is otherwise unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import assert_bitwise_equal, make_batches, mixed_model, train
from reference_shampoo import ReferenceShampoo
from test_async_roots import _save_and_resume
from test_reference import MODEL_SHAPES, assert_same_steps, make_grads, make_params

from torch_shampoo import SOAP, Shampoo
from torch_shampoo.ledger import layout
from torch_shampoo.roots import phases

BASE: dict[str, Any] = dict(lr=0.01, block_size=16, betas=(0.9, 0.99), momentum=0.5)
"""(test_async_roots' own, whose ``_save_and_resume`` continues these runs, but the schedule.)"""


def phases_of(opt: Any, params: list[torch.Tensor]) -> list[int]:
    """The root phase each parameter has in the optimizer (planned at its first step)."""
    return [opt._cycles._phase(p, opt._config(opt._group_of(p))) for p in params]


@given(
    st.lists(st.integers(0, 10**6), min_size=0, max_size=40),
    st.integers(1, 25),
)
def test_phases_spread_the_work_within_one_largest_cost_of_the_mean(
    costs: list[int], frequency: int
) -> None:
    found = phases.balance([float(c) for c in costs], frequency)
    assert len(found) == len(costs) and all(0 <= x < frequency for x in found)
    load = [0.0] * frequency
    for cost, phase in zip(costs, found):
        load[phase] += cost
    largest = max(costs, default=0)
    assert max(load) <= sum(costs) / frequency + largest
    assert found == phases.balance([float(c) for c in costs], frequency)  # deterministic
    given_loads = phases.loads([float(c) for c in costs], frequency)
    assert given_loads == load[: len(given_loads)] and not any(load[len(given_loads) :])


def test_a_huge_frequency_takes_no_memory_per_phase() -> None:
    """(A "no roots" run sets the frequency to 10⁹: phases beyond the items are never made.)"""
    assert phases.balance([3.0, 1.0, 2.0], 10**9) == [0, 2, 1]
    assert phases.loads([3.0, 1.0, 2.0], 10**9) == [3.0, 2.0, 1.0]


@given(st.integers(1, 200), st.integers(1, 30), st.data())
def test_the_next_root_step_is_the_first_later_step_of_the_phase(
    t: int, frequency: int, data: st.DataObject
) -> None:
    phase = data.draw(st.integers(0, frequency - 1))
    start = data.draw(st.integers(1, t))
    expected = next(u for u in range(t + 1, t + frequency + 2) if (u - phase) % frequency == 0)
    assert phases.next_root_step(t, frequency, phase) == expected
    assert phases.is_root_step(expected, start, frequency, phase)
    assert phases.cycle_of(expected, frequency, phase) == phases.cycle_of(t, frequency, phase) + 1
    assert phases.is_root_step(t, start, frequency, 0) == (
        t == start or (t > start and t % frequency == 0)
    )


def test_auto_staggers_async_roots_in_one_process_only() -> None:
    """(Several processes take the frequency as "auto" staleness: staggering gains nothing.)"""
    for setting, async_roots, processes, expected in [
        (None, True, 1, True), (None, True, 2, False), (None, False, 1, False),
        (True, False, 4, True), (False, True, 1, False),
    ]:  # fmt: skip
        assert phases.staggered(setting, async_roots, processes) == expected


@pytest.mark.parametrize(
    ("stagger", "async_roots", "staggered"),
    [(False, True, False), ("auto", False, False), ("auto", True, True), (True, False, True)],
)
def test_auto_staggers_async_roots_only(stagger: Any, async_roots: bool, staggered: bool) -> None:
    model = mixed_model()
    with Shampoo(model.parameters(), **BASE, stagger_roots=stagger,
                 async_roots=async_roots) as opt:  # fmt: skip
        train(model, opt, make_batches(2))
        found = phases_of(opt, list(model.parameters()))
    assert (set(found) != {0}) == staggered, found


@pytest.mark.parametrize("async_roots", [False, True])
def test_each_parameter_recomputes_its_roots_exactly_at_its_phase(async_roots: bool) -> None:
    frequency, start = 4, 4
    model = mixed_model()
    params = list(model.parameters())
    opt = Shampoo(params, **BASE, precondition_frequency=frequency, stagger_roots=True,
                  async_roots=async_roots, root_staleness=0)  # fmt: skip
    changed: list[list[int]] = [[] for _ in params]
    before = None
    for t, batch in enumerate(make_batches(14), start=1):
        train(model, opt, [batch])
        now = [torch.cat([r.flatten() for r in opt.state[p]["roots"]]) for p in params]
        if before is not None:
            for i, (a, b) in enumerate(zip(now, before)):
                if not torch.equal(a, b):
                    changed[i].append(t)
        before = [x.clone() for x in now]
    found = phases_of(opt, params)
    assert len(set(found)) > 1, found  # (the model's parameters spread over several phases)
    for i, phase in enumerate(found):
        expected = [t for t in range(2, 15) if phases.is_root_step(t, start, frequency, phase)]
        assert changed[i] == expected, (i, phase)
    opt.close()


def test_staggered_shampoo_follows_the_reference_with_the_same_phases() -> None:
    kwargs = dict(precondition_frequency=3, start_preconditioning_step=2, block_size=8)
    initial = make_params()
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    reference_params = [p.clone() for p in initial]
    optimizer = Shampoo(params, async_roots=False, stagger_roots=True, **kwargs)
    reference = ReferenceShampoo(reference_params, **kwargs)
    for step, grads in enumerate(make_grads(12), start=1):
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
        if step == 1:  # (planned at the first step, before any root step)
            reference.phases = phases_of(optimizer, params)
            assert len(set(reference.phases)) > 1
        reference.step(grads)
        for name, param, expected, start in zip(
            MODEL_SHAPES, params, reference_params, initial, strict=True
        ):
            assert_same_steps(param.detach(), expected, start, f"step {step}, {name}")


def test_staggering_changes_the_trajectory() -> None:
    """The reference test above is not vacuous: the phases change the result."""
    common = dict(BASE, precondition_frequency=4, async_roots=False)
    runs = []
    for stagger in (False, True):
        model = mixed_model()
        train(model, Shampoo(model.parameters(), **common, stagger_roots=stagger), make_batches(12))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(*runs))


def _run(cls: type, steps: int, **kwargs: Any) -> list[torch.Tensor]:
    model = mixed_model()
    with cls(model.parameters(), **{**BASE, **kwargs}) as opt:
        train(model, opt, make_batches(steps))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("cls", "extra"),
    [(Shampoo, {}), (Shampoo, {"eigh_every": 2}), (SOAP, {})],
    ids=["shampoo", "shampoo-warm", "soap"],
)
def test_staggered_async_roots_equal_sync_roots_delayed_by_the_same_staleness(
    cls: type, extra: dict[str, Any]
) -> None:
    common = dict(precondition_frequency=5, root_staleness=2, stagger_roots=True, **extra)
    assert_bitwise_equal(_run(cls, 30, async_roots=True, **common),
                         _run(cls, 30, async_roots=False, **common))  # fmt: skip


@pytest.mark.parametrize("async_roots", [True, False])
def test_save_mid_flight_then_resume_staggered_is_bitwise_identical(async_roots: bool) -> None:
    kwargs = dict(precondition_frequency=5, root_staleness=3, stagger_roots=True,
                  async_roots=async_roots)  # fmt: skip
    uninterrupted = _run(Shampoo, 23, **kwargs)
    out: dict[str, Any] = {}
    _save_and_resume(out, 23, split=13, **kwargs)  # (roots of several phases in flight)
    assert_bitwise_equal(out["resumed"], uninterrupted)


def test_staggered_roots_hold_fewer_host_buffers_at_once() -> None:
    """Each step snapshots only the factors of one phase, so at most a couple of phases' host
    buffers are held at once (from a snapshot to its install), not every factor's."""
    most = {}
    for stagger in (False, True):
        model = mixed_model()
        with Shampoo(model.parameters(), **BASE, precondition_frequency=4, root_staleness=1,
                     stagger_roots=stagger) as opt:  # fmt: skip
            held = []
            for batch in make_batches(14):
                train(model, opt, [batch])
                held.append(opt.root_stats()["host_buffer_bytes"])
            most[stagger] = max(held)
    assert 0 < most[True] < most[False]


def test_the_plan_prices_the_busiest_staggered_step() -> None:
    """plan(): a staggered group's busiest root step holds its busiest phase's work (d³ per
    factor, from the shapes), a share of the cycle; unstaggered, the whole cycle."""
    model = mixed_model()
    params = list(model.parameters())
    cubes = []  # (the layouts are shapes only, tested in test_blocking.py)
    for p in params:
        grid = layout(tuple(p.shape), BASE["block_size"], 8192, True, True)
        cubes.append(float(sum(d**3 for b in range(grid.num_blocks) for d in grid.factor_dims(b))))
    for stagger, expected in ((False, 1.0), (True, None)):
        with Shampoo(params, **BASE, stagger_roots=stagger) as opt:
            plan = opt.plan(show=False)
            if expected is None:
                expected = max(phases.loads(cubes, 20)) / sum(cubes)
                assert expected < 1
            assert plan.busiest == pytest.approx(expected)


def test_turning_staggering_on_between_steps_takes_effect() -> None:
    model = mixed_model()
    params = list(model.parameters())
    with Shampoo(params, **BASE, stagger_roots=False, async_roots=False) as opt:
        train(model, opt, make_batches(2))
        assert set(phases_of(opt, params)) == {0}
        for group in opt.param_groups:
            group["stagger_roots"] = True
        train(model, opt, make_batches(1))
        assert len(set(phases_of(opt, params))) > 1
        for group in opt.param_groups:
            group["stagger_roots"] = "later"
        with pytest.raises(ValueError, match=r"stagger_roots: 'later'"):
            train(model, opt, make_batches(1))
