"""Eigenvalue-corrected Shampoo (SOAP): Adam run in the eigenbasis of each block's factors.

The root pool computes each factor's eigenvectors Q_i instead of a root. A step rotates the
gradient into the basis, G' = G ×₁ Q_1ᵀ ×₂ Q_2ᵀ …, runs Adam there (both moments live in the
basis) and rotates Adam's direction back, N = N' ×₁ Q_1 ×₂ Q_2 …; before a block's first basis
nothing is rotated. How the moments follow a new basis: docs/design.md, "SOAP".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..layout import compact
from ..layout.buckets import Bucket, Member
from . import bucketed, kernels, per_unit
from .per_unit import Unit

__all__ = ["change_basis", "refresh", "rotate", "rotate_chunked", "rotate_stack", "step_units"]


def rotate_stack(
    blocks: torch.Tensor, bases: Sequence[torch.Tensor], factored: tuple[bool, ...], back: bool
) -> torch.Tensor:
    """Every block of a stack (n, *block) in its own basis (``back``: out of it): the mode
    products with Q_iᵀ (Q_i) over the factored dims; ``bases`` per factored dim, (n, d, d)."""
    if blocks.dim() == 3 and all(factored):
        left, right = bases
        if back:
            return torch.matmul(torch.matmul(left, blocks), right.mT)
        return torch.matmul(torch.matmul(left.mT, blocks), right)
    return kernels.mode_products(blocks, [q.mT if back else q for q in bases], factored)


def rotate_chunked(
    blocks: torch.Tensor, bases: Sequence[torch.Tensor], factored: tuple[bool, ...], back: bool
) -> torch.Tensor:
    """:func:`rotate_stack` with ``bases`` as stored, maybe narrower than ``blocks`` (bfloat16):
    on the CPU widened chunk by chunk of rows (:func:`.compact.chunk_rows`) into scratch used
    while in cache, no float32 copy of a whole stack (the same products row by row)."""
    n, dtype = blocks.shape[0], blocks.dtype
    rows = min((compact.chunk_rows(b) for b in bases), default=n)
    if rows >= n or all(b.dtype == dtype for b in bases):
        return rotate_stack(blocks, [b.to(dtype) for b in bases], factored, back)
    out = blocks.new_empty(blocks.shape)
    wide = [blocks.new_empty((rows, *b.shape[1:])) for b in bases]
    for start in range(0, n, rows):
        chunk, size = slice(start, start + rows), min(rows, n - start)
        made = [w[:size].copy_(b[chunk]) for w, b in zip(wide, bases)]
        out[chunk] = rotate_stack(blocks[chunk], made, factored, back)
    return out


def _along(blocks: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """blocks (n, *block) with block dim ``dim`` contracted with the first index of ``matrix``
    (n, d, d): out[.., a, ..] = Σ_k matrix[k, a] · blocks[.., k, ..]."""
    moved = blocks.movedim(1 + dim, -1)
    shape = moved.shape
    out = torch.matmul(moved.reshape(shape[0], -1, shape[-1]), matrix).view(shape)
    return out.movedim(-1, 1 + dim)


def change_basis(
    moments: dict[str, torch.Tensor],
    member: Member,
    block_shape: tuple[int, ...],
    dim: int,
    old: torch.Tensor,
    new: torch.Tensor,
    first: torch.Tensor | None = None,
) -> None:
    """Move a parameter's moments (its blocks of one bucket) from the bases ``old`` to ``new``
    (count, d, d) along block dim ``dim``: ``exp_avg`` exactly; ``graft_v`` (Adam's second
    moment) as a diagonal where ``first`` (count,) flags a block's first basis, else kept
    (docs/design.md, "SOAP"). A row whose basis did not change (a failed solve) is left alone."""
    work = torch.promote_types(old.dtype, torch.float32)  # (bfloat16 bases: float32 math)
    old, new = old.to(work), new.to(work)
    eye = torch.eye(old.shape[-1], dtype=work, device=old.device)
    kept = (old == new).flatten(1).all(1).view(-1, 1, 1)  # a failed basis: exactly no change
    overlap = torch.where(kept, eye, torch.matmul(old.mT, new))
    pairs = [("exp_avg", overlap)]
    if first is not None:  # (None when no row is a first basis: no sync)
        squared = overlap * overlap
        pairs.append(("graft_v", torch.where(first.view(-1, 1, 1), squared, eye)))
    for key, matrix in pairs:
        moment = moments.get(key)
        if moment is None:
            continue
        view = member.view(moment, block_shape)
        blocks = view.reshape(len(member.blocks), *block_shape)
        moved = _along(blocks.to(work), dim, matrix.to(work))  # (rounded to nearest on write)
        view.copy_(moved.reshape(view.shape))


def refresh(bases: torch.Tensor, factors: torch.Tensor) -> None:
    """One power iteration from the installed ``bases`` with the current ``factors`` (n, d, d):
    Q ← orth(F Q), from the largest eigenvalue's column down, each column keeping its direction.
    On the device, in the state dtype; a row that turns non-finite keeps its basis."""
    work = torch.promote_types(bases.dtype, torch.float32)  # (bfloat16 state: float32 math)
    q = kernels.power_step(bases, factors)
    finite = torch.isfinite(q).flatten(1).all(1).view(-1, 1, 1)
    bases.copy_(torch.where(finite, q, bases.to(work)))


def rotate(
    units: list[Unit], buckets: list[Bucket], stacked: dict[int, Unit], attr: str, back: bool
) -> None:
    """Rotate the tensor ``attr`` (``"g"``, ``"direction"``) of every unit into its blocks'
    bases (``back``: out of them), per bucket; blocks without a basis yet keep their values."""
    shares = bucketed.PerBucket(units, buckets, stacked)
    for share in shares:
        if not share.bucket.roots:
            continue  # no factored dim: nothing to rotate
        x = share.stack(lambda u: getattr(u, attr))
        if share.flags is not None and not any(share.flags):
            if share.unit is None:  # a single unit's other buckets may rotate theirs
                shares.put(share, x)
            continue
        result = rotate_chunked(x, share.roots(), share.bucket.factored, back)
        shares.put(share, share.select(result, x))
    for unit, result in shares.results():  # after every bucket has read the units' tensors
        setattr(unit, attr, result)


def step_units(
    units: list[Unit],
    buckets: list[Bucket],
    stacked: dict[int, Unit],
    roots_of_this_step: Callable[[], None],
) -> None:
    """One eigenvalue-corrected step of every unit, in the order of :class:`~torch_shampoo.SOAP`."""
    for u in units:
        u.g = per_unit.gradient(u)
    bucketed.statistics(units, buckets, stacked, keep_gradients=True)
    roots_of_this_step()  # a first basis is installed (the moments moved into it) now
    rotate(units, buckets, stacked, "g", back=False)
    per_unit.widen(units)  # (bfloat16 state: float32 copies of the moments, after any moved)
    for u in units:
        per_unit.update_moments(u)
        u.g = None
        per_unit.directions(u)
    rotate(units, buckets, stacked, "direction", back=True)
    for u in units:
        per_unit.update_parameters(u, None)
    per_unit.narrow(units)
