"""Root steps, and their phases when staggered (``stagger_roots``).

A parameter with phase φ in [0, f) (f: the frequency) starts a root cycle at ``start`` and then
at every t > start with t ≡ φ (mod f); φ = 0 for every parameter is the plain schedule (every
f-th step). Staggered, the parameters of a group get phases that spread their root work evenly
over the f steps of a cycle (:func:`balance`), so each step sends about 1/f of it to the pool:
an asynchronous root is ready a few steps after its snapshot instead of about a whole cycle's
root work later, and a synchronous root step waits for its share only. Phases depend on the
group's parameters' shapes and settings alone: a resumed run (or another rank) gets the same.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from ..layout.blocking import BlockLayout

__all__ = ["balance", "cost", "cycle_of", "is_root_step", "loads", "next_root_step",
           "staggered"]


def staggered(setting: bool | None, async_roots: bool, processes: int) -> bool:
    """Does a group of this ``stagger_roots`` setting stagger (None, "auto": with async roots in
    one process; several take the frequency as their staleness, so there is nothing to gain)?"""
    return setting or (setting is None and async_roots and processes == 1)


def is_root_step(t: int, start: int, frequency: int, phase: int = 0) -> bool:
    """Does a parameter of this ``phase`` start a root cycle at its step ``t``?"""
    return t == start or (t > start and (t - phase) % frequency == 0)


def next_root_step(t: int, frequency: int, phase: int = 0) -> int:
    """The first step after ``t`` at which a parameter of this ``phase`` starts a root cycle."""
    return t + (phase - t - 1) % frequency + 1


def cycle_of(t: int, frequency: int, phase: int = 0) -> int:
    """The index of the root cycle that step ``t`` belongs to (for ``eigh_every``)."""
    return (t - phase) // frequency


def cost(layout: BlockLayout) -> float:
    """A parameter's root work per cycle in units of d³ (a root costs about d³ by any method)."""
    return float(
        sum(
            side**3
            for shape in layout.block_shapes
            for side, factored in zip(shape, layout.factored)
            if factored
        )
    )


def balance(costs: Sequence[float], frequency: int) -> list[int]:
    """Phases in [0, ``frequency``) for items of these ``costs``: the largest first, each to the
    phase with the least work so far (ties: the lowest phase; equal costs keep their order).
    The busiest phase then holds at most the mean plus the largest single cost."""
    phases = [0] * len(costs)
    used = min(frequency, len(costs))  # (more phases than items: each its own, the lowest)
    heap = [(0.0, phase) for phase in range(used)]  # (load, phase): the least, lowest first
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        if costs[i] <= 0:
            continue  # (no root work: phase 0)
        load, phases[i] = heapq.heappop(heap)
        heapq.heappush(heap, (load + costs[i], phases[i]))
    return phases


def loads(costs: Sequence[float], frequency: int) -> list[float]:
    """The work of each phase that :func:`balance` gives (only the phases it uses)."""
    found = balance(costs, frequency)
    out = [0.0] * (max(found, default=0) + 1)
    for cost, phase in zip(costs, found):
        out[phase] += cost
    return out
