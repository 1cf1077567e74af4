"""Property tests for ``torch_shampoo.layout.blocking``: how a parameter is cut into blocks.

The claims, in the module docstring's words:

* the blocks exactly cover the merged tensor: every element is in exactly one block;
* along a factored dim, no block is longer than ``block_size``;
* a merged dim goes unfactored exactly when it is longer than ``max_factor_dim``;
* merging drops size-1 dims and merges neighbours from the right while the product stays
  ≤ ``block_size``;
* splitting then merging gives back the very same tensor, bit for bit, contiguous or not;
* the blocks of a contiguous tensor are views: writing into a block writes into the tensor.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_shampoo.layout.blocking import (
    BlockLayout,
    block_layout,
    block_sums,
    expand_grid,
    merge_blocks,
    output_side_layout,
    split_blocks,
)

MAX_DIM = 3000
MAX_BLOCKS = 512
"""Blocks per example. The layout is materialised block by block, so this bounds the work."""
MAX_ELEMENTS = 20_000
"""Elements per example, for the tests that build actual tensors."""


@st.composite
def shapes_and_block_sizes(
    draw: st.DrawFn, max_elements: int | None = None
) -> tuple[tuple[int, ...], int]:
    """A shape of 0 to 5 dims (each 1 … 3000, sometimes 0) and a block size (often the product of
    some trailing dims, where the merging rule's ≤ matters).

    Dims are drawn so that ∏ ceil(d / block_size) ≤ MAX_BLOCKS, which bounds the number of blocks
    whatever the merging does (a merged group of several dims fits in one block; a lone dim d
    gives ceil(d / block_size) chunks), and, if given, ∏ d ≤ max_elements.
    """
    block_size = draw(
        st.one_of(st.integers(1, 16), st.integers(1, 4096), st.sampled_from([8, 128, 1024]))
    )
    ndim = draw(st.integers(0, 5))
    shape: list[int] = []
    blocks = 1
    elements = 1
    for _ in range(ndim):
        largest = min(MAX_DIM, block_size * (MAX_BLOCKS // blocks))
        if max_elements is not None:
            largest = min(largest, max_elements // elements)
        largest = max(1, largest)
        dim = draw(
            st.one_of(st.just(1), st.integers(1, 16), st.integers(1, largest), st.just(largest))
        )
        shape.append(dim)
        blocks *= math.ceil(dim / block_size)
        elements *= dim
    at_boundary = draw(st.booleans())
    if shape and at_boundary:
        # The merge boundary: a block size equal to the product of some trailing dims.
        boundary = math.prod(shape[draw(st.integers(0, len(shape) - 1)) :])
        if math.prod(math.ceil(d / boundary) for d in shape) <= MAX_BLOCKS:
            block_size = boundary
    if shape and draw(st.integers(0, 9)) == 0:  # now and then, a zero-size tensor
        shape[draw(st.integers(0, len(shape) - 1))] = 0
    return tuple(shape), block_size


def max_factor_dims(shape: tuple[int, ...]) -> st.SearchStrategy[int]:
    """A max_factor_dim, often equal to a dim of ``shape`` or its neighbour (the boundary)."""
    near_dims = [d + delta for d in shape for delta in (-1, 0, 1) if d + delta >= 1]
    small_products = [math.prod(shape[i:]) for i in range(len(shape)) if math.prod(shape[i:]) > 0]
    candidates = near_dims + small_products
    anywhere = st.integers(1, 10_000)
    return st.one_of(anywhere, st.sampled_from(candidates)) if candidates else anywhere


layouts_of_any_size = shapes_and_block_sizes().flatmap(
    lambda sb: st.tuples(st.just(sb[0]), st.just(sb[1]), max_factor_dims(sb[0]))
)
layouts_of_small_tensors = shapes_and_block_sizes(MAX_ELEMENTS).flatmap(
    lambda sb: st.tuples(st.just(sb[0]), st.just(sb[1]), max_factor_dims(sb[0]))
)


def random_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random float32 values, with a -0.0 and a NaN mixed in (a bitwise comparison sees them)."""
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator)
    flat = tensor.view(-1)
    if flat.numel() >= 2:
        flat[0] = -0.0
        flat[-1] = float("nan")
    return tensor


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


# --- the blocks exactly cover the merged tensor ------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(layouts_of_any_size)
def test_blocks_tile_the_merged_shape_as_a_grid(case: tuple[tuple[int, ...], int, int]) -> None:
    """Each element in exactly one block, checked on shapes of up to 3000**5 elements.

    The blocks are boxes. Along each merged dim, the distinct (start, length) intervals must cut
    [0, size) into consecutive pieces; and the blocks must be every combination of one interval
    per dim, each once. Then every element lies in exactly one block.
    """
    shape, block_size, max_factor_dim = case
    layout = block_layout(shape, block_size, max_factor_dim)
    assert math.prod(layout.shape) == math.prod(shape)
    assert len(layout.offsets) == len(layout.block_shapes) == layout.num_blocks >= 1

    intervals_per_dim = []
    for dim, size in enumerate(layout.shape):
        intervals = sorted(
            {
                (off[dim], blk[dim])
                for off, blk in zip(layout.offsets, layout.block_shapes, strict=True)
            }
        )
        end = 0
        for start, length in intervals:
            assert start == end, f"dim {dim}: gap or overlap at {start}"
            end = start + length
        assert end == size, f"dim {dim}: intervals end at {end}, not {size}"
        intervals_per_dim.append(intervals)

    blocks = [
        tuple(zip(off, blk, strict=True))
        for off, blk in zip(layout.offsets, layout.block_shapes, strict=True)
    ]
    assert len(set(blocks)) == len(blocks), "a block appears twice"
    assert len(blocks) == math.prod(len(intervals) for intervals in intervals_per_dim)


@settings(max_examples=60, deadline=None)
@given(layouts_of_small_tensors)
def test_every_element_is_in_exactly_one_block(case: tuple[tuple[int, ...], int, int]) -> None:
    """Label every element with its index: the blocks together hold each label exactly once."""
    shape, block_size, max_factor_dim = case
    layout = block_layout(shape, block_size, max_factor_dim)
    labels = torch.arange(math.prod(shape)).reshape(shape)
    blocks = split_blocks(labels, layout)
    assert len(blocks) == layout.num_blocks
    for block, block_shape in zip(blocks, layout.block_shapes, strict=True):
        assert tuple(block.shape) == block_shape
    seen = torch.cat([block.reshape(-1) for block in blocks])
    assert torch.equal(seen.sort().values, torch.arange(math.prod(shape)))


# --- block sizes and factored dims ---------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(layouts_of_any_size)
def test_no_block_is_longer_than_block_size_along_a_factored_dim(
    case: tuple[tuple[int, ...], int, int],
) -> None:
    shape, block_size, max_factor_dim = case
    layout = block_layout(shape, block_size, max_factor_dim)
    for index, block_shape in enumerate(layout.block_shapes):
        for length, factored in zip(block_shape, layout.factored, strict=True):
            if factored:
                assert length <= block_size
        assert layout.factor_dims(index) == [
            length
            for length, factored in zip(block_shape, layout.factored, strict=True)
            if factored
        ]


@settings(max_examples=100, deadline=None)
@given(layouts_of_any_size)
def test_a_merged_dim_is_unfactored_iff_longer_than_max_factor_dim(
    case: tuple[tuple[int, ...], int, int],
) -> None:
    shape, block_size, max_factor_dim = case
    layout = block_layout(shape, block_size, max_factor_dim)
    assert len(layout.factored) == len(layout.shape)
    if 0 in shape:
        # A zero-size tensor has nothing to precondition: one empty, unfactored block.
        assert layout.shape == (0,)
        assert layout.factored == (False,)
        assert layout.block_shapes == ((0,),)
        return
    for size, factored in zip(layout.shape, layout.factored, strict=True):
        assert factored == (size <= max_factor_dim)
    for block_shape in layout.block_shapes:
        for size, length, factored in zip(layout.shape, block_shape, layout.factored, strict=True):
            if not factored:
                assert length == size, "an unfactored dim must stay whole"


# --- the merging rule ----------------------------------------------------------------------------


def test_merging_rule_examples() -> None:
    def merged(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
        return block_layout(shape, block_size, max_factor_dim=10**9).shape

    assert merged((64, 3, 3, 3), 1024) == (64, 27)  # a conv weight
    assert merged((), 1024) == (1,)  # a scalar
    assert merged((1, 1, 1), 1024) == (1,)  # all ones
    assert merged((1, 7, 1), 1024) == (7,)
    assert merged((32, 1, 32, 1), 1024) == (32, 32)  # a small matrix keeps its two factors
    assert merged((16, 1, 3, 3), 1024) == (16, 9)  # ... and a small conv kernel two
    assert merged((32, 33), 1024) == (32, 33)
    assert merged((3000,), 8) == (3000,)  # a long dim is kept whole; chunking comes later
    assert merged((5, 4, 3, 2), 12) == (5, 4, 6)  # merged from the right, not from the left
    assert merged((4, 0, 3), 1024) == (0,)

    def merged_as(shape: tuple[int, ...], block_size: int, merge: bool | str) -> tuple[int, ...]:
        return block_layout(shape, block_size, max_factor_dim=10**9, merge=merge).shape

    assert merged_as((32, 1, 32, 1), 1024, "all") == (1024,)  # JAX's and Meta's rule: 1-D
    assert merged_as((32, 33), 1024, "all") == (32, 33)  # one more element: not merged
    assert merged_as((64, 3, 3, 3), 1024, "all") == (64, 27)
    assert merged_as((64, 1, 3, 3), 1024, False) == (64, 3, 3)
    with pytest.raises(ValueError, match="merge_dims must be one of"):
        merged_as((4, 4), 1024, "yes")


@settings(max_examples=100, deadline=None)
@given(layouts_of_any_size, st.sampled_from([True, "all", False]))
def test_merging_drops_size_one_dims_and_merges_greedily_from_the_right(
    case: tuple[tuple[int, ...], int, int], merge: bool | str
) -> None:
    """The merged shape is the size>1 dims cut into consecutive groups, multiplied out, with:

    * a group of several dims has a product ≤ block_size;
    * a group could not take one more dim from its left: (that dim) × (group) > block_size.

    Because every size>1 dim is ≥ 2, these pin down the greedy right-to-left merge uniquely.
    The exceptions: with ``merge=True`` dims whose product is ≤ block_size become (first dim,
    the rest), not one dim; with ``merge=False`` nothing merges.
    """
    shape, block_size, max_factor_dim = case
    merged = block_layout(shape, block_size, max_factor_dim, merge).shape
    if 0 in shape:
        return  # covered by the zero-size case of the factored-dims test
    dims = [d for d in shape if d != 1]
    if not dims:
        assert merged == (1,)
        return
    if merge is False:
        assert merged == tuple(dims)
        return
    if math.prod(dims) <= block_size:
        if merge == "all" or len(dims) == 1:
            assert merged == (math.prod(dims),), "≤ block_size elements must become 1-D"
        else:
            assert merged == (dims[0], math.prod(dims[1:])), "several dims must keep two"
        return

    groups: list[list[int]] = []
    remaining = list(dims)
    for size in merged:
        group: list[int] = []
        while remaining and math.prod(group) < size:
            group.append(remaining.pop(0))
        assert math.prod(group) == size, f"{merged} is not {dims} merged in groups"
        groups.append(group)
    assert not remaining, f"{merged} leaves dims of {dims} out"

    for group in groups:
        if len(group) > 1:
            assert math.prod(group) <= block_size
    for left, right in itertools.pairwise(groups):
        assert left[-1] * math.prod(right) > block_size, f"{left[-1]} could join {right}"


@settings(max_examples=100, deadline=None)
@given(layouts_of_any_size, st.data())
def test_size_one_dims_do_not_change_the_layout(
    case: tuple[tuple[int, ...], int, int], data: st.DataObject
) -> None:
    shape, block_size, max_factor_dim = case
    padded = list(shape)
    for _ in range(data.draw(st.integers(1, 3))):
        padded.insert(data.draw(st.integers(0, len(padded))), 1)
    plain = block_layout(shape, block_size, max_factor_dim)
    with_ones = block_layout(tuple(padded), block_size, max_factor_dim)
    assert with_ones.shape == plain.shape
    assert with_ones.factored == plain.factored
    assert with_ones.offsets == plain.offsets
    assert with_ones.block_shapes == plain.block_shapes


# --- split and merge -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(layouts_of_small_tensors, st.integers(0, 2**31 - 1))
def test_split_then_merge_is_the_bitwise_identity(
    case: tuple[tuple[int, ...], int, int], seed: int
) -> None:
    shape, block_size, max_factor_dim = case
    layout = block_layout(shape, block_size, max_factor_dim)
    tensor = random_tensor(shape, seed)
    restored = merge_blocks(split_blocks(tensor, layout), layout)
    assert restored.shape == tensor.shape
    assert restored.dtype == tensor.dtype
    assert torch.equal(bits(restored), bits(tensor))


@settings(max_examples=60, deadline=None)
@given(layouts_of_small_tensors, st.integers(0, 2**31 - 1), st.data())
def test_split_then_merge_is_the_bitwise_identity_for_non_contiguous_tensors(
    case: tuple[tuple[int, ...], int, int], seed: int, data: st.DataObject
) -> None:
    """A tensor of the right shape seen through a permutation and a stride-2 slice."""
    shape, block_size, max_factor_dim = case
    layout = block_layout(shape, block_size, max_factor_dim)
    order = data.draw(st.permutations(range(len(shape))))
    stored_shape = [shape[i] for i in order]
    if stored_shape:
        stored_shape[-1] *= 2
    storage = random_tensor(tuple(stored_shape), seed)
    if stored_shape:
        storage = storage[..., ::2]
    # storage is laid out in ``order``; permute it back so that it has ``shape``.
    tensor = storage.permute([order.index(i) for i in range(len(shape))])
    assert tuple(tensor.shape) == shape

    restored = merge_blocks(split_blocks(tensor, layout), layout)
    assert restored.shape == tensor.shape
    assert torch.equal(bits(restored), bits(tensor))


def test_split_then_merge_of_a_transposed_matrix() -> None:
    tensor = torch.randn(40, 30).t()  # (30, 40), not contiguous
    assert not tensor.is_contiguous()
    layout = block_layout(tensor.shape, block_size=16, max_factor_dim=35)
    assert layout.factored == (True, False)  # 30 ≤ 35 < 40
    restored = merge_blocks(split_blocks(tensor, layout), layout)
    assert torch.equal(bits(restored), bits(tensor))


@settings(max_examples=60, deadline=None)
@given(layouts_of_small_tensors)
def test_blocks_of_a_contiguous_tensor_are_views(case: tuple[tuple[int, ...], int, int]) -> None:
    """Write k + 1 into block k through the block alone: the tensor then holds every label."""
    shape, block_size, max_factor_dim = case
    layout = block_layout(shape, block_size, max_factor_dim)
    tensor = torch.zeros(shape, dtype=torch.int64)
    for label, block in enumerate(split_blocks(tensor, layout), start=1):
        block.fill_(label)
    counts = torch.bincount(tensor.reshape(-1), minlength=layout.num_blocks + 1)
    assert counts[0] == 0, "some element was not written through any block"
    assert counts[1:].tolist() == [math.prod(b) for b in layout.block_shapes]
    # And the blocks read back what the tensor now holds.
    for label, block in enumerate(split_blocks(tensor, layout), start=1):
        assert bool((block == label).all())


@pytest.mark.parametrize("block_size", [1, 5, 1024])
def test_writing_into_one_block_changes_only_that_part_of_the_tensor(block_size: int) -> None:
    tensor = torch.zeros(7, 11, 3)
    layout = block_layout(tensor.shape, block_size, max_factor_dim=8)
    blocks = split_blocks(tensor, layout)
    last = blocks[-1]
    last.add_(1.0)
    assert tensor.sum().item() == last.numel() > 0
    assert bool((merge_blocks(blocks, layout) == tensor).all())


def _either_layout(case: tuple[tuple[int, ...], int, int], one_sided: bool) -> BlockLayout:
    """Shampoo's merged grid, or NG+'s output-side grid, of the same shape."""
    shape, block_size, max_factor_dim = case
    if one_sided:
        return output_side_layout(shape, block_size, vectors=True)
    return block_layout(shape, block_size, max_factor_dim)


@settings(deadline=None)
@given(layouts_of_small_tensors, st.integers(0, 2**31 - 1), st.booleans())
def test_block_sums_are_the_sums_of_the_blocks_in_block_order(
    case: tuple[tuple[int, ...], int, int], seed: int, one_sided: bool
) -> None:
    """One padded reduction gives what summing every block of split_blocks gives."""
    shape = case[0]
    layout = _either_layout(case, one_sided)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert list(itertools.product(*layout.grid)) == list(layout.block_shapes)  # the grid's cells
    sums = block_sums(x, layout, torch.float64)
    assert sums.dtype == torch.float64
    assert sums.shape == tuple(len(chunks) for chunks in layout.grid)
    expected = [block.sum(dtype=torch.float64) for block in split_blocks(x, layout)]
    torch.testing.assert_close(sums.flatten(), torch.stack(expected), rtol=1e-12, atol=1e-12)


@settings(deadline=None)
@given(layouts_of_small_tensors, st.booleans())
def test_expand_grid_fills_each_block_with_its_cell(
    case: tuple[tuple[int, ...], int, int], one_sided: bool
) -> None:
    shape = case[0]
    layout = _either_layout(case, one_sided)
    grid = torch.arange(layout.num_blocks).reshape([len(chunks) for chunks in layout.grid])
    full = expand_grid(grid, layout)
    assert full.shape == tuple(shape)
    for b, block in enumerate(split_blocks(full.contiguous(), layout)):
        assert bool((block == b).all())


def test_a_small_weight_keeps_its_two_factors_in_the_optimizer() -> None:
    """At the default block size a 64×16 weight (1024 elements) gets factors of 64² and 16²,
    not one of 1024² (``merge_dims="all"``, the rule of JAX's and Meta's Shampoo)."""
    from torch_shampoo import Shampoo

    weight = torch.nn.Parameter(torch.randn(64, 16))
    shapes = {}
    for merge in (True, "all"):
        weight.grad = torch.randn(64, 16)
        with Shampoo([weight], merge_dims=merge, async_roots=False) as opt:
            opt.step()
            shapes[merge] = [tuple(f.shape) for f in opt.state[weight]["factors"]]
    assert shapes == {True: [(64, 64), (16, 16)], "all": [(1024, 1024)]}
