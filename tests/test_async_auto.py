"""``async_roots="auto"``, the default: roots on the pool's threads while the step runs, unless
every parameter is on the CPU and the step's threads and the workers' would be more than the
cores (there workers only slow the step's OpenMP threads down: docs/design.md)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from models import assert_bitwise_equal, make_batches, mixed_model, train

from torch_shampoo import SOAP, NGPlus, Shampoo
from torch_shampoo.roots import threads


@pytest.mark.parametrize(
    ("step_threads", "cores", "processes", "spare"),
    [
        (1, 2, 1, True),  # a core for the step, one for the worker
        (2, 2, 1, False),  # the step's two threads fill both
        (1, 2, 2, False),  # two processes (torchrun) of one thread and one worker each
        (4, 16, 1, True),  # 4 + 8 workers of one thread ≤ 16
        (16, 16, 1, False),
    ],
)
def test_cpu_parameters_get_workers_only_where_their_cores_are_spare(
    monkeypatch: pytest.MonkeyPatch, step_threads: int, cores: int, processes: int, spare: bool
) -> None:
    monkeypatch.setattr(threads, "cores", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    torch.set_num_threads(step_threads)
    assert threads.spare_cores([torch.device("cpu")], max(1, cores // 2)) is spare


@pytest.mark.parametrize("local", ["", "two", "-1", "0"])
def test_a_local_world_size_that_is_not_a_count_counts_one_process(
    monkeypatch: pytest.MonkeyPatch, local: str
) -> None:
    monkeypatch.setattr(threads, "cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert threads.spare_cores([torch.device("cpu")], 1)


def test_a_parameter_on_an_accelerator_always_gets_async_roots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(The step's work is the accelerator's: the host's cores are the pool's.)"""
    monkeypatch.setattr(threads, "cores", lambda: 1)
    devices = [torch.device("cpu"), torch.device("cuda", 0)]
    assert threads.spare_cores(devices, 1)
    assert not threads.spare_cores(devices[:1], 1)


@pytest.mark.parametrize("front", [Shampoo, SOAP, NGPlus])
def test_the_default_is_decided_at_construction_and_the_plan_says_which(
    monkeypatch: pytest.MonkeyPatch, front: Any
) -> None:
    layer = torch.nn.Linear(4, 3)
    for cores, decided in ((1, False), (64, True)):
        monkeypatch.setattr(threads, "cores", lambda cores=cores: cores)
        with front(layer.parameters()) as opt:
            assert opt.plan().async_roots is decided
            monkeypatch.setattr(threads, "cores", lambda other=65 - cores: other)
            copy = pickle.loads(pickle.dumps(opt))  # (kept as decided)
            assert copy.plan().async_roots is decided
            copy.close()
    for explicit in (True, False):  # an explicit choice is never overridden
        with front(layer.parameters(), async_roots=explicit) as opt:
            assert opt.plan().async_roots is explicit


def test_decided_sync_the_run_is_bitwise_async_roots_false(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(threads, "cores", lambda: 1)
    runs = []
    for kwargs in ({}, {"async_roots": False}):
        model = mixed_model(0)
        with Shampoo(model.parameters(), lr=0.01, block_size=16, precondition_frequency=3,
                     **kwargs) as opt:  # fmt: skip
            train(model, opt, make_batches(20))
            assert opt.root_stats()["roots_computed"] > 0
        runs.append([p.detach().clone() for p in model.parameters()])
    assert_bitwise_equal(*runs)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_an_async_roots_that_is_not_a_choice_is_refused_by_name(value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=rf"async_roots: {value!r}"):
        Shampoo(torch.nn.Linear(2, 2).parameters(), async_roots=value)
