"""A root pool that cannot hang, oversubscribe the cores or write after close(): forked children,
exit with another copy of the package, worker thread counts, close with a root running."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
import torch
from models import (
    assert_bitwise_equal,
    make_batches,
    mixed_model,
    per_matrix,
    train,
)
from root_schedule_helpers import BASE, ROOT, params_after

import torch_shampoo.roots.pool as root_pool
from torch_shampoo import NGPlus, Shampoo
from torch_shampoo.roots.matrix_roots import RootResult, inverse_root

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
