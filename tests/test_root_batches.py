"""Root jobs solved together: equal small jobs of many parameters form one batch
(``root_pool.batches``), and every path that solves a job again (after ``close()``, in a
state dict, on another rank) solves its whole batch, so the roots keep their bits.

The model here has many parameters whose factors are all 9 x 9: odd sizes are where a
matrix's place in a batched eigendecomposition changes its last bits (its alignment in the
stack), so a job solved alone would not reproduce the batch's roots."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import params_of
from torch import nn

import torch_shampoo.roots.pool as root_pool
import torch_shampoo.roots.scheduler as scheduler
from torch_shampoo import Shampoo
from torch_shampoo.roots.pool import MERGED_WORK, RootJob, batches

KWARGS: dict[str, Any] = dict(
    lr=0.01, block_size=16, precondition_frequency=3, root_staleness=2, root_workers=1,
    stagger_roots=False,
)


def nines(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(9, 9), nn.Tanh())])


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(32, 9, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def job(k: int, d: int, epsilon: float = 1e-12, dtype: torch.dtype = torch.float32) -> RootJob:
    x = torch.zeros(k, d, d, dtype=dtype)
    return RootJob(x, x, None, None, scale=1.0, exponent=4.0, epsilon=epsilon, method="eigh")


def test_batches_gather_equal_jobs_in_order_up_to_the_work_cap() -> None:
    cap = round(MERGED_WORK ** (1 / 3))  # one cap-size factor is the whole budget
    jobs = [
        job(1, 9), job(2, 16), job(3, 9), job(1, 9, epsilon=1e-6), job(1, 9, dtype=torch.float64),
        job(1, cap), job(1, cap), job(2, cap), job(1, 16),
    ]  # fmt: skip
    assert batches(jobs) == [[0, 2], [1, 8], [3], [4], [5], [6], [7]]
    assert batches([]) == []
    many = [job(1, 64) for _ in range(40)]  # 16 factors of 64 fill a batch
    assert [len(b) for b in batches(many)] == [16, 16, 8]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 40),  # rows
            st.sampled_from([3, 8, 64, 128, 200]),  # d
            st.sampled_from([1e-12, 1e-6]),  # epsilon
            st.sampled_from([2.0, 4.0]),  # exponent
        ),
        max_size=30,
    )
)
def test_batches_partition_the_jobs_into_homogeneous_ordered_groups_within_the_cap(
    specs: list[tuple[int, int, float, float]],
) -> None:
    jobs = []
    for k, d, epsilon, exponent in specs:
        x = torch.empty(k, d, d)
        jobs.append(RootJob(x, x, None, None, 1.0, exponent, epsilon, "eigh"))
    groups = batches(jobs)
    assert sorted(i for g in groups for i in g) == list(range(len(jobs)))
    for group in groups:
        assert group == sorted(group)
        keys = {(jobs[i].snapshot.shape[-1], jobs[i].epsilon, jobs[i].exponent) for i in group}
        assert len(keys) == 1
        work = sum(jobs[i].snapshot.shape[0] * jobs[i].snapshot.shape[-1] ** 3 for i in group)
        assert len(group) == 1 or work <= MERGED_WORK
    # gathering is greedy: a job starts a new batch of its kind only when the last one is full
    last: dict[tuple[object, ...], list[int]] = {}
    for group in sorted(groups, key=lambda g: g[0]):
        key = (jobs[group[0]].snapshot.shape[-1], jobs[group[0]].epsilon, jobs[group[0]].exponent)
        if key in last:
            previous = sum(
                jobs[i].snapshot.shape[0] * jobs[i].snapshot.shape[-1] ** 3 for i in last[key]
            )
            first = jobs[group[0]].snapshot
            assert previous + first.shape[0] * first.shape[-1] ** 3 > MERGED_WORK
        last[key] = group


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=5), st.sampled_from([5, 8, 9]))
def test_a_batch_solves_each_job_as_the_job_alone_would_to_rounding(
    rows: list[int], d: int
) -> None:
    """Solving jobs together changes nothing but (for odd d) the last bits."""
    gen = torch.Generator().manual_seed(sum(rows) * d)
    jobs = []
    for k in rows:
        g = torch.randn(k, d, 2 * d, generator=gen, dtype=torch.float64)
        x = g @ g.mT
        jobs.append(RootJob(x, torch.empty_like(x), None, None, 1.0, 4.0, 1e-10, "eigh"))
    together = root_pool.solve(jobs)
    for job, (outcomes, roots) in zip(jobs, together):
        ((alone_outcomes, alone),) = root_pool.solve([job])
        assert [o.ok for o in outcomes] == [o.ok for o in alone_outcomes]
        torch.testing.assert_close(roots, alone, rtol=1e-9, atol=1e-12)


class _CountingPool:
    """Runs each handed-over batch inline, recording how many jobs it held."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.threads = 1

    def submit(
        self, jobs: list[RootJob], tickets: list[root_pool.Ticket] | None = None
    ) -> list[root_pool.Ticket]:
        self.sizes.append(len(jobs))
        return root_pool.run_here(jobs, self.threads, tickets)

    def solve_now(self, batches: list[list[root_pool.RootJob]]) -> list[list[root_pool.Ticket]]:
        return [self.submit(jobs) for jobs in batches]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("async_roots", [True, False])
def test_a_root_step_hands_the_small_jobs_of_every_parameter_over_as_one_batch(
    monkeypatch: pytest.MonkeyPatch, async_roots: bool
) -> None:
    """6 weights (two 9 x 9 factors each, exponent 4) and 6 biases (one, exponent 2): 18 jobs,
    two batches per cycle (one per exponent), in either mode and for the first cycle (due at
    once) as for later ones."""
    sizes: list[int] = []

    def counted(jobs: list[RootJob], *args: Any) -> list[root_pool.Ticket]:
        sizes.append(len(jobs))
        return root_pool.run_here(jobs, *args)

    monkeypatch.setattr(scheduler, "run_here", counted)  # synchronous roots: this thread
    model = nines()
    kwargs = dict(KWARGS, root_staleness=2 if async_roots else 0)
    with Shampoo(model.parameters(), async_roots=async_roots, **kwargs) as opt:
        opt._roots.pool = _CountingPool(sizes)  # type: ignore[assignment]
        train(model, opt, range(1, 9))  # root steps 3 and 6 (async: installed at 8)
        assert sizes == [12, 6, 12, 6]
        assert opt.root_stats()["roots_computed"] == 2 * 18


def _held_solve() -> tuple[Any, threading.Event, threading.Event, threading.Event]:
    """``root_pool.solve`` that, while ``blocking`` is set, waits for ``release`` first."""
    real = root_pool.solve
    blocking, release, entered = threading.Event(), threading.Event(), threading.Event()

    def held(jobs: list[RootJob]) -> Any:
        if blocking.is_set():
            entered.set()
            release.wait(30)
        return real(jobs)

    return held, blocking, release, entered


@pytest.mark.parametrize("resume_by", ["step", "state_dict"])
def test_roots_cancelled_by_close_are_solved_again_in_their_batch_bitwise(
    monkeypatch: pytest.MonkeyPatch, resume_by: str
) -> None:
    """close() while a later cycle's batches are being solved cancels their 18 roots; the next step
    (or a state dict, on its own thread) solves the batch again: bitwise the roots and the
    weights of the uninterrupted run. (On x86 a job solved alone would differ in the last
    bits here: the factors' size is odd.)"""
    held, blocking, release, entered = _held_solve()
    monkeypatch.setattr(root_pool, "solve", held)
    plain = nines()
    with Shampoo(plain.parameters(), **KWARGS) as opt:
        train(plain, opt, range(1, 7))
        expected = opt.state_dict()["state"]  # step 6's roots, due at step 8
        train(plain, opt, range(7, 10))
    model = nines()
    opt = Shampoo(model.parameters(), **KWARGS)
    train(model, opt, range(1, 6))
    blocking.set()
    train(model, opt, range(6, 7))  # step 6: the batch goes to the worker and is held there
    assert entered.wait(30)
    opt.close()
    blocking.clear()
    release.set()
    if resume_by == "state_dict":
        saved = opt.state_dict()["state"]  # solves the cancelled batch on this thread
        for i, s in saved.items():
            assert int(s["pending_due"]) == 8
            roots, twins = s["pending_roots"], expected[i]["pending_roots"]
            assert roots.keys() == twins.keys()
            for key in roots:
                assert torch.equal(roots[key], twins[key]), key
    train(model, opt, range(7, 10))
    opt.close()
    for a, b in zip(params_of(model), params_of(plain)):
        assert torch.equal(a, b), (a - b).abs().max()


def test_a_root_that_fails_in_a_batch_fails_alone() -> None:
    """Two equal weights share their batches; a non-finite factor of the first fails its own
    root (a warning, the previous root kept) and leaves the second's roots, hence its
    weights, bitwise what they are when nothing fails."""

    def run(corrupt: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        layers = [nn.Linear(8, 8, bias=False) for _ in range(2)]
        params = [layer.weight for layer in layers]
        with Shampoo(params, lr=0.01, precondition_frequency=2, async_roots=False) as opt:
            for t in range(1, 6):
                gen = torch.Generator().manual_seed(t)
                for p in params:
                    p.grad = torch.randn(8, 8, generator=gen)
                if corrupt and t == 4:  # before the root step 4's statistics
                    opt.state[params[0]]["factors"][0].fill_(float("nan"))
                opt.step()
            if corrupt:
                assert opt.root_stats()["root_failures"] >= 1
        return params_of(nn.ModuleList(layers))

    with pytest.warns(RuntimeWarning, match="failed"):
        corrupted = run(corrupt=True)
    clean = run(corrupt=False)
    assert torch.equal(corrupted[1], clean[1])
    assert not torch.equal(corrupted[0], clean[0])


def test_installed_roots_leave_no_reference_cycles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch refers to its pendings and a pending to its batches: once installed, a pending
    is freed by reference counting alone (compact state's host buffers are allocated per
    cycle and must not wait for the garbage collector)."""
    model = nines()
    opt = Shampoo(model.parameters(), **dict(KWARGS, root_staleness=0), async_roots=False)
    taken: list[weakref.ref[Any]] = []
    take_due = opt._roots.take_due

    def recording(*args: Any) -> Any:
        pending = take_due(*args)
        if pending is not None:
            taken.append(weakref.ref(pending))
        return pending

    monkeypatch.setattr(opt._roots, "take_due", recording)
    gc.collect()
    gc.disable()
    try:
        train(model, opt, range(1, 7))  # root steps 3 and 6, installed in the same step
        assert len(taken) == 2 * 12
        assert all(ref() is None for ref in taken)
    finally:
        gc.enable()
        opt.close()
