"""The CPU threads roots take: the pool's counts (:func:`default_threads`, :func:`helpers`) and
whether async roots have cores of their own (:func:`spare_cores`, ``async_roots="auto"``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

__all__ = ["cores", "default_threads", "helpers", "spare_cores", "team"]


def default_threads(workers: int) -> int:
    """Intra-op threads per root worker: half of the caller's thread count shared among the
    workers (at least 1); the other half is left to the training thread (docs/design.md)."""
    return max(1, torch.get_num_threads() // (2 * workers))


def helpers(workers: int, threads: int) -> int:
    """Threads beside the caller and the ``workers`` that :meth:`RootPool.solve_now` needs to
    fill the caller's ``torch.get_num_threads()`` with roots at ``threads`` threads each (at
    the defaults: 0 on 2 cores, 7 on 16)."""
    return max(0, torch.get_num_threads() // threads - 1 - workers)


def team(workers: int) -> tuple[int, int]:
    """(threads per worker, :func:`helpers`) of a pool of ``workers``, at torch's count now."""
    threads = default_threads(workers)
    return threads, helpers(workers, threads)


def cores() -> int:
    """The cores this process may run on (its affinity where the platform tells it)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def spare_cores(devices: Iterable[torch.device], workers: int) -> bool:
    """``async_roots="auto"``: do root workers get cores the step does not use? Not when every
    parameter is on the CPU and the step's intra-op threads (times ``LOCAL_WORLD_SIZE``, the
    processes torchrun starts on this host) plus the ``workers``' at :func:`default_threads`
    are more than :func:`cores`: there async roots only slow the step's OpenMP threads down
    (docs/design.md, "Sync or async roots"), and a sync step solves its roots on every core."""
    if any(d.type != "cpu" for d in devices):
        return True
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    processes = max(1, int(local)) if local.isdigit() else 1
    step = torch.get_num_threads() * processes
    return step + workers * default_threads(workers) * processes <= cores()
