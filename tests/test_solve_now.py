"""Batches a step waits for (synchronous roots, first cycles) are solved by the calling thread and
the pool's threads at once (``RootPool.solve_now``), each at the workers' thread count: the same
bits as async roots, no hang when a solver raises, an interrupt leaves no root written later."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from models import assert_bitwise_equal

import torch_shampoo.roots.pool as root_pool
from torch_shampoo import Shampoo
from torch_shampoo.roots.jobs import RootJob


def _job(d: int, seed: int) -> RootJob:
    g = torch.randn(d, 2 * d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = (g @ g.T / d)[None]
    return RootJob(x, torch.zeros_like(x), None, None, 1.0, 4.0, 1e-12, "eigh")


def _solvers(monkeypatch: pytest.MonkeyPatch, together: int) -> list[str]:
    """Make ``solve`` record its thread and wait (10 s at most) until ``together`` threads are
    inside it: the batches are solved at once or the wait fails."""
    real, names, barrier = root_pool.solve, [], threading.Barrier(together)

    def solve(jobs: Any) -> Any:
        names.append(threading.current_thread().name)
        barrier.wait(10)
        return real(jobs)

    monkeypatch.setattr(root_pool, "solve", solve)
    return names


@pytest.mark.parametrize("helpers", [0, 2])
def test_the_calling_thread_the_workers_and_the_helpers_solve_the_batches_at_once(
    monkeypatch: pytest.MonkeyPatch, helpers: int
) -> None:
    """One worker (and ``helpers``): 2 (4) batches in flight together, each solved once, each
    root bitwise the one its batch gets alone on this thread."""
    names = _solvers(monkeypatch, 2 + helpers)
    jobs = [[_job(8, seed)] for seed in range(2 + helpers)]
    pool = root_pool.RootPool(1, 1, helpers)
    try:
        tickets = pool.solve_now(jobs)
    finally:
        pool.close()
    assert len(names) == len(set(names)) == 2 + helpers  # one batch per thread, each once
    assert threading.current_thread().name in names
    assert all(t.done() and t.outcome()[0].ok for group in tickets for t in group)
    monkeypatch.undo()
    for seed, (job,) in enumerate(jobs):
        alone = _job(8, seed)
        root_pool.run_here([alone], 1)
        assert torch.equal(job.result, alone.result)


def test_a_batch_that_raises_on_a_worker_fails_its_tickets_and_the_wait_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real, barrier = root_pool.solve, threading.Barrier(2)

    def solve(jobs: Any) -> Any:
        barrier.wait(10)  # one batch each
        if threading.current_thread().name.startswith(root_pool._THREAD_NAME):
            raise ValueError("a worker's solve failed")
        return real(jobs)

    monkeypatch.setattr(root_pool, "solve", solve)
    pool = root_pool.RootPool(1, 1)
    try:
        tickets = pool.solve_now([[_job(6, 0)], [_job(6, 1)]])
    finally:
        pool.close()
    errors = []
    for (ticket,) in tickets:
        try:
            ticket.outcome()
        except ValueError as exc:
            errors.append(str(exc))
    assert errors == ["a worker's solve failed"]


def test_an_interrupt_while_the_caller_solves_cancels_the_workers_batch_unwritten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C arrives while this thread solves its batch: solve_now raises it at once, and the
    worker's batch, finished later, is discarded (its ticket cancelled, its buffer untouched)."""
    real, entered, release = root_pool.solve, threading.Event(), threading.Event()

    def solve(jobs: Any) -> Any:
        if threading.current_thread().name.startswith(root_pool._THREAD_NAME):
            entered.set()
            release.wait(10)
            return real(jobs)
        assert entered.wait(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(root_pool, "solve", solve)
    jobs = [[_job(6, 0)], [_job(6, 1)]]
    pool = root_pool.RootPool(1, 1)
    finished = threading.Event()
    real_run = root_pool._run

    def run(*args: Any, **kwargs: Any) -> None:
        real_run(*args, **kwargs)
        if threading.current_thread().name.startswith(root_pool._THREAD_NAME):
            finished.set()

    monkeypatch.setattr(root_pool, "_run", run)
    torch.set_num_threads(2)  # the pool's is 1: this thread's count changes while it solves
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.solve_now(jobs)
        assert torch.get_num_threads() == 2  # put back
        release.set()
        assert finished.wait(10)
    finally:
        pool.close()
    for ((job,),) in zip(jobs):
        assert torch.equal(job.result, torch.zeros_like(job.result)), "written after the interrupt"


def test_solve_now_after_close_starts_fresh_workers_and_ends_every_ticket() -> None:
    pool = root_pool.RootPool(1, 1)
    pool.solve_now([[_job(4, 0)], [_job(4, 1)]])
    pool.close()
    tickets = pool.solve_now([[_job(4, 2)], [_job(4, 3)], [_job(4, 4)]])
    pool.close()
    assert all(t.outcome()[0].ok for group in tickets for t in group)


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(96, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
        torch.nn.Linear(128, 96),
    )  # fmt: skip


def _run(steps: int, **kwargs: Any) -> list[torch.Tensor]:
    model = _mlp(0)
    batches = [(torch.randn(8, 96, generator=g), torch.randn(8, 96, generator=g))
               for g in [torch.Generator().manual_seed(1)] for _ in range(steps)]  # fmt: skip
    with Shampoo(model.parameters(), lr=0.01, block_size=128, root_workers=1, **kwargs) as opt:
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("threads", [1, 2])
def test_synchronous_roots_over_several_batches_equal_async_roots_bitwise(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """128 x 128 factors (two per batch): several batches per cycle, solved by this thread and
    the worker in sync mode, by the worker alone in async mode (later cycles): the same bits."""
    real, sizes = root_pool.RootPool.solve_now, []

    def solve_now(self: Any, batches: Any) -> Any:
        sizes.append(len(batches))
        return real(self, batches)

    monkeypatch.setattr(root_pool.RootPool, "solve_now", solve_now)
    torch.set_num_threads(threads)
    common = dict(precondition_frequency=3, root_staleness=3, stagger_roots=False)
    asynchronous = _run(10, async_roots=True, **common)
    synchronous = _run(10, async_roots=False, **common)
    assert sizes and max(sizes) >= 3
    assert_bitwise_equal(asynchronous, synchronous)


@pytest.mark.parametrize("helpers", [0, 2])
def test_run_now_runs_tasks_on_the_caller_and_the_workers_at_once_heaviest_first(
    helpers: int,
) -> None:
    """Tasks the step waits for (warm roots, power steps): 2 + helpers of them in flight
    together (each waits, 10 s at most, for the others), each run once, at the workers' thread
    count; the heaviest is the caller's."""
    together = 2 + helpers
    barrier, ran, lock = threading.Barrier(together), [], threading.Lock()

    def task(i: int) -> Any:
        def run() -> None:
            with lock:
                ran.append((i, threading.current_thread().name, torch.get_num_threads()))
            barrier.wait(10)

        return run

    pool = root_pool.RootPool(1, 1, helpers)
    try:
        pool.run_now([task(i) for i in range(together)], [float(i) for i in range(together)])
    finally:
        pool.close()
    assert sorted(i for i, _, _ in ran) == list(range(together))  # each once
    assert len({name for _, name, _ in ran}) == together
    assert (together - 1, threading.current_thread().name, 1) in ran
    assert {threads for _, _, threads in ran} == {1}


def test_run_now_raises_a_tasks_error_after_every_task_ended() -> None:
    """A task that raises (on a worker or here) does not stop the others; its error is raised
    once all have ended; the pool runs later tasks as before."""
    ended: list[int] = []

    def task(i: int) -> Any:
        def run() -> None:
            time.sleep(0.05)
            if i == 1:
                raise ValueError("task 1 broke")
            ended.append(i)

        return run

    pool = root_pool.RootPool(1, 1, 0)
    try:
        with pytest.raises(ValueError, match="task 1 broke"):
            pool.run_now([task(i) for i in range(4)], [1.0] * 4)
        assert sorted(ended) == [0, 2, 3]
        pool.run_now([task(5)], [1.0])
        assert ended[-1] == 5
    finally:
        pool.close()


def test_an_interrupt_in_run_now_starts_no_further_task() -> None:
    """An interrupt while the caller runs its task: the tasks not yet taken never run, the
    worker's (if it took one) ends before the interrupt is raised: nothing writes later."""
    started: list[int] = []
    worker_may_end = threading.Event()

    def task(i: int) -> Any:
        def run() -> None:
            started.append(i)
            if threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt
            worker_may_end.wait(10)

        return run

    pool = root_pool.RootPool(1, 1, 0)
    try:
        threading.Timer(0.2, worker_may_end.set).start()
        with pytest.raises(KeyboardInterrupt):
            pool.run_now([task(i) for i in range(6)], [6.0 - i for i in range(6)])
        after = list(started)
        time.sleep(0.3)
        assert started == after  # nothing started after run_now returned
        assert len(started) <= 2  # the caller's and at most one worker's
    finally:
        pool.close()


@pytest.mark.parametrize("method", ["warm", "soap"])
def test_a_steps_tasks_on_the_pools_threads_train_as_in_order_here_bitwise(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """At one torch thread (the workers' count) a sync step's warm roots and SOAP power steps
    run on the caller and the pool's threads at once: the run is bitwise the one with every task
    run in order on the calling thread, and the async run with the same staleness (whose tasks
    run here, its workers being busy with roots); the pool's threads did run some."""
    from models import make_batches, mixed_model, train

    from torch_shampoo import SOAP
    from torch_shampoo.roots.scheduler import RootScheduler

    def run(async_roots: bool) -> list[torch.Tensor]:
        model = mixed_model()
        kwargs: dict[str, Any] = dict(lr=0.01, block_size=16, precondition_frequency=2,
                                      async_roots=async_roots, root_staleness=1,
                                      stagger_roots=True)  # fmt: skip
        opt = (Shampoo(model.parameters(), eigh_every=3, **kwargs) if method == "warm"
               else SOAP(model.parameters(), **kwargs))  # fmt: skip
        train(model, opt, make_batches(12))
        opt.close()
        return [p.detach().clone() for p in model.parameters()]

    names: list[str] = []
    real = root_pool._Call.run

    def run_call(self: Any, here: bool = False) -> None:
        if not self.claim._taken:
            names.append(threading.current_thread().name)
        real(self, here)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(root_pool._Call, "run", run_call)
        pooled = run(async_roots=False)
        assert any(n != threading.current_thread().name for n in names)  # (not vacuous)
        names.clear()
        asynchronous = run(async_roots=True)
        monkeypatch.setattr(RootScheduler, "threads", lambda self: -1)  # never the pool's
        here = run(async_roots=False)
        assert names == []
    finally:
        torch.set_num_threads(before)
    assert_bitwise_equal(pooled, here)
    assert_bitwise_equal(pooled, asynchronous)
