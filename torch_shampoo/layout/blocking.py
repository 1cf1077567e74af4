"""How a parameter becomes blocks, and how blocks become a parameter again.

A parameter of shape ``s`` is viewed as a tensor of a *merged* shape:

1. size-1 dims are dropped (a 0-d or all-ones tensor becomes ``(1,)``);
2. neighbouring dims are merged from the right while their product stays ≤ ``block_size``
   (a conv weight ``(64, 3, 3, 3)`` becomes ``(64, 27)``); several dims that would become one
   become ``(first dim, the rest)`` instead (``(64, 16)`` keeps factors of 64² and 16², not one
   of 1024² whose root costs ~4,000× the flops). ``merge="all"`` merges down to one dim (JAX's
   ``merge_small_dims``, Meta's ``merge_dims``); ``merge=False`` merges nothing;
3. every dim of at most ``max_factor_dim`` is cut into chunks of ``block_size`` (the last one
   smaller). A dim larger than ``max_factor_dim`` is *not factored*: it is left whole and gets no
   preconditioner (one-sided Shampoo; an embedding table's vocabulary side stays affordable).

Blocks are the cells of the resulting grid, in row-major order. For a contiguous tensor they are
views, so writing into a block writes into the tensor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MERGES",
    "BlockLayout",
    "block_layout",
    "block_sums",
    "expand_grid",
    "merge_blocks",
    "output_side_layout",
    "split_blocks",
]


@dataclass(frozen=True)
class BlockLayout:
    """The block grid of one parameter shape."""

    param_shape: tuple[int, ...]
    shape: tuple[int, ...]
    """The merged shape the blocks cut."""
    factored: tuple[bool, ...]
    """Per merged dim: does it get a preconditioner factor?"""
    offsets: tuple[tuple[int, ...], ...]
    """Per block: its start along each merged dim."""
    block_shapes: tuple[tuple[int, ...], ...]
    grid: tuple[tuple[int, ...], ...]
    """Per merged dim, the lengths of its chunks: block ``b`` is cell ``b`` (row-major) of the
    grid they cut. Every chunk of a dim has the same length except a shorter last one."""

    @property
    def num_blocks(self) -> int:
        return len(self.block_shapes)

    def factor_dims(self, block: int) -> list[int]:
        """Sizes of the factors of ``block``: one per factored dim, in dim order."""
        return [d for d, f in zip(self.block_shapes[block], self.factored) if f]


MERGES: tuple[bool | str, ...] = (True, False, "all")
"""The values of ``merge`` (a group's ``merge_dims``): see the module docstring."""


def merged_shape(
    shape: Sequence[int], block_size: int, merge: bool | str = True
) -> tuple[int, ...]:
    """The merged shape of ``shape``: rules 1 and 2 of the module docstring."""
    if merge not in MERGES:
        raise ValueError(f"merge_dims must be one of {MERGES}, got {merge!r}")
    if 0 in shape:
        return (0,)
    dims = [d for d in shape if d != 1]
    if not dims:
        return (1,)
    if merge is False:
        return tuple(dims)
    merged: list[int] = [dims[-1]]
    for d in reversed(dims[:-1]):
        if merged[0] * d <= block_size:
            merged[0] *= d
        else:
            merged.insert(0, d)
    if len(merged) == 1 and len(dims) > 1 and merge != "all":
        return (dims[0], merged[0] // dims[0])
    return tuple(merged)


def _chunks(size: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(block_size, size - start)) for start in range(0, size, block_size)]


def _layout(
    shape: Sequence[int], merged: tuple[int, ...], factored: tuple[bool, ...], block_size: int
) -> BlockLayout:
    """The grid that cuts every factored dim of ``merged`` into chunks of ``block_size``."""
    per_dim = [_chunks(d, block_size) if f else [(0, d)] for d, f in zip(merged, factored)]
    cells = list(itertools.product(*per_dim))
    return BlockLayout(
        param_shape=tuple(shape),
        shape=merged,
        factored=factored,
        offsets=tuple(tuple(start for start, _ in cell) for cell in cells),
        block_shapes=tuple(tuple(size for _, size in cell) for cell in cells),
        grid=tuple(tuple(size for _, size in chunks) for chunks in per_dim),
    )


def block_layout(
    shape: Sequence[int], block_size: int, max_factor_dim: int, merge: bool | str = True
) -> BlockLayout:
    """The block grid of a parameter of ``shape`` (see the module docstring)."""
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if max_factor_dim < 1:
        raise ValueError(f"max_factor_dim must be a positive integer, got {max_factor_dim!r}")
    merged = merged_shape(shape, block_size, merge)
    return _layout(shape, merged, tuple(0 < d <= max_factor_dim for d in merged), block_size)


def output_side_layout(shape: Sequence[int], block_size: int, vectors: bool) -> BlockLayout:
    """NG+'s grid: the parameter as a matrix (shape[0], rest) whose output dim alone is factored,
    cut into chunks of ``block_size``. A 1-D parameter is a column, factored only if ``vectors``;
    0-d and empty parameters get no factor."""
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    numel = math.prod(shape)
    if numel == 0 or len(shape) == 0 or (len(shape) == 1 and not vectors):
        return _layout(shape, (numel,), (False,), block_size)
    if len(shape) == 1:
        return _layout(shape, (numel,), (True,), block_size)
    return _layout(shape, (shape[0], numel // shape[0]), (True, False), block_size)


def split_blocks(tensor: torch.Tensor, layout: BlockLayout) -> list[torch.Tensor]:
    """The blocks of ``tensor`` (of ``layout.param_shape``); views if ``tensor`` is contiguous."""
    merged = tensor.reshape(layout.shape)
    return [
        merged[tuple(slice(start, start + length) for start, length in zip(offset, size))]
        for offset, size in zip(layout.offsets, layout.block_shapes)
    ]


def merge_blocks(blocks: Sequence[torch.Tensor], layout: BlockLayout) -> torch.Tensor:
    """The inverse of :func:`split_blocks`: a new tensor of ``layout.param_shape``."""
    if len(blocks) != layout.num_blocks:
        raise ValueError(f"expected {layout.num_blocks} blocks, got {len(blocks)}")
    out = blocks[0].new_empty(layout.shape) if blocks else torch.empty(layout.shape)
    for target, block in zip(split_blocks(out, layout), blocks):
        target.copy_(block)
    return out.reshape(layout.param_shape)


def _cells(layout: BlockLayout) -> tuple[list[int], list[int]]:
    """Per merged dim: the number of chunks and the (full) chunk length."""
    grid = layout.grid
    return [len(c) for c in grid], [c[0] if c else 0 for c in grid]


def block_sums(tensor: torch.Tensor, layout: BlockLayout, dtype: torch.dtype) -> torch.Tensor:
    """Σ over each block of ``tensor`` in ``dtype``, in the grid's shape: one reduction of the
    merged tensor, zero-padded to whole chunks, viewed as (n₁, c₁, n₂, c₂, …), over the c's."""
    merged = tensor.reshape(layout.shape)
    counts, lengths = _cells(layout)
    padding: list[int] = []
    for size, n, c in zip(layout.shape, counts, lengths):
        padding = [0, n * c - size, *padding]  # F.pad lists the last dim first
    if any(padding):
        merged = torch.nn.functional.pad(merged, padding)
    cells = [x for n, c in zip(counts, lengths) for x in (n, c)]
    return merged.reshape(cells).sum(dim=tuple(range(1, len(cells), 2)), dtype=dtype)


def expand_grid(grid: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """A tensor of ``layout.param_shape`` holding ``grid[cell]`` everywhere in that cell's block."""
    counts, lengths = _cells(layout)
    spread = grid.reshape([x for n in counts for x in (n, 1)])
    spread = spread.expand([x for n, c in zip(counts, lengths) for x in (n, c)])
    full = spread.reshape([n * c for n, c in zip(counts, lengths)])
    return full[tuple(slice(0, size) for size in layout.shape)].reshape(layout.param_shape)
