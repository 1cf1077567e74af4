"""Compact state: a block's factor and root, both symmetric, in one (d + 1, d) tensor.

A factor F and its inverse root X are symmetric, so each is known from one triangle. With
``compact_state=True`` a bucket keeps, per factored dim, one ``(n, d + 1, d)`` stack ``S`` and
two overlapping ``(n, d, d)`` views of it::

    factors = S[:, 1:, :]    valid on and below the diagonal (F[i, j] = S[i + 1, j], j <= i)
    roots   = S[:, :d, :]    valid on and above the diagonal (X[i, j] = S[i, j],     j >= i)

The two triangles are disjoint and together fill ``S``: the factor and the root of a block take
d(d + 1) numbers instead of 2d². The rest of the library sees the same ``(n, d, d)`` stacks as
without packing and goes through two functions: what reads a factor or a root takes its full
matrix (:func:`full`: one ``torch.where`` with the mirrored view), and what writes one writes
its own triangle only (:func:`write`). The statistics' product is computed as before and its lower
triangle kept, so a factor's lower triangle holds the same numbers as an unpacked factor's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Triangles", "full", "pack", "write"]


class Triangles:
    """The boolean masks of one block size and device: ``lower`` (j <= i) for factors,
    ``upper`` (j >= i) for roots."""

    def __init__(self, d: int, device: torch.device):
        ones = torch.ones(d, d, dtype=torch.bool, device=device)
        self.lower = ones.tril()
        self.upper = ones.triu()


def pack(
    factors: Sequence[torch.Tensor], roots: Sequence[torch.Tensor], triangles: Triangles
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor and root views of a new ``(n, d + 1, d)`` stack that holds the lower
    triangles of the n ``factors`` and the upper triangles of the n ``roots`` (each (d, d));
    written row by row, so that no full copy of either exists on the way."""
    n, d = len(factors), factors[0].shape[-1]
    stack = factors[0].new_zeros((n, d + 1, d))
    lower, upper = stack[:, 1:, :], stack[:, :d, :]
    for row, (factor, root) in enumerate(zip(factors, roots)):
        write(lower[row], factor, triangles.lower)
        write(upper[row], root, triangles.upper)
    return lower, upper


def full(view: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The symmetric matrices (…, d, d) whose triangle ``mask`` is ``view``'s (a new tensor)."""
    return torch.where(mask, view, view.mT)


def write(view: torch.Tensor, new: torch.Tensor, mask: torch.Tensor) -> None:
    """``view`` takes ``new``'s entries where ``mask`` (broadcast) is True and keeps the rest
    (the other matrix's triangle)."""
    view.copy_(torch.where(mask, new, view))
