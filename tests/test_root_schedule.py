"""The root schedule: the graft until a block's roots exist, first roots that are never stale,
"auto" staleness (fitted, saved, restored, reported, grown after stalls), and a pool that
cannot hang, oversubscribe or write after close()."""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import (
    assert_bitwise_equal,
    make_batches,
    mixed_model,
    per_matrix,
    saved_and_loaded,
    train,
)

import torch_shampoo.roots.pool as root_pool
import torch_shampoo.roots.scheduler as scheduler
from torch_shampoo import NGPlus, Shampoo
from torch_shampoo.root_cycles import _as_index
from torch_shampoo.roots.matrix_roots import RootResult, inverse_root

BASE: dict[str, Any] = dict(lr=0.01, block_size=16, betas=(0.9, 0.99), stagger_roots=False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def params_after(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _never(matrix: torch.Tensor, *args: Any, **kwargs: Any) -> RootResult:
    return RootResult(torch.zeros_like(matrix), False, math.nan, "never arrives", "eigh")


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
        for t in range(1, 34):
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


# ---------------------------------------------------------------- a pool that cannot hang


def _run_script(body: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")
def test_a_forked_child_can_save_pickle_and_copy_before_its_first_step() -> None:
    """The parent's worker is in the middle of a root when the process forks; the child's
    state_dict(), pickling and deepcopy compute that root themselves instead of waiting for a
    thread that does not exist there (this hung)."""
    done = _run_script(
        """
        import copy, os, pickle, threading, torch
        import torch_shampoo.roots.pool as root_pool
        from torch_shampoo import Shampoo
        inner, started = root_pool.inverse_roots, threading.Event()
        def slow(*args, **kwargs):
            started.set()
            threading.Event().wait(0.5)
            return inner(*args, **kwargs)
        param = torch.nn.Parameter(torch.randn(8, 8))
        opt = Shampoo([param], precondition_frequency=2, root_staleness=2)
        for t in range(4):
            if t == 3:
                root_pool.inverse_roots = slow
            param.grad = torch.randn(8, 8)
            opt.step()  # step 4: a later cycle, its root in flight until step 6
        started.wait()
        pid = os.fork()
        if pid == 0:
            saved = opt.state_dict()["state"][0]
            pickle.dumps(opt)
            twin = copy.deepcopy(opt)
            twin.close()
            os._exit(0 if bool(saved["pending_ok"].all()) else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "child 0" in done.stdout


def test_exit_does_not_wait_for_the_workers_of_another_copy_of_the_package() -> None:
    """Two copies of the package in one process (as the benchmarks' A/B runs load them): the
    exit hook of one stops and waits for its own workers, not for the other's, which only the
    other's hook stops (waiting for them, by their thread name, hung at exit)."""
    done = _run_script(
        """
        import importlib.util, pathlib, shutil, sys, tempfile, torch
        import torch_shampoo
        where = pathlib.Path(tempfile.mkdtemp())
        shutil.copytree(pathlib.Path(torch_shampoo.__file__).parent, where / "other_copy")
        sys.path.insert(0, str(where))
        other = importlib.import_module("other_copy")  # its exit hook runs first
        kept = []  # both optimizers alive at exit, their workers waiting for work
        for package in (torch_shampoo, other):
            param = torch.nn.Parameter(torch.randn(6, 6))
            kept.append(package.Shampoo([param], precondition_frequency=2))
            for _ in range(3):
                param.grad = torch.randn(6, 6)
                kept[-1].step()
        shutil.rmtree(where)
        print("exiting", flush=True)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "exiting" in done.stdout


def test_state_dict_after_a_failing_damping_schedule_with_roots_in_flight() -> None:
    """A resumed NG+ (no host buffers yet) whose damping schedule fails at an inverse step:
    the failed roots are in flight when state_dict() runs (this raised KeyError)."""

    def damping(t: int) -> float:
        if t >= 4:
            raise ValueError("not any more")
        return 0.1

    kwargs: dict[str, Any] = dict(damping=damping, inverse_frequency=2, root_staleness=1)
    param = torch.nn.Parameter(torch.randn(6, 4))
    with NGPlus([param], **kwargs) as opt:
        for _ in range(3):  # inverses of steps 1 (at once) and 2 (installed at 3)
            param.grad = torch.randn(6, 4)
            opt.step()
        checkpoint = opt.state_dict()
    with NGPlus([param], **kwargs) as resumed:
        resumed.load_state_dict(checkpoint)
        param.grad = torch.randn(6, 4)
        resumed.step()  # step 4: the damping fails; its failed roots are due at step 5
        saved = resumed.state_dict()["state"][0]
        assert not bool(saved["pending_ok"].any()) and int(saved["pending_due"]) == 5
        with pytest.warns(RuntimeWarning, match="damping"):
            param.grad = torch.randn(6, 4)
            resumed.step()  # installs the failed roots: a warning, training goes on


def test_installing_roots_names_no_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names are built only for warnings and root_stats(): an install step with 1,000
    parameters spent 51 ms searching for them."""
    calls = []
    original = Shampoo._factor_name
    monkeypatch.setattr(
        Shampoo, "_factor_name", lambda self, p, j: calls.append(j) or original(self, p, j)
    )
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(50)]
    with Shampoo(params, precondition_frequency=2, root_staleness=1) as opt:
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(4, 3)
            opt.step()
        assert not calls  # nothing named while stepping
        assert opt.root_stats()["roots_computed"] > 0
        names = opt.root_stats()["last_error"]
    assert len(names) == 100 and "parameter 49 (shape (4, 3)) block 0 dim 1" in names


def test_a_worker_keeps_its_thread_count_when_another_thread_sets_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch gives a thread its intra-op count lazily, from the process-wide count that every
    ``torch.set_num_threads`` writes: a worker whose first op came after the training thread
    set a count would compute with the training thread's count (and other bits)."""
    real = torch.set_num_threads
    worker_set, main_set = threading.Event(), threading.Event()

    def set_then_wait(n: int) -> None:
        real(n)
        if threading.current_thread().name.startswith(root_pool._THREAD_NAME):
            worker_set.set()
            assert main_set.wait(10)

    seen: set[int] = set()

    def counting(*args: Any, **kwargs: Any) -> RootResult:
        seen.add(torch.get_num_threads())
        return inverse_root(*args, **kwargs)

    monkeypatch.setattr(torch, "set_num_threads", set_then_wait)
    monkeypatch.setattr(root_pool, "inverse_roots", per_matrix(counting))
    before = torch.get_num_threads()
    x = torch.eye(3).unsqueeze(0)
    job = root_pool.RootJob(x, x.clone(), None, None, 1.0, 4.0, 1e-12, "eigh")
    pool = root_pool.RootPool(1, 1)
    try:
        (ticket,) = pool.submit([job])
        assert worker_set.wait(10)
        real(3)  # the training thread, while the worker has not run an op yet
        main_set.set()
        assert ticket.outcome()[0].ok
    finally:
        real(before)
        pool.close()
    assert seen == {1}


def test_default_workers_take_at_most_half_of_the_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An 8-core machine at torch's default 8 threads: 4 workers of 1 thread (the training
    thread keeps the other 4), not 4 of 8 nor 4 of 2."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    seen: set[int] = set()
    earlier = set(threading.enumerate())  # (an earlier test's worker may still end a root)

    def counting(*args: Any, **kwargs: Any) -> RootResult:
        here = threading.current_thread()
        if here is threading.main_thread() or here not in earlier:
            seen.add(torch.get_num_threads())
        return inverse_root(*args, **kwargs)

    monkeypatch.setattr(root_pool, "inverse_roots", per_matrix(counting))
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        param = torch.nn.Parameter(torch.randn(6, 6))
        with Shampoo([param], precondition_frequency=1) as opt:
            for _ in range(3):
                param.grad = torch.randn(6, 6)
                opt.step()
            workers = opt._root_workers
    finally:
        torch.set_num_threads(threads)
    assert workers == 4 and seen == {1}


def test_a_thread_started_after_the_workers_begins_with_the_callers_thread_count() -> None:
    """torch gives a new thread the process-wide count, which a worker's own
    ``set_num_threads`` writes: after the pool starts, the caller's count is put back, so a
    thread the user starts later does not begin with the workers' (here 2 against 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    seen: list[int] = []
    try:
        param = torch.nn.Parameter(torch.randn(6, 6))
        with Shampoo([param], precondition_frequency=1, root_workers=1) as opt:
            for _ in range(3):
                param.grad = torch.randn(6, 6)
                opt.step()
            later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            later.start()
            later.join()
            assert opt._roots.pool.threads == 2  # (half of 4 for the one worker)
    finally:
        torch.set_num_threads(threads)
    assert seen == [4]


def test_close_returns_at_once_with_a_root_running_and_that_root_is_never_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close() cancels instead of joining; the worker finishing the cancelled root discards
    it; the next step computes it again, so the run continues exactly as without close()."""
    release, blocking, entered = threading.Event(), threading.Event(), threading.Event()

    def held(*args: Any, **kwargs: Any) -> RootResult:
        if blocking.is_set():
            entered.set()
            release.wait(30)
        return inverse_root(*args, **kwargs)

    monkeypatch.setattr(root_pool, "inverse_roots", per_matrix(held))
    kwargs: dict[str, Any] = dict(BASE, precondition_frequency=2, root_staleness=1, root_workers=1)
    batches = make_batches(8)
    plain = mixed_model()
    with Shampoo(plain.parameters(), **kwargs) as opt:
        train(plain, opt, batches)

    model = mixed_model()
    opt = Shampoo(model.parameters(), **kwargs)
    train(model, opt, batches[:3])
    blocking.set()
    train(model, opt, batches[3:4])  # step 4: a later cycle, due at step 5
    assert entered.wait(30)
    results = {p: [s.result.clone() for s in st] for p, st in opt._roots.staging.items()}
    closer = threading.Thread(target=opt.close)
    closer.start()
    closer.join(5)
    closed_promptly = not closer.is_alive()
    blocking.clear()
    release.set()
    assert closed_promptly
    worker = [t for t in threading.enumerate() if t.name.startswith("torch_shampoo-root")]
    for thread in worker:
        thread.join(30)
    for p, buffers in opt._roots.staging.items():  # bit patterns: NaN-safe
        assert all(
            torch.equal(s.result.view(torch.int32), r.view(torch.int32))
            for s, r in zip(buffers, results[p])
        )
    train(model, opt, batches[4:])
    opt.close()
    assert_bitwise_equal(params_after(model), params_after(plain))


def test_state_dict_after_close_computes_the_cancelled_roots_itself() -> None:
    batches = make_batches(10)
    kwargs: dict[str, Any] = dict(BASE, precondition_frequency=2, root_staleness=2)
    model = mixed_model()
    with Shampoo(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:4])
        expected = copy.deepcopy(opt.state_dict()["state"])
    model = mixed_model()
    opt = Shampoo(model.parameters(), **kwargs)
    train(model, opt, batches[:4])
    opt.close()
    saved = opt.state_dict()["state"]
    assert any(int(s["pending_due"]) >= 0 for s in saved.values())
    for i, s in saved.items():
        assert s["pending_roots"].keys() == expected[i]["pending_roots"].keys()
        for j, root in s["pending_roots"].items():
            assert torch.equal(root, expected[i]["pending_roots"][j])
    assert opt._roots.pool is None  # computed here, without restarting the workers


def test_host_buffers_exist_only_for_roots_that_run_off_the_step() -> None:
    """A CPU parameter's roots installed in the step that computes them (synchronous roots,
    first cycles) are computed in place; only roots that outlive their step get host buffers."""
    batches = make_batches(6)
    sync_model, async_model = mixed_model(), mixed_model()
    with (
        Shampoo(sync_model.parameters(), **BASE, precondition_frequency=2, async_roots=False) as s,
        Shampoo(async_model.parameters(), **BASE, precondition_frequency=2, root_staleness=1) as a,
    ):
        train(sync_model, s, batches[:3])
        train(async_model, a, batches[:3])
        assert s.root_stats()["roots_computed"] > 0 and not s._roots.staging
        assert a.root_stats()["roots_computed"] > 0 and not a._roots.staging  # first cycle
        train(sync_model, s, batches[3:])
        train(async_model, a, batches[3:])
        assert not s._roots.staging
        assert set(a._roots.staging) == set(a.state)  # later cycles run off the step


def test_host_buffers_are_held_only_from_a_snapshot_to_its_install() -> None:
    """Staleness 1 at frequency 4: only step 4's cycle is in flight after a step (two buffers
    per factor, the plan's staging); none before its snapshot nor once it is installed."""
    model = mixed_model()
    kwargs: dict[str, Any] = dict(
        BASE, precondition_frequency=4, start_preconditioning_step=1, root_staleness=1
    )
    with Shampoo(model.parameters(), **kwargs) as opt:
        planned = opt.plan(show=False).bytes["staging"]
        held = []
        for batch in make_batches(7):
            train(model, opt, [batch])
            held.append(opt.root_stats()["host_buffer_bytes"])
    factors = sum(f.nbytes for s in opt.state.values() for f in s["factors"])
    assert planned == 2 * factors > 0
    assert held == [0, 0, 0, planned, 0, 0, 0]


def test_a_cycle_installed_and_snapshotted_in_one_step_reuses_the_host_buffers() -> None:
    """Staleness 2 at frequency 2: step 4 installs step 2's roots and snapshots again; the new
    jobs' result buffers are those the installed ones gave back at the end of the step (their
    snapshots' were released once solved), bitwise the run where every step waits for roots."""
    batches = make_batches(8)
    kwargs: dict[str, Any] = dict(
        BASE, precondition_frequency=2, start_preconditioning_step=1, root_staleness=2
    )
    plain = mixed_model()
    with Shampoo(plain.parameters(), **kwargs, async_roots=False) as opt:
        train(plain, opt, batches)
    model = mixed_model()

    def buffers(opt: Shampoo) -> list[int]:
        found = [b for bs in opt._roots.staging.values() for b in bs]
        return sorted(b.result.data_ptr() for b in found)

    with Shampoo(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:2])  # step 2: a later cycle, due at step 4
        before = buffers(opt)
        train(model, opt, batches[2:4])
        assert len(before) > 0 and buffers(opt) == before
        assert opt.root_stats()["host_buffer_bytes"] == opt.plan(show=False).bytes["staging"]
        train(model, opt, batches[4:])
    assert_bitwise_equal(params_after(model), params_after(plain))


def test_a_step_that_fails_after_installing_roots_keeps_their_buffers_for_its_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Step 4 installs group 0's roots of step 2 (staleness 2: host buffers) and snapshots it
    again; then group 1's roots, due now, fail past max_root_failures=1: the step raises and
    puts the installed roots back. Their result buffers come back only once a step ends (not
    to the step's new snapshots): the retry is, bitwise, the run that never failed."""

    def run(fail: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(s)) for s in ((6, 5), (6, 5), (7, 3))]
        b = [torch.nn.Parameter(torch.randn(5, 4))]
        groups = [{"params": a, "root_staleness": 2},
                  {"params": b, "root_staleness": 0, "max_root_failures": 1}]  # fmt: skip
        with Shampoo(groups, lr=0.1, block_size=8, precondition_frequency=2,
                     start_preconditioning_step=1, async_roots=False) as opt:  # fmt: skip
            for t in range(1, 8):
                g = torch.Generator().manual_seed(t)
                for p in a + b:
                    p.grad = torch.randn(p.shape, generator=g)
                if fail and t == 4:
                    with monkeypatch.context() as patch:
                        patch.setattr(root_pool, "inverse_roots", per_matrix(_never))
                        with pytest.raises(RuntimeError, match="max_root_failures=1"):
                            opt.step()
                opt.step()
        return params_after(torch.nn.ParameterList(a + b))

    assert_bitwise_equal(run(True), run(False))


def test_root_stats_report_the_state_bytes() -> None:
    """A (8, 6) parameter at block 8 (one block, two factors): exp_avg and graft_v (48 floats
    each), factors and roots (8² + 6² floats each), step (a float32), root_failures (2 int64),
    has_root (2 bools), skipped_blocks (an int64) and the empty pending slots (schema,
    pending_due and pending_submitted: 3 int64; pending_ok: 2 bools)."""
    param = torch.nn.Parameter(torch.randn(8, 6))
    with Shampoo([param], block_size=8, precondition_frequency=1, async_roots=False) as opt:
        param.grad = torch.randn(8, 6)
        opt.step()
        stats = opt.root_stats()
    expected = 4 * (2 * 48 + 2 * (64 + 36)) + 4 + 2 * 8 + 2 + 8 + 3 * 8 + 2
    assert stats["state_bytes"] == expected
    assert stats["state_bytes_per_element"] == expected / 48
    assert stats["host_buffer_bytes"] == 0  # synchronous roots of a CPU parameter: in place


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12, unique=True))
def test_installed_factor_indices_address_the_same_flags_as_a_slice_or_a_list(
    indices: list[int],
) -> None:
    """An install writes a job's flags at once, through a slice where the factor indices are
    evenly spaced (a job of a many-block parameter: every k-th factor), else the list."""
    indices = sorted(indices)
    flags = torch.arange(41)
    assert flags[_as_index(indices)].tolist() == indices
