"""The CPU root pool: async roots equal sync roots delayed by the same staleness, bitwise."""

from __future__ import annotations

import copy
import gc
import pickle
import re
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import pytest
import torch
from models import (
    assert_bitwise_equal,
    make_batches,
    mixed_model,
    per_matrix,
    root_threads,
    saved_and_loaded,
    settled,
    threads_settle_at,
    train,
)

import torch_shampoo.roots.pool as root_pool
import torch_shampoo.update.foreach
from torch_shampoo import Shampoo
from torch_shampoo.roots.matrix_roots import RootResult

BASE: dict[str, Any] = dict(lr=0.01, block_size=16, betas=(0.9, 0.99), momentum=0.5,
                            stagger_roots=False)  # (every root at every f-th step: test_stagger)


def run(steps: int, seed: int = 0, **kwargs: Any) -> list[torch.Tensor]:
    model = mixed_model(seed)
    with Shampoo(model.parameters(), **{**BASE, **kwargs}) as opt:
        train(model, opt, make_batches(steps))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("frequency", "dtype"), [(1, torch.float64), (5, torch.float64), (5, torch.float32)]
)
def test_async_roots_equal_sync_roots_delayed_by_the_same_staleness(
    frequency: int, dtype: torch.dtype
) -> None:
    common = dict(precondition_frequency=frequency, root_staleness=frequency, root_dtype=dtype)
    asynchronous = run(40, async_roots=True, **common)
    synchronous = run(40, async_roots=False, **common)
    assert_bitwise_equal(asynchronous, synchronous)


def test_staleness_changes_the_trajectory() -> None:
    """The equality above is not vacuous: a different delay gives different parameters."""
    fresh = run(20, async_roots=False, precondition_frequency=2, root_staleness=0)
    stale = run(20, async_roots=False, precondition_frequency=2, root_staleness=2)
    assert any(not torch.equal(x, y) for x, y in zip(fresh, stale))


def test_root_stats_count_roots_and_staleness() -> None:
    model = mixed_model()
    opt = Shampoo(model.parameters(), **BASE, precondition_frequency=5, root_staleness=3)
    train(model, opt, make_batches(15))
    stats = opt.root_stats()
    opt.close()
    factors = sum(len(s["factors"]) for s in opt.state.values())
    # Root steps 5, 10 and 15 were submitted: the first cycle installed at once (step 5), the
    # second at step 13; the third is in flight.
    assert stats["roots_computed"] == 2 * factors
    assert stats["mean_staleness"] == 1.5 and stats["max_staleness"] == 3
    assert stats["root_staleness"] == 3
    assert stats["pending_parameters"] == len(opt.state)
    assert stats["root_failures"] == 0
    assert all(isinstance(v, (int, float)) for k, v in stats.items() if k != "last_error")


def _save_and_resume(state: dict[str, Any], steps: int, split: int, **kwargs: Any) -> None:
    batches = make_batches(steps)
    model = mixed_model()
    opt = Shampoo(model.parameters(), **{**BASE, **kwargs})
    train(model, opt, batches[:split])
    checkpoint = saved_and_loaded(model, opt)
    opt.close()
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = Shampoo(resumed_model.parameters(), **{**BASE, **kwargs})
    resumed.load_state_dict(checkpoint["opt"])
    train(resumed_model, resumed, batches[split:])
    resumed.close()
    state["resumed"] = [p.detach().clone() for p in resumed_model.parameters()]


@pytest.mark.parametrize("async_roots", [True, False])
def test_save_mid_flight_then_resume_is_bitwise_identical(async_roots: bool) -> None:
    kwargs = dict(precondition_frequency=5, root_staleness=4, async_roots=async_roots)
    uninterrupted = run(30, **kwargs)
    out: dict[str, Any] = {}
    _save_and_resume(out, 30, split=17, **kwargs)  # roots of step 15 are due at 19
    assert_bitwise_equal(out["resumed"], uninterrupted)


def test_state_dict_holds_pending_roots_only_while_in_flight() -> None:
    model = mixed_model()
    opt = Shampoo(model.parameters(), **BASE, precondition_frequency=5, root_staleness=4)
    train(model, opt, make_batches(5))
    assert int(opt.state_dict()["state"][0]["pending_due"]) == -1  # the first cycle: installed
    train(model, opt, make_batches(6))
    in_flight = opt.state_dict()["state"][0]
    assert int(in_flight["pending_due"]) == 14 and bool(in_flight["pending_ok"].all())
    assert int(opt.state[next(iter(model.parameters()))]["pending_due"]) == -1  # only saved
    train(model, opt, make_batches(3))  # step 14 installs them; the next root step is 15
    assert int(opt.state_dict()["state"][0]["pending_due"]) == -1
    opt.close()


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_copies_made_mid_flight_continue_identically(clone: Any) -> None:
    batches = make_batches(20)
    model = mixed_model()
    opt = Shampoo(model.parameters(), **BASE, precondition_frequency=5, root_staleness=4)
    train(model, opt, batches[:12])  # the roots of step 10 are due at step 14
    model_copy, opt_copy = clone((model, opt))
    assert opt_copy.root_stats()["pending_parameters"] > 0
    train(model, opt, batches[12:])
    train(model_copy, opt_copy, batches[12:])
    assert_bitwise_equal(list(model.parameters()), list(model_copy.parameters()))
    opt.close()
    opt_copy.close()


def test_deepcopy_keeps_hyperparameters_and_pending_roots() -> None:
    model = mixed_model()
    opt = Shampoo(model.parameters(), **BASE, precondition_frequency=5, root_staleness=4)
    train(model, opt, make_batches(11))
    twin = copy.deepcopy(opt)
    assert twin.param_groups[0]["block_size"] == 16
    assert twin.root_stats()["pending_parameters"] == opt.root_stats()["pending_parameters"] > 0
    opt.close()
    twin.close()


def _failing_root(*args: Any, **kwargs: Any) -> RootResult:
    raise FloatingPointError("injected failure")


def test_a_raising_root_keeps_the_previous_root_warns_and_finally_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = mixed_model()
    opt = Shampoo(
        model.parameters(), **BASE, precondition_frequency=2, root_staleness=1, max_root_failures=2
    )
    batches = make_batches(8)
    train(model, opt, batches[:3])  # roots from step 2 installed at step 3
    good_roots = {p: [r.clone() for r in s["roots"]] for p, s in opt.state.items()}
    monkeypatch.setattr(root_pool, "inverse_roots", per_matrix(_failing_root))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, batches[3:5])  # step 4 submits, step 5 installs: first failure
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == sum(len(roots) for roots in good_roots.values())  # one per factor
    assert re.search(r"parameter 0 \(shape .*\) block 0 dim 0 .*injected", messages[0])
    assert all(w.filename.endswith("models.py") for w in caught)  # the line calling opt.step()
    for p, roots in good_roots.items():
        assert all(torch.equal(a, b) for a, b in zip(opt.state[p]["roots"], roots))
    with (
        pytest.raises(RuntimeError, match="consecutive failures") as raised,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        train(model, opt, batches[5:7])
    assert isinstance(raised.value.__cause__, FloatingPointError)
    opt.close()


def test_a_non_finite_factor_is_never_installed() -> None:
    param = torch.nn.Parameter(torch.randn(40, 30))
    opt = Shampoo(
        [param],
        lr=0.1,
        precondition_frequency=1,
        async_roots=True,
        root_staleness=1,
        skip_nonfinite=False,  # let the inf reach the statistics
    )
    for _ in range(2):
        param.grad = torch.randn(40, 30)
        opt.step()
    param.grad = torch.full((40, 30), float("inf"))
    opt.step()  # installs the root of step 2; the statistics become inf; snapshot of step 3
    installed = [r.clone() for r in opt.state[param]["roots"]]
    param.grad = torch.randn(40, 30)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()  # the root of step 3 fails
    assert all(torch.equal(a, b) for a, b in zip(opt.state[param]["roots"], installed))
    assert all(torch.isfinite(r).all() for r in installed)
    assert opt.root_stats()["root_failures"] == 2  # both factors of the (40, 30) block
    opt.close()


def test_dropping_optimizers_stops_their_threads_and_close_is_idempotent() -> None:
    """(Two steps each: the first cycle's one batch is solved on the calling thread, the second
    step's roots go to the workers.)"""
    baseline = settled()
    for _ in range(100):
        param = torch.nn.Parameter(torch.randn(3, 3))
        opt = Shampoo([param], precondition_frequency=1, root_workers=2)
        for _ in range(2):
            param.grad = torch.randn(3, 3)
            opt.step()
        del opt
    gc.collect()
    assert threads_settle_at(baseline)
    param = torch.nn.Parameter(torch.randn(3, 3))
    opt = Shampoo([param], precondition_frequency=1)
    for _ in range(2):
        param.grad = torch.randn(3, 3)
        opt.step()
    assert root_threads() > baseline
    opt.close()
    opt.close()
    assert threads_settle_at(baseline)


def test_interpreter_exit_with_roots_in_flight_does_not_hang() -> None:
    script = textwrap.dedent(
        """
        import torch
        from torch_shampoo import Shampoo
        param = torch.nn.Parameter(torch.randn(400, 400))
        opt = Shampoo([param], precondition_frequency=1, root_staleness=1)
        param.grad = torch.randn(400, 400)
        opt.step()
        print("stepped", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "stepped" in done.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")
def test_a_forked_child_starts_its_own_threads() -> None:
    script = textwrap.dedent(
        """
        import os, torch
        from torch_shampoo import Shampoo
        param = torch.nn.Parameter(torch.randn(8, 8))
        opt = Shampoo([param], precondition_frequency=1, root_staleness=1)
        for _ in range(3):
            param.grad = torch.randn(8, 8)
            opt.step()
        pid = os.fork()
        if pid == 0:
            for _ in range(3):
                param.grad = torch.randn(8, 8)
                opt.step()
            os._exit(0 if opt.root_stats()["roots_computed"] > 2 else 3)
        _, status = os.waitpid(pid, 0)
        param.grad = torch.randn(8, 8)
        opt.step()
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "child 0" in done.stdout


class _SpyRunner:
    """Runs jobs inline, recording the parameters as they are when each job is handed over."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.seen: list[list[torch.Tensor]] = []
        self.threads = 1

    def submit(
        self, jobs: list[root_pool.RootJob], tickets: list[root_pool.Ticket] | None = None
    ) -> list[root_pool.Ticket]:
        self.seen += [[p.detach().clone() for p in self.params]] * len(jobs)  # per job
        return root_pool.run_here(jobs, self.threads, tickets)

    def solve_now(self, batches: list[list[root_pool.RootJob]]) -> list[list[root_pool.Ticket]]:
        return [self.submit(jobs) for jobs in batches]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("staleness", [0, 1])
def test_roots_due_later_are_handed_over_only_after_every_parameter_is_updated(
    staleness: int,
) -> None:
    """Workers never compete with the step that made their jobs (staleness 0, and the first
    cycle, must run at once)."""
    model = mixed_model()
    params = list(model.parameters())
    opt = Shampoo(params, **BASE, precondition_frequency=3, root_staleness=staleness)
    spy = _SpyRunner(params)
    opt._roots.pool = spy  # type: ignore[assignment]
    batches = make_batches(6)
    train(model, opt, batches[:2])
    assert not spy.seen
    train(model, opt, batches[2:3])  # step 3: the first cycle, handed over at once
    jobs = sum(len(slots) for slots in opt._slots.values())  # one per bucket and dim
    assert len(spy.seen) == jobs < sum(len(s["roots"]) for s in opt.state.values())
    before = [p.detach().clone() for p in params]
    assert not all(all(map(torch.equal, seen, before)) for seen in spy.seen)
    spy.seen.clear()
    train(model, opt, batches[3:5])
    assert not spy.seen
    train(model, opt, batches[5:])  # step 6: a later cycle
    after = [p.detach().clone() for p in params]
    assert len(spy.seen) == jobs
    handed_after_the_step = [all(map(torch.equal, seen, after)) for seen in spy.seen]
    assert all(handed_after_the_step) == (staleness > 0)
    opt.close()


def test_root_jobs_of_a_step_that_raised_are_still_computed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception after the statistics (here: injected into the parameter update) must not
    strand the root jobs that step made: state_dict() saves them and training goes on."""
    model = mixed_model()
    opt = Shampoo(model.parameters(), **BASE, precondition_frequency=3, root_staleness=2)
    batches = make_batches(9)
    train(model, opt, batches[:5])

    def broken_update(units: Any, updates: Any, plan: Any) -> None:
        raise KeyboardInterrupt("interrupted mid-step")

    with monkeypatch.context() as patch:
        patch.setattr(torch_shampoo.update.foreach, "update_parameters", broken_update)
        with pytest.raises(KeyboardInterrupt):
            train(model, opt, batches[5:6])  # step 6: a root step, jobs due at step 8
    saved = opt.state_dict()
    factors = sum(len(s["roots"]) for s in opt.state.values())
    pending = [s for s in saved["state"].values() if int(s["pending_due"]) >= 0]
    assert sum(len(s["pending_roots"]) for s in pending) == factors
    assert all(bool(s["pending_ok"].all()) for s in pending)
    train(model, opt, batches[6:])  # step 8 installs them
    stats = opt.root_stats()
    assert (stats["roots_computed"], stats["root_failures"]) == (2 * factors, 0)
    opt.close()
