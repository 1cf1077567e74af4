"""Compact state: a block's factor and root, both symmetric, in one (d + 1, d) tensor.

With ``compact_state=True`` a bucket keeps, per factored dim, one ``(n, d + 1, d)`` stack ``S``
and two overlapping ``(n, d, d)`` views of it, whose triangles are disjoint and fill ``S``::

    factors = S[:, 1:, :]    valid on and below the diagonal (F[i, j] = S[i + 1, j], j <= i)
    roots   = S[:, :d, :]    valid on and above the diagonal (X[i, j] = S[i, j],     j >= i)

Readers take full matrices (:func:`full`), writers write their own triangle (:func:`write`). The
step does both by chunks of rows (:func:`chunk_rows`): a chunk's new matrices are made in a
scratch that stays in cache, used (a product, a write) and overwritten by the next chunk's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CHUNK_BYTES", "TILE", "TILED", "Triangles", "chunk_rows", "full", "pack", "write"]

TILED = 1024
"""Matrices of this many rows or more go by ``TILE``² tiles, the same numbers: a mirrored read
of rows 4 KiB apart ran 4.5× slower than by tiles (38 ms against 8 ms at 2048)."""
TILE = 256

CHUNK_BYTES = 2**19
"""On the CPU at one intra-op thread the step reads and writes compact stacks by chunks of this
many bytes of matrices (at least one): made, used and overwritten in a core's cache, the full
matrices of a whole stack never go to memory. MLP 512-1024-1024-512, block 128, 1 thread, load
~5 on 2 cores: the non-root step 1.04–1.13× of full matrices' (1.26–1.32× in one chunk). At 2
threads on that loaded machine each chunk's ops waited on their threads: 2.2× (1.15× in one
chunk), so several threads keep one chunk per stack."""


def chunk_rows(view: torch.Tensor) -> int:
    """Rows of a stack (n, …) per chunk: ``CHUNK_BYTES`` of them, at least one; all of them on a
    GPU (no cache to keep them in, one launch per stack) or at several intra-op threads."""
    n = view.shape[0]
    if view.device.type != "cpu" or n == 0 or torch.get_num_threads() > 1:
        return max(n, 1)
    return max(1, min(n, CHUNK_BYTES // (view[0].numel() * view.element_size())))


class Triangles:
    """The masks of one size and device: ``lower`` (j <= i) for factors, ``upper`` for roots."""

    def __init__(self, d: int, device: torch.device):
        ones = torch.ones(d, d, dtype=torch.bool, device=device)
        self.lower = ones.tril()
        self.upper = ones.triu()


def pack(
    factors: Sequence[torch.Tensor], roots: Sequence[torch.Tensor], triangles: Triangles
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor and root views of a new ``(n, d + 1, d)`` stack of the lower triangles of
    ``factors`` and the upper ones of ``roots``, written row by row (no full copy on the way)."""
    n, d = len(factors), factors[0].shape[-1]
    stack = factors[0].new_zeros((n, d + 1, d))
    lower, upper = stack[:, 1:, :], stack[:, :d, :]
    for row, (factor, root) in enumerate(zip(factors, roots)):
        write(lower[row], factor, triangles.lower, upper=False)
        write(upper[row], root, triangles.upper, upper=True)
    return lower, upper


def _tiles(d: int) -> list[tuple[slice, slice, int]]:
    """The (rows, cols, side) of a d×d matrix's tiles; side -1 below the diagonal, 0 on, 1 above."""
    edges = range(0, d, TILE)
    return [
        (slice(i, i + TILE), slice(j, j + TILE), (j > i) - (j < i)) for i in edges for j in edges
    ]


def full(
    view: torch.Tensor,
    mask: torch.Tensor,
    upper: bool,
    out: torch.Tensor | None = None,
    through: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric matrices (…, d, d) whose triangle ``mask`` (``upper``/lower) is ``view``'s: new,
    or written into ``out``; ``through``: a buffer of ``view``'s shape it is first copied into
    (read from memory in order, its mirror then from the cache)."""
    d, n = view.shape[-1], view.shape[0]
    if d < TILED:
        rows = chunk_rows(view) if view.dim() == 3 and through is None else n
        if rows < n:  # chunk by chunk, each through one buffer
            out = view.new_empty(view.shape) if out is None else out
            buffer = view.new_empty((rows, d, d))
            for start in range(0, n, rows):
                into = out[start : start + rows]
                full(view[start : start + rows], mask, upper, into, buffer[: len(into)])
            return out
        if through is not None:
            view = through.copy_(view)
        return torch.where(mask, view, view.mT, out=out)
    out = view.new_empty(view.shape) if out is None else out
    for band, cols, side in _tiles(d):
        tile = out[..., band, cols]
        if side == 0:
            torch.where(mask[band, cols], view[..., band, cols], view[..., cols, band].mT, out=tile)
        elif (side > 0) == upper:
            tile.copy_(view[..., band, cols])
        else:
            tile.copy_(view[..., cols, band].mT)
    return out


def write(view: torch.Tensor, new: torch.Tensor, mask: torch.Tensor, upper: bool) -> None:
    """Write ``new`` into the triangle ``mask`` (``upper`` or lower) of ``view``, only there."""
    d, new = view.shape[-1], new.to(view.dtype)  # (as copy_ would: a checkpoint's float64)
    if d < TILED:
        torch.where(mask, new, view, out=view)
        return
    for rows, cols, side in _tiles(d):
        tile = view[..., rows, cols]
        if side == 0:
            torch.where(mask[rows, cols], new[..., rows, cols], tile, out=tile)
        elif (side > 0) == upper:
            tile.copy_(new[..., rows, cols])
