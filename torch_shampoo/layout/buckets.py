"""Buckets: the blocks of many parameters stacked, so that a step costs one kernel per shape.

Blocks with the same shape, factored dims, dtypes (parameter and state), device and parameter
group form a *bucket*. It owns their factors and roots as stacks, one ``(n, d, d)`` tensor per
factored dim, and each parameter's ``state["factors"]`` and ``state["roots"]`` hold views of its
rows. A parameter's blocks of one shape form a sub-grid of its grid, so gathering them into the
``(n, *block)`` stack and scattering them back are a strided view and one copy each (none for a
single-block parameter). See docs/design.md, "Buckets".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import device
from ..roots.staging import Slot
from ..state import state_dtype
from . import compact
from .blocking import BlockLayout
from .compact import Triangles

__all__ = ["Bucket", "Member", "bucket_key", "factor_groups", "plan_buckets", "slots_of"]


@dataclass
class Member:
    """The blocks of one parameter in one bucket."""

    p: torch.Tensor
    layout: BlockLayout
    offset: int
    """Row of the bucket's stacks where this parameter's first block is."""
    blocks: list[int]
    """The parameter's block indices, in stack order (row-major over the sub-grid)."""
    starts: tuple[int, ...]
    """Per merged dim: the sub-grid's first element."""
    counts: tuple[int, ...]
    """Per merged dim: the sub-grid's number of chunks."""
    chunks: tuple[int, ...]
    """Per merged dim: the sub-grid's first chunk index (for the guard's grid of flags)."""

    @property
    def whole(self) -> bool:
        """Is the parameter a single block (so that its stack rows are a view of it)?"""
        return self.layout.num_blocks == 1

    def view(self, x: torch.Tensor, block_shape: tuple[int, ...]) -> torch.Tensor:
        """The blocks of the parameter-shaped ``x``: a view (count₁, count₂, …, *block_shape)."""
        grid = list(zip(self.starts, self.counts, block_shape))
        m = x.reshape(self.layout.shape)[tuple(slice(s, s + c * n) for s, c, n in grid)]
        m = m.view([k for _, count, length in grid for k in (count, length)])
        return m.permute([*range(0, 2 * len(grid), 2), *range(1, 2 * len(grid), 2)])

    def flags(self, cells: torch.Tensor) -> torch.Tensor:
        """This member's entries of the guard's grid of per-block flags, in stack order."""
        if cells.dim() == 0:
            return cells.reshape(1)
        return cells[tuple(slice(f, f + n) for f, n in zip(self.chunks, self.counts))].reshape(-1)


@dataclass
class Bucket:
    """Equal-shape blocks of one group, stacked."""

    block_shape: tuple[int, ...]
    factored: tuple[bool, ...]
    per_block: int
    """Factors per block of the members' layouts (all factored dims)."""
    members: list[Member] = field(default_factory=list)
    factors: list[torch.Tensor] = field(default_factory=list)
    """Per factored dim, the (n, d, d) stack of every block's factor."""
    roots: list[torch.Tensor] = field(default_factory=list)
    bases: list[torch.Tensor] = field(default_factory=list)
    """Per factored dim, the eigenbases' stack when every member keeps them (warm roots)."""
    triangles: list[Triangles] | None = None
    """Compact state (:mod:`.compact`): per factored dim, the triangles' masks; None: full."""
    moments: dict[str, torch.Tensor] = field(default_factory=dict)
    """When every member is a single block: its moments (exp_avg, graft_v, momentum_buffer as
    (n, *block) stacks, skipped_blocks as (n,)), whose rows the members' states view."""
    steps: torch.Tensor | None = None
    """With ``moments`` and several members: their step counts as one (n,) host tensor, whose
    rows (``step_rows``) are their states' ``step``: one add advances them all."""
    step_rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(m.blocks) for m in self.members)

    def rows(self, members: Sequence[Member]) -> torch.Tensor | None:
        """The stack rows of ``members`` (None when they are all of them, in order)."""
        if len(members) == len(self.members):
            return None
        index = [m.offset + i for m in members for i in range(len(m.blocks))]
        where = self.factors[0].device if self.factors else torch.device("cpu")
        return device.small_tensor(index, where)

    def gather(self, tensors: Sequence[torch.Tensor], members: Sequence[Member]) -> torch.Tensor:
        """The blocks of parameter-shaped ``tensors`` (one per member) as an (n, *block) stack."""
        shape = self.block_shape
        if all(m.whole for m in members):
            return torch.stack([x.view(shape) for x in tensors])
        sizes = [len(m.blocks) for m in members]
        out = tensors[0].new_empty((sum(sizes), *shape))
        for rows, x, m in zip(out.split(sizes), tensors, members):
            rows.view(*m.counts, *shape).copy_(m.view(x, shape))
        return out

    def scatter(
        self,
        stack: torch.Tensor,
        members: Sequence[Member],
        targets: dict[torch.Tensor, torch.Tensor],
    ) -> None:
        """Write the rows of ``stack`` into each member's target (a single block's: a view)."""
        shape = self.block_shape
        for m, rows in zip(members, stack.split([len(m.blocks) for m in members])):
            if m.whole:
                targets[m.p] = rows[0].view(m.layout.param_shape)
            else:
                target = targets.get(m.p)
                if target is None:
                    target = targets[m.p] = stack.new_empty(m.layout.param_shape)
                m.view(target, shape).copy_(rows.view(*m.counts, *shape))


def _sub_grids(layout: BlockLayout) -> dict[tuple[int, ...], tuple[list[int], tuple, tuple, tuple]]:
    """Per block shape of ``layout``: its blocks and sub-grid (starts, counts, first chunks)."""
    found: dict[tuple[int, ...], list[int]] = {}
    for b, shape in enumerate(layout.block_shapes):
        found.setdefault(shape, []).append(b)
    grids = {}
    for shape, blocks in found.items():
        chunks = tuple(lengths.index(x) for x, lengths in zip(shape, layout.grid))
        starts = tuple(sum(lengths[:first]) for first, lengths in zip(chunks, layout.grid))
        counts = tuple(lengths.count(x) for x, lengths in zip(shape, layout.grid))
        grids[shape] = (blocks, starts, counts, chunks)
    return grids


def factor_groups(layout: BlockLayout) -> list[list[int]]:
    """The factor indices of each root job of a parameter: per block shape (in order of first
    appearance) and factored dim, that shape's blocks' factors of that dim."""
    k = sum(layout.factored)
    if math.prod(layout.shape) == 0:
        return []
    return [
        [b * k + dim for b in blocks]
        for blocks, *_ in _sub_grids(layout).values()
        for dim in range(k)
    ]


def slots_of(placements: list[tuple[Bucket, Member]]) -> list[Slot]:
    """A parameter's root jobs (in :func:`factor_groups` order) as rows of its buckets."""
    slots = []
    for bucket, m in placements:
        rows = slice(m.offset, m.offset + len(m.blocks))
        dims = [d for d, factored in enumerate(bucket.factored) if factored]
        for dim, merged_dim in enumerate(dims):
            indices = [b * bucket.per_block + dim for b in m.blocks]
            triangles = None if bucket.triangles is None else bucket.triangles[dim]
            factors, roots = bucket.factors[dim][rows], bucket.roots[dim][rows]
            place = (bucket, m, merged_dim)
            bases = bucket.bases[dim][rows] if bucket.bases else None
            slots.append(Slot(indices, factors, roots, place, triangles, bases))
    return slots


def bucket_key(
    group: int, block_shape: tuple[int, ...], layout: BlockLayout, p: torch.Tensor
) -> tuple[Any, ...]:
    """What the blocks of one bucket share: group, shape, factored dims, dtypes, device."""
    return (group, block_shape, layout.factored, p.dtype, state_dtype(p), p.device)


def plan_buckets(
    entries: Iterable[tuple[int, torch.Tensor, BlockLayout, dict[str, Any]]],
    packed: bool | str = False,
) -> tuple[list[Bucket], dict[int, list[tuple[Bucket, Member]]]]:
    """Stack the blocks of every ``(group index, parameter, layout, state)`` with elements; each
    state's ``factors`` and ``roots`` become views of the new stacks (``packed``: compact
    state, True or "auto": where it pairs dims, :func:`.compact.pairs`). Also returns, per
    parameter (``id``), its buckets and members, in sub-grid order."""
    entries = list(entries)
    buckets: dict[tuple[Any, ...], Bucket] = {}
    placements: dict[int, list[tuple[Bucket, Member]]] = {}
    for group, p, layout, _ in entries:
        if math.prod(layout.shape) == 0:
            continue
        for shape, (blocks, starts, counts, chunks) in _sub_grids(layout).items():
            key = bucket_key(group, shape, layout, p)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(shape, layout.factored, sum(layout.factored))
            member = Member(p, layout, bucket.size, blocks, starts, counts, chunks)
            bucket.members.append(member)
            placements.setdefault(id(p), []).append((bucket, member))
    states = {id(p): state for _, p, _, state in entries}
    for bucket in buckets.values():
        _stack_state(bucket, [states[id(m.p)] for m in bucket.members], packed)
    return list(buckets.values()), placements


def advance_steps(states: Sequence[dict[str, Any]], buckets: Iterable[Bucket]) -> None:
    """Add 1 to the ``step`` of every state in ``states``: one add per bucket whose members all
    step and whose rows are still their ``step``, one per other state."""
    rest = {id(s): s for s in states}
    owner = {id(s["step"]): id(s) for s in states if isinstance(s["step"], torch.Tensor)}
    for bucket in buckets:
        if bucket.steps is not None and all(id(x) in owner for x in bucket.step_rows):
            bucket.steps.add_(1)
            for x in bucket.step_rows:
                del rest[owner[id(x)]]
    for s in rest.values():
        s["step"] += 1


def _host_scalar(x: object, first: torch.Tensor) -> bool:
    """Is ``x`` a 0-d host tensor of ``first``'s dtype (a step count that can join a stack)?"""
    if not isinstance(x, torch.Tensor):
        return False
    return x.dim() == 0 and x.dtype == first.dtype and x.device.type == "cpu"


MOMENTS = ("exp_avg", "graft_v", "momentum_buffer", "skipped_blocks")


def _stack_state(bucket: Bucket, states: list[dict[str, Any]], packed: bool | str) -> None:
    """Copy the members' factors and roots (and a bucket of single-block parameters' moments)
    into stacks and bind the states to their rows. ``packed``: a factor is read from its lower
    triangle, a root from its upper one, and both are stored in one stack; with bfloat16 roots a
    square block's two dims are paired instead (:func:`.compact.pairs`), and only those with
    ``packed="auto"``."""
    keys = [key for key in MOMENTS if key in states[0]]
    if all(m.whole for m in bucket.members) and all(
        [key for key in MOMENTS if key in s] == keys for s in states
    ):
        for key in keys:
            skips = key == "skipped_blocks"  # a 0-d count per parameter
            shape = () if skips else bucket.block_shape
            stack = bucket.moments[key] = torch.stack([s[key].reshape(shape) for s in states])
            for row, m, s in zip(stack, bucket.members, states):
                s[key] = row.view(() if skips else m.layout.param_shape)
        steps = [s["step"] for s in states]
        if len(steps) > 1 and all(_host_scalar(x, steps[0]) for x in steps):
            bucket.steps = torch.stack(steps)
            bucket.step_rows = list(bucket.steps.unbind())
            for count, s in zip(bucket.step_rows, states):
                s["step"] = count
    k = bucket.per_block
    if packed and _pack_pairs(bucket, states):  # (True or "auto")
        return
    bucket.triangles = [] if packed is True else None
    for dim in range(k):
        rows = [(s, b * k + dim) for m, s in zip(bucket.members, states) for b in m.blocks]
        factors = [s["factors"][j] for s, j in rows]
        roots = [s["roots"][j] for s, j in rows]
        if bucket.triangles is None:
            factor_stack, root_stack = torch.stack(factors), torch.stack(roots)
        else:  # row by row: no full (n, d, d) copies on the way
            triangles = compact.Triangles(factors[0].shape[-1], factors[0].device)
            factor_stack, root_stack = compact.pack(factors, roots, triangles)
            bucket.triangles.append(triangles)
        bucket.factors.append(factor_stack)
        bucket.roots.append(root_stack)
        for row, (s, j) in enumerate(rows):
            s["factors"][j] = factor_stack[row]
            s["roots"][j] = root_stack[row]
        if all("bases" in s for s in states):  # (warm roots: every member's group)
            bucket.bases.append(torch.stack([s["bases"][j] for s, j in rows]))
            for row, (s, j) in enumerate(rows):
                s["bases"][j] = bucket.bases[-1][row]


def _pack_pairs(bucket: Bucket, states: list[dict[str, Any]]) -> bool:
    """Stack a bucket of square blocks with bfloat16 roots as paired dims (:func:`.compact.pairs`),
    when it is one; returns whether it was."""
    k = bucket.per_block
    if k != 2:  # (a vector's or a one-sided block's: nothing to pair)
        return False
    rows = [[(s, b * k + dim) for m, s in zip(bucket.members, states) for b in m.blocks]
            for dim in range(k)]  # fmt: skip
    factors = [[s["factors"][j] for s, j in dim_rows] for dim_rows in rows]
    roots = [[s["roots"][j] for s, j in dim_rows] for dim_rows in rows]
    sizes = [f[0].shape[-1] for f in factors]
    if not compact.pairs(sizes, factors[0][0].dtype, roots[0][0].dtype, "bases" in states[0]):
        return False
    bucket.factors, bucket.roots = compact.pack_pairs(factors, roots, sizes[0])
    bucket.triangles = [compact.Triangles(sizes[0], bucket.factors[0].device, upper, upper)
                        for upper in (False, True)]  # fmt: skip
    for dim, dim_rows in enumerate(rows):
        for row, (s, j) in enumerate(dim_rows):
            s["factors"][j] = bucket.factors[dim][row]
            s["roots"][j] = bucket.roots[dim][row]
    return True
