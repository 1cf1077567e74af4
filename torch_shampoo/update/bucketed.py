"""The step's math on whole buckets, for the units of :mod:`torch_shampoo.update.per_unit` (a
stacked unit's whole bucket, or the rows of the single units that share one): the statistics
and the grafted direction P = m̂ ×₁ X_1 ×₂ X_2 …, one batched product per bucket (and dim)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from .. import device
from ..layout import compact
from ..layout.buckets import Bucket, Member
from . import kernels
from .per_unit import Unit

__all__ = ["PerBucket", "Share", "precondition", "statistics"]


def statistics(
    units: list[Unit], buckets: list[Bucket], stacked: dict[int, Unit], keep_gradients: bool = False
) -> None:
    """F ← β₂F + w·G Gᵀ per bucket and dim, one batched product each (units with prepared
    statistics excepted: :func:`.per_unit.curvature`); then the gradients go, unless kept."""
    shares = PerBucket(
        units, buckets, stacked, lambda u: u.g is not None and u.works[0].curvature is None
    )
    for share in shares:
        bucket, parts = share.bucket, share.parts
        if not bucket.factors:
            continue
        rows = bucket.rows(share.members)
        blocks = share.stack(lambda u: u.g)  # type: ignore[arg-type,return-value]
        flags = share.guard_flags()
        factors = bucket.factors if rows is None else [f[rows] for f in bucket.factors]
        beta2 = parts[0].config.beta2
        kernels.accumulate_statistics(
            factors, blocks, bucket.factored, beta2, flags, bucket.triangles
        )
        if rows is not None:
            for dim, (whole, part) in enumerate(zip(bucket.factors, factors)):
                if bucket.triangles is not None:  # (only its triangle: paired dims share a stack)
                    part = torch.where(bucket.triangles[dim].factor_mask, part, whole[rows])
                whole.index_copy_(0, rows, part)
    if not keep_gradients:
        for u in units:
            u.g = None


@dataclass
class Share:
    """One bucket's rows of the units that take part: a stacked unit's, or single units'."""

    bucket: Bucket
    unit: Unit | None
    """The bucket's stacked unit (None: ``parts`` are single units)."""
    parts: list[Unit]
    members: list[Member]

    @cached_property
    def flags(self) -> list[bool] | None:
        """Per stack row: does the block have its roots? (None: every block does.)"""
        works = [w for u in self.parts for w in u.works]
        if all(w.rooted is None for w in works):
            return None
        return [
            w.rooted is None or w.rooted[b] for m, w in zip(self.members, works) for b in m.blocks
        ]

    def stack(self, tensor_of: Callable[[Unit], torch.Tensor]) -> torch.Tensor:
        """The parts' tensors as this bucket's (n, *block) stack (gathered for single units)."""
        if self.unit is not None:
            return tensor_of(self.unit)
        return self.bucket.gather([tensor_of(u) for u in self.parts], self.members)

    def guard_flags(self) -> torch.Tensor | None:
        """Per stack row: is the block's gradient finite? (None: all are.) A part whose flags
        are known to be all True (``cells`` None) has all-True rows beside a flagged part."""
        if all(u.cells is None for u in self.parts):
            return None
        if self.unit is not None:
            return self.unit.cells
        return torch.cat([
            m.flags(u.cells) if u.cells is not None
            else torch.ones(len(m.blocks), dtype=torch.bool, device=u.works[0].p.device)
            for m, u in zip(self.members, self.parts)
        ])  # fmt: skip

    def stored_roots(self) -> list[torch.Tensor]:
        """The root (or basis) stacks of these rows per factored dim, as stored (compact state:
        the views whose triangles they are; bfloat16 state: in bfloat16)."""
        rows = self.bucket.rows(self.members)
        return self.bucket.roots if rows is None else [r[rows] for r in self.bucket.roots]

    def roots(self) -> list[torch.Tensor]:
        """The root (or basis) stacks of these rows per factored dim, as full matrices in their
        stored dtype."""
        roots = self.stored_roots()
        if self.bucket.triangles is None:
            return roots
        return [
            compact.full(r, t.root_mask, t.root_upper)
            for r, t in zip(roots, self.bucket.triangles)
        ]

    def products(self, m_hat: torch.Tensor) -> torch.Tensor:
        """m̂ ×₁ X_1 ×₂ X_2 … per row (compact or bfloat16 roots: chunk by chunk)."""
        factored, triangles = self.bucket.factored, self.bucket.triangles
        roots = self.stored_roots()
        if triangles is None and all(r.dtype == m_hat.dtype for r in roots):
            return kernels.mode_products_stack(m_hat, roots, factored)
        # (compact or bfloat16 roots: made full and wide chunk by chunk, never a whole stack)
        return kernels.mode_products_chunked(m_hat, roots, triangles, factored)

    def select(self, result: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """``result`` in the rows whose blocks have their roots, ``fallback`` in the others."""
        if self.flags is None:
            return result
        rooted = device.small_tensor(self.flags, result.device)
        return torch.where(rooted.view(-1, *(1,) * (result.dim() - 1)), result, fallback)


def _uses_roots(u: Unit) -> bool:
    """Does ``u`` use its roots (SOAP: bases) in this step: t ≥ start, and does any of its blocks
    have them? (A stacked unit's rows without them take the graft's direction.)"""
    w = u.works[0]
    rooted = u.bucket is not None or w.rooted is None or any(w.rooted)
    return w.t >= w.config.start and rooted


class PerBucket:
    """The buckets of a step, shared out to the units that ``take`` part; results come back per
    unit (a single unit's from all of its buckets, written into one tensor)."""

    def __init__(
        self,
        units: list[Unit],
        buckets: list[Bucket],
        stacked: dict[int, Unit],
        take: Callable[[Unit], bool] = _uses_roots,
    ):
        self.single = {u.works[0].p: u for u in units if u.bucket is None}
        self.buckets, self.stacked, self.take = buckets, stacked, take
        self.done: list[tuple[Unit, torch.Tensor]] = []
        self.targets: dict[torch.Tensor, torch.Tensor] = {}

    def __iter__(self) -> Iterator[Share]:
        single = self.single
        for bucket in self.buckets:
            unit = self.stacked.get(id(bucket))
            if unit is not None:
                if self.take(unit):
                    yield Share(bucket, unit, [unit], bucket.members)
                continue
            members = [m for m in bucket.members if m.p in single and self.take(single[m.p])]
            if members:
                yield Share(bucket, None, [single[m.p] for m in members], members)

    def put(self, share: Share, result: torch.Tensor) -> None:
        if share.unit is not None:
            self.done.append((share.unit, result))
        else:
            share.bucket.scatter(result, share.members, self.targets)

    def results(self) -> list[tuple[Unit, torch.Tensor]]:
        return self.done + [(self.single[p], t) for p, t in self.targets.items()]


def precondition(
    units: list[Unit], buckets: list[Bucket], stacked: dict[int, Unit]
) -> list[torch.Tensor | None]:
    """Shampoo's direction P = m̂ ×₁ X_1 ×₂ X_2 … per block, rescaled to the graft direction's
    norm (all buckets at once); rows whose blocks have no roots yet take the graft's direction
    (m̂ without a graft). Per unit, in its shape (None: the unit uses no roots in this step)."""
    shares = PerBucket(units, buckets, stacked)
    found: list[tuple[Share, torch.Tensor, torch.Tensor | None]] = []
    products = []
    for share in shares:
        m_hat = share.stack(lambda u: u.m_hat)  # type: ignore[arg-type,return-value]
        direction = None
        if share.parts[0].direction is not None:
            same = all(u.direction is u.m_hat for u in share.parts)
            direction = m_hat if same else share.stack(lambda u: u.direction)  # type: ignore[arg-type,return-value]
        if share.flags is not None and not any(share.flags):
            if share.unit is None:  # the graft's direction (m̂ without one) for all of them
                shares.put(share, m_hat if direction is None else direction)
            continue
        products.append(share.products(m_hat))
        found.append((share, m_hat, direction))
    grafted = kernels.graft_stacks(products, [direction for _, _, direction in found])
    for (share, m_hat, direction), result in zip(found, grafted):
        shares.put(share, share.select(result, m_hat if direction is None else direction))
    # Matched by parameter, not by ``id(unit)``: a unit is new at every step, and under
    # torch.compile its id would be a constant of the graph (a recompile per step).
    position = {u.works[0].p: i for i, u in enumerate(units)}
    out: list[torch.Tensor | None] = [None] * len(units)
    for u, result in shares.results():
        out[position[u.works[0].p]] = result
    return out
