"""The root schedule: the graft until a block's roots exist, first roots that are never stale, and
"auto" staleness (fitted, saved, restored, reported, grown after stalls). A pool that cannot
hang or oversubscribe: test_root_pool.py; host buffers and state after close:
test_root_host_buffers.py."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from models import (
    assert_bitwise_equal,
    make_batches,
    mixed_model,
    per_matrix,
    saved_and_loaded,
    train,
)
from root_schedule_helpers import BASE, _never, params_after

import torch_shampoo.roots.pool as root_pool
import torch_shampoo.roots.scheduler as scheduler
from torch_shampoo import Shampoo
from torch_shampoo.roots.matrix_roots import RootResult, inverse_root

# ------------------------------------------------------------- the graft until roots exist


@pytest.mark.parametrize("async_roots", [False, True])
def test_with_roots_that_never_arrive_shampoo_is_its_graft(
    async_roots: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before its roots exist a block takes exactly the graft's direction: bitwise what Shampoo
    does before start_preconditioning_step, and Adam's step (torch.optim.Adam) to rounding."""
    kwargs: dict[str, Any] = dict(BASE, precondition_frequency=2, async_roots=async_roots)
    batches = make_batches(12)
    graft_only = mixed_model()
    with Shampoo(graft_only.parameters(), **kwargs, start_preconditioning_step=10**6) as opt:
        train(graft_only, opt, batches)
    adam = mixed_model()
    train(adam, torch.optim.Adam(adam.parameters(), lr=0.01, betas=(0.9, 0.999)), batches)

    monkeypatch.setattr(root_pool, "inverse_roots", per_matrix(_never))
    never = mixed_model()
    with (
        warnings.catch_warnings(),
        Shampoo(never.parameters(), **kwargs, max_root_failures=10**6) as opt,
    ):
        warnings.simplefilter("ignore", RuntimeWarning)
        train(never, opt, batches)
        assert opt.root_stats()["root_failures"] > 0
        assert not any(bool(s["has_root"].any()) for s in opt.state.values())
    assert_bitwise_equal(params_after(never), params_after(graft_only))
    for ours, theirs in zip(never.parameters(), adam.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_block_without_its_roots_takes_the_graft_while_the_others_are_preconditioned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(20, 8) at block 16: blocks (16, 8) and (4, 8). Roots of size 4 fail, so block 1 lacks
    one root: its steps equal the graft-only run's, block 0's do not. Gradients are fixed in
    advance, so both runs see the same ones."""
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(20, 8, generator=gen) for _ in range(8)]

    def run(**kwargs: Any) -> list[torch.Tensor]:
        param = torch.nn.Parameter(torch.zeros(20, 8))
        steps = []
        with Shampoo([param], **BASE, precondition_frequency=2, **kwargs) as opt:
            for g in grads:
                before = param.detach().clone()
                param.grad = g
                opt.step()
                steps.append(param.detach() - before)
        return steps

    graft = run(start_preconditioning_step=10**6)

    def fail_size_4(matrix: torch.Tensor, *args: Any, **kwargs: Any) -> RootResult:
        return _never(matrix) if matrix.shape[0] == 4 else inverse_root(matrix, *args, **kwargs)

    monkeypatch.setattr(root_pool, "inverse_roots", per_matrix(fail_size_4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mixed = run(max_root_failures=10**6)
    for t, (ours, graft_step) in enumerate(zip(mixed, graft), start=1):
        assert torch.equal(ours[16:], graft_step[16:]), t
        assert torch.equal(ours[:16], graft_step[:16]) == (t < 2), t  # roots from step 2 on


# ------------------------------------------------------------------ first roots, staleness


def test_first_roots_are_installed_at_start_in_async_mode() -> None:
    """Preconditioning starts at ``start`` in both modes: up to the second root cycle an async
    run (default staleness) equals the synchronous run bitwise."""
    batches = make_batches(9)
    runs = {}
    for async_roots in (False, True):
        model = mixed_model()
        with Shampoo(
            model.parameters(), **BASE, precondition_frequency=5, async_roots=async_roots
        ) as opt:
            train(model, opt, batches[:5])
            stats = opt.root_stats()
            factors = sum(len(s["factors"]) for s in opt.state.values())
            assert stats["roots_computed"] == factors and stats["stalls"] == 0
            assert all(bool(s["has_root"].all()) for s in opt.state.values())
            assert (stats["first_root_seconds"] > 0) == async_roots
            train(model, opt, batches[5:])  # steps 6-9: no root step
        runs[async_roots] = params_after(model)
    assert_bitwise_equal(runs[True], runs[False])


class _Clock:
    """A fake ``perf_counter`` for ``StalenessFit``: each call is the next ``step()``'s start,
    ``durations`` apart (a step's duration read at the next one's tick)."""

    def __init__(self, durations: list[float]) -> None:
        self.times = list(itertools.accumulate([0.0, *durations]))
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.times[self.calls - 1]


def _ticked(durations: list[float], rooted_from: int) -> scheduler.StalenessFit:
    """A fit whose steps 1, 2, … last ``durations``; roots installed in step ``rooted_from``
    (0: before)."""
    fit = scheduler.StalenessFit(clock=_Clock(durations))
    fit.rooted = rooted_from <= 0
    for step in range(1, len(durations) + 2):
        fit.tick()
        fit.rooted = fit.rooted or step == rooted_from
    return fit


def test_the_fit_is_the_smallest_staleness_whose_steps_hold_the_work_with_the_margin() -> None:
    fit = scheduler.StalenessFit(clock=_Clock([]))
    assert fit.steps_for(1.0) is None  # no step interval measured yet
    fit = _ticked([0.1, 0.1, 0.1, 0.15], rooted_from=0)  # median interval 0.1 s
    assert fit.step_seconds() == pytest.approx(0.1)
    assert fit.steps_for(0.01) == 1
    assert fit.steps_for(0.25) == math.ceil(fit.MARGIN * 0.25 / 0.1)
    assert fit.steps_for(0.14) == 3  # 2 x 0.14 s = 2.8 steps of 0.1 s


def test_the_step_time_is_that_of_preconditioned_steps_not_graft_only_or_the_first_cycle() -> None:
    """Steps 1-9 take the graft (1/64 s), step 10 waits for the first roots (0.5 s), later
    steps precondition (0.125 s): the fit reads 0.125 s, where every step's median read 1/64."""
    durations = [1 / 64] * 9 + [0.5] + [0.125] * 4
    fit = _ticked(durations, rooted_from=10)
    assert fit.step_seconds() == 0.125
    assert fit.steps_for(0.25) == 4
    graft_only = _ticked(durations[:10], rooted_from=10)  # at the first cycle: nothing to fit
    assert graft_only.steps_for(0.25) is None
    assert graft_only.step_seconds() == 1 / 64  # (what plan() reads meanwhile)


def test_auto_staleness_is_fitted_from_preconditioned_steps_in_a_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """start 10, frequency 10, the first cycle measured at 0.25 s: fitted at the first later
    cycle (step 20) to 2 x 0.25 / 0.125 = 4, not to the frequency the graft-only steps' 1/64 s
    would give (fitted at step 10 before). (Binary fractions: no rounding in the fit.)"""
    real = scheduler.RootScheduler.waited_first_cycle
    monkeypatch.setattr(scheduler.RootScheduler, "waited_first_cycle",
                        lambda self, seconds: real(self, 0.25))  # fmt: skip
    monkeypatch.setattr(scheduler.RootScheduler, "_grow", lambda self, *args: None)
    model = mixed_model()
    seen = []
    kwargs = dict(BASE, precondition_frequency=10, start_preconditioning_step=10)
    with Shampoo(model.parameters(), **kwargs) as opt:
        durations = [1 / 64] * 9 + [0.5] + [0.125] * 20
        opt._roots.fit = scheduler.StalenessFit(clock=_Clock(durations))
        for batch in make_batches(22):
            train(model, opt, [batch])
            seen.append(opt.root_stats()["root_staleness"])
        assert opt.param_groups[0][scheduler.FITTED] == 4
    assert seen[:19] == [None] * 19 and seen[19:] == [4] * 3


def test_auto_staleness_is_fitted_again_when_root_work_or_step_time_changes_over_2x(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fitted once (logged), re-fitted (logged with the new integer) when the cycle or the step
    changed by more than 2x since the fit, not for a smaller change; slower roots never take it
    below a value stalls had grown it to."""
    roots = scheduler.RootScheduler(async_roots=True, workers=1)
    roots.fit = fit = _ticked([0.125] * 6, rooted_from=0)  # (binary fractions: exact)
    group: dict[str, Any] = {}
    fit.cycle_seconds = 0.25
    with caplog.at_level(logging.INFO, logger="torch_shampoo"):
        assert roots.staleness(group, None, 100) == 4  # 2 x 0.25 / 0.125
        fit.cycle_ended(1.0, 1.0 + 0.4375)  # 1.75x: kept
        assert roots.staleness(group, None, 100) == 4
        fit.cycle_ended(2.0, 2.0 + 0.3125)  # a cycle ends when its last root does
        fit.cycle_ended(2.0, 2.0 + 0.625)  # 2.5x
        assert roots.staleness(group, None, 100) == 10
        assert roots.staleness(group, None, 100) == 10  # (measured against the new fit)
        group[scheduler.FITTED] = 30  # grown after stalls
        fit.cycle_ended(3.0, 3.0 + 1.5625)  # 2.5x slower: 25 steps, but never below 30
        assert roots.staleness(group, None, 100) == 30
        fit.cycle_ended(4.0, 4.0 + 1.25)  # 1.25x faster: kept
        assert roots.staleness(group, None, 100) == 30
        fit.cycle_ended(5.0, 5.0 + 0.390625)  # 4x faster than the fit: refit, and may shrink
        assert roots.staleness(group, None, 100) == 7  # ceil(6.25)
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in messages] == [
        "root_staleness='auto' fitted to 4 steps",
        "root_staleness='auto' re-fitted to 10 steps",
        "root_staleness='auto' re-fitted to 7 steps",
    ]  # (the refit to 30, the value it had, is not logged again)
    assert "root_staleness=7 reproduces" in messages[-1]
    # a step time 2.5x longer: the same roots need fewer steps
    for _ in range(64):
        fit._preconditioned.append(0.3125)
    assert roots.staleness(group, None, 100) == 3  # ceil(2.5)


@pytest.fixture
def fitted_three(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever the timings, the fit asks for 3 steps and never grows (so runs are reproducible;
    growth after stalls has its own test)."""
    monkeypatch.setattr(scheduler.StalenessFit, "steps_for", lambda self, seconds: 3)
    monkeypatch.setattr(scheduler.RootScheduler, "_grow", lambda self, *args: None)
    yield


@pytest.mark.usefixtures("fitted_three")
def test_auto_staleness_is_fitted_saved_restored_and_reported() -> None:
    kwargs: dict[str, Any] = dict(BASE, precondition_frequency=5, momentum=0.5)
    batches = make_batches(24)
    whole = mixed_model()
    with Shampoo(whole.parameters(), **kwargs) as opt:
        assert opt.param_groups[0]["root_staleness"] == "auto"
        train(whole, opt, batches[:5])
        assert opt.root_stats()["root_staleness"] == 3  # fitted after the first cycle
        train(whole, opt, batches[5:10])
        in_flight = opt.state_dict()
        assert int(in_flight["state"][0]["pending_due"]) == 13
        assert in_flight["param_groups"][0][scheduler.FITTED] == 3
        train(whole, opt, batches[10:])
        assert opt.root_stats()["max_staleness"] == 3

    model = mixed_model()
    opt = Shampoo(model.parameters(), **kwargs)
    train(model, opt, batches[:11])
    checkpoint = saved_and_loaded(model, opt)
    opt.close()
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    with Shampoo(resumed_model.parameters(), **kwargs) as resumed:
        resumed.load_state_dict(checkpoint["opt"])
        assert resumed.root_stats()["root_staleness"] == 3  # before any step
        train(resumed_model, resumed, batches[11:])
    assert_bitwise_equal(params_after(resumed_model), params_after(whole))


@pytest.mark.usefixtures("fitted_three")
def test_the_fitted_staleness_is_logged_once_with_the_integer_that_reproduces_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batches = make_batches(12)
    model = mixed_model()
    info = caplog.at_level(logging.INFO, logger="torch_shampoo")
    with info, Shampoo(model.parameters(), **BASE, precondition_frequency=5) as opt:
        train(model, opt, batches)
        assert opt.root_stats()["root_staleness"] == 3
    fitted = [r.getMessage() for r in caplog.records if "fitted" in r.getMessage()]
    assert len(fitted) == 1, fitted  # once, not at every later cycle
    assert "fitted to 3 steps" in fitted[0] and "root_staleness=3 reproduces" in fitted[0]


@pytest.mark.usefixtures("fitted_three")
def test_auto_staleness_takes_the_frequency_under_deterministic_algorithms() -> None:
    """Under ``torch.use_deterministic_algorithms(True)`` "auto" fits nothing (the timings
    differ from run to run): it takes the frequency, as an explicit integer would, bitwise."""
    kwargs: dict[str, Any] = dict(BASE, precondition_frequency=5)
    batches = make_batches(16)
    explicit = mixed_model()
    with Shampoo(explicit.parameters(), **kwargs, root_staleness=5) as opt:
        train(explicit, opt, batches)
    model = mixed_model()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with Shampoo(model.parameters(), **kwargs) as opt:
            train(model, opt, batches)
            assert opt.root_stats()["root_staleness"] == 5  # 3 when fitted (the fixture)
    finally:
        torch.use_deterministic_algorithms(was)
    assert_bitwise_equal(params_after(model), params_after(explicit))


def test_auto_staleness_is_zero_for_synchronous_roots_and_an_integer_is_kept() -> None:
    model = mixed_model()
    with Shampoo(model.parameters(), **BASE, precondition_frequency=2, async_roots=False) as s:
        train(model, s, make_batches(5))
        assert s.root_stats()["root_staleness"] == 0 and s.root_stats()["max_staleness"] == 0
    with Shampoo(model.parameters(), **BASE, precondition_frequency=2, root_staleness=1) as a:
        train(model, a, make_batches(5))
        assert a.root_stats()["root_staleness"] == 1
        assert scheduler.FITTED not in a.param_groups[0]
    with pytest.raises(ValueError, match="root_staleness"):
        Shampoo(model.parameters(), root_staleness=-1)
    with pytest.raises(TypeError, match="root_staleness"):
        Shampoo(model.parameters(), root_staleness="sometimes")


def test_auto_staleness_grows_after_a_stall_and_never_beyond_the_frequency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Roots that take longer than the fitted window stall the step; the auto value grows (by
    at least one step per stalled install step), never shrinks, and stops at the frequency,
    where further stalls bring one warning that says what to change."""
    monkeypatch.setattr(scheduler.StalenessFit, "steps_for", lambda self, seconds: 1)
    # No re-fits on a drift of the step time (a loaded machine's): the patched fit would put the
    # staleness back to 1 there (re-fits: test_auto_staleness_is_fitted_again_when_...).
    monkeypatch.setattr(scheduler.StalenessFit, "drift", lambda self, key: None)
    slow = threading.Event()

    def slow_root(*args: Any, **kwargs: Any) -> RootResult:
        if slow.is_set():
            threading.Event().wait(0.2)
        return inverse_root(*args, **kwargs)

    monkeypatch.setattr(root_pool, "inverse_roots", per_matrix(slow_root))
    param = torch.nn.Parameter(torch.randn(6, 6))
    seen = []
    with (
        Shampoo([param], precondition_frequency=4, root_workers=1) as opt,
        pytest.warns(RuntimeWarning, match="precondition_frequency=4 training steps") as caught,
    ):
        for t in range(1, 42):  # capped stalls at 24, 28, 32, 36, 40: the warning at the third
            if t == 5:
                slow.set()
            param.grad = torch.randn(6, 6)
            opt.step()
            seen.append(opt.root_stats()["root_staleness"])
        stats = opt.root_stats()
    assert len(caught) == 1 and caught[0].filename == __file__
    assert seen[3] == 1  # fitted at the first cycle (step 4)
    assert stats["stalls"] >= 1 and stats["staleness_increases"] >= 1
    assert all(b >= a for a, b in itertools.pairwise(seen[3:]))  # never shrinks
    assert seen[-1] == 4  # grown up to the frequency, not beyond
