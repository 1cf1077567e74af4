"""The plan's numbers (:class:`Plan`, its rows), its table (``str``) and its dict: plain values
that :mod:`torch_shampoo.plan` computes from an optimizer's settings and shapes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["KINDS", "BucketRow", "Plan", "Row"]

KINDS = ("factors", "roots", "graft", "moments", "other", "staging")
"""Bytes by kind: the blocks' factors and roots (with ``compact_state``, each its triangle of the
shared (d + 1, d) tensor), the graft's second moment, the first moment and momentum, the
counters and flags (``other``); ``staging``: the most host memory roots computed off the step
hold (two buffers per factor from a later cycle's snapshot to its solve; held by the
scheduler, not the state; none once installed)."""


@dataclass
class Row:
    """One parameter's line of the plan."""

    index: int
    name: str
    shape: tuple[int, ...]
    numel: int
    layout: str
    """The merged dims: ``100=64+36`` a factored dim cut into blocks, ``[5000]`` one left whole
    (one-sided: no factor), ``1`` a dim of one block."""
    blocks: int
    factor_sizes: list[int]
    one_sided: list[int]
    buckets: list[int]
    bytes: dict[str, int]
    root_flops: float
    root_seconds: float
    """Of a root cycle, on one worker at the pool's thread count; a follower's: 0 (flops too)."""
    leader: int | None
    itemsize: int
    """Bytes of one element of the parameter."""


@dataclass
class BucketRow:
    """A bucket: blocks of one group, shape, factored dims, dtypes and device, stacked."""

    index: int
    block_shape: tuple[int, ...]
    factored: tuple[bool, ...]
    dtype: str
    blocks: int = 0


@dataclass
class Plan:
    """What :meth:`~torch_shampoo.engine.PreconditionerEngine.plan` returns (``str()``: a table)."""

    owner: str
    rows: list[Row]
    buckets: list[BucketRow]
    workers: int
    threads: int
    async_roots: bool
    compact: bool
    frequencies: list[int]
    """Per group: steps between root steps."""
    staleness: list[int | None]
    """Per group: the steps a later root is used late (None: auto, and no step time)."""
    step_seconds: float | None
    step_source: str
    """``"given"``, ``"measured"`` (the median step of this optimizer) or ``"none"``."""
    methods: list[str] = field(default_factory=list)
    busiest: float = 1.0
    """The busiest root step's share of a cycle's root work (< 1: staggered roots)."""

    @property
    def bytes(self) -> dict[str, int]:
        return {kind: sum(r.bytes[kind] for r in self.rows) for kind in KINDS}

    @property
    def state_bytes(self) -> int:
        """Bytes of ``optimizer.state`` after the first step (staging aside)."""
        return sum(v for k, v in self.bytes.items() if k != "staging")

    @property
    def adam_bytes(self) -> int:
        """Adam's state: two moments per element in the parameter's dtype."""
        return sum(2 * r.numel * r.itemsize for r in self.rows)

    @property
    def adam_ratio(self) -> float:
        return self.state_bytes / self.adam_bytes if self.adam_bytes else math.nan

    @property
    def root_flops(self) -> float:
        return sum(r.root_flops for r in self.rows)

    @property
    def cycle_seconds(self) -> float:
        """Wall time of a root cycle: every root's seconds shared by the workers."""
        return sum(r.root_seconds for r in self.rows) / self.workers

    @property
    def cycle_steps(self) -> float | None:
        """Training steps the busiest root step's roots last at the step time (None: none
        known); unstaggered, a whole cycle's."""
        seconds = self.cycle_seconds * self.busiest
        return None if not self.step_seconds else seconds / self.step_seconds

    def as_dict(self) -> dict[str, Any]:
        """Plain values (``json.dumps`` takes them): the fields, rows, buckets and totals."""
        totals = {key: getattr(self, key) for key in ("bytes", "state_bytes", "adam_bytes",
                  "adam_ratio", "root_flops", "cycle_seconds", "cycle_steps")}  # fmt: skip
        return {**asdict(self), "totals": totals}  # (tuples: lists in JSON)

    def __str__(self) -> str:
        return "\n".join(_render(self))


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B" if n else "-"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if n else "-"


def _seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e6:.3g} µs"


def _many(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


_SHOWN = ("factors", "roots", "graft", "moments", "staging")


def _render(plan: Plan) -> list[str]:
    head = ["#", "parameter", "shape", "layout", "blocks", "bucket", *_SHOWN, "root flop", "time"]
    table = []
    for r in plan.rows:
        work = [f"#{r.leader}'s", ""] if r.leader is not None else [_count(r.root_flops), ""]
        if r.root_seconds:
            work[1] = _seconds(r.root_seconds)
        table.append([str(r.index), r.name, "×".join(map(str, r.shape)) or "()", r.layout,
                      str(r.blocks), ",".join(map(str, r.buckets)) or "-",
                      *(_size(r.bytes[k]) for k in _SHOWN), *work])  # fmt: skip
    totals = plan.bytes
    blocks = sum(r.blocks for r in plan.rows)
    table.append(["", "total", "", "", str(blocks), str(len(plan.buckets)),
                  *(_size(totals[k]) for k in _SHOWN), _count(plan.root_flops),
                  _seconds(plan.cycle_seconds * plan.workers)])  # fmt: skip
    widths = [max(len(line[i]) for line in [head, *table]) for i in range(len(head))]
    left = {1, 2, 3}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # fmt: skip

    numel = sum(r.numel for r in plan.rows)
    compact = ", compact state" if plan.compact else ""
    out = [f"{plan.owner} plan: {len(plan.rows)} parameters, {numel:,} elements, "
           f"{len(plan.buckets)} buckets{compact}; per root cycle, one worker's flop and time; "
           "layout [d]: a dim left whole (no factor)", line(head), *map(line, table)]  # fmt: skip
    kinds = ", ".join(f"{k} {_size(totals[k])}" for k in KINDS if k != "staging")
    out.append(f"state {_size(plan.state_bytes)} ({kinds}) = {plan.adam_ratio:.2f}× Adam's "
               f"{_size(plan.adam_bytes)} (two moments per element)")  # fmt: skip
    if totals["staging"]:
        out.append(f"host staging {_size(totals['staging'])} at most besides: two buffers per "
                   "factor from a later root cycle's snapshot to its solve")  # fmt: skip
    every = "/".join(map(str, dict.fromkeys(plan.frequencies)))
    cycle = _seconds(plan.cycle_seconds)
    team = f"{_many(plan.workers, 'worker')} × {_many(plan.threads, 'thread')}"
    out.append(f"roots every {every} steps: {_count(plan.root_flops)} flop "
               f"({'; '.join(plan.methods) or 'no factor'}), {cycle} a cycle on {team} "
               "(eigh timed here)")  # fmt: skip
    out.append(_staleness_line(plan))
    return out


def _staleness_line(plan: Plan) -> str:
    cycle, steps = _seconds(plan.cycle_seconds * plan.busiest), plan.cycle_steps
    what = "a cycle lasts" if plan.busiest == 1 else "the busiest staggered root step's roots last"
    pace = "" if plan.step_seconds is None else (
        f"at {_seconds(plan.step_seconds)} a step ({plan.step_source}) {what} {steps:.3g} steps")
    if not plan.async_roots:
        return f"sync roots: a root step waits {cycle}" + (f"; {pace}" if pace else "")
    if plan.step_seconds is None:
        return ("staleness: no step time to estimate it (plan(step_seconds=...), or plan() "
                "after some steps)")  # fmt: skip
    late = [s for s in dict.fromkeys(plan.staleness) if s is not None]
    text = f"{pace}: later roots used {'/'.join(map(str, late))} steps late"
    assert steps is not None
    if any(s is not None and steps > s for s in plan.staleness):
        text += " (< a cycle: steps will wait; raise precondition_frequency or lower block_size)"
    return text
