"""compact_state=True: each block's factor and root, both symmetric, kept as the two triangles of
one (d + 1, d) tensor. The rule is the same (the float64 reference covers it pairwise with the
other options in test_reference.py); here: the memory it holds, bitwise equivalences
(async ≡ sync, resume, the guard, full matrices' lower triangles), checkpoints both ways."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import (
    assert_bitwise_equal,
    checkpoints_across,
    make_batches,
    mixed_model,
    params_of,
    saved_and_loaded,
    train,
)

from torch_shampoo import SOAP, NGPlus, Shampoo
from torch_shampoo.layout import compact as storage
from torch_shampoo.telemetry import held_bytes
from torch_shampoo.update import kernels

BASE: dict[str, Any] = dict(
    lr=0.01, block_size=4, momentum=0.5, precondition_frequency=3, epsilon=1e-4,
    stagger_roots=False,
)


def run(steps: int, **kwargs: Any) -> list[torch.Tensor]:
    model = mixed_model()
    with Shampoo(model.parameters(), **{**BASE, **kwargs}) as opt:
        train(model, opt, make_batches(steps))
    return params_of(model)


def test_a_factor_and_its_root_take_d_plus_one_rows_of_d() -> None:
    """A (8, 6) parameter at block 8 (one block, two factors): exp_avg and graft_v (48 floats
    each), one (9, 8) and one (7, 6) tensor for the two factors and their roots, and the same
    small entries as with full matrices (test_root_schedule's closed form)."""
    param = torch.nn.Parameter(torch.randn(8, 6))
    with Shampoo([param], block_size=8, async_roots=False, compact_state=True) as opt:
        param.grad = torch.randn(8, 6)
        opt.step()
        stats = opt.root_stats()
    expected = 4 * (2 * 48 + 9 * 8 + 7 * 6) + 4 + 2 * 8 + 2 + 8 + 3 * 8 + 2
    assert stats["state_bytes"] == expected


def test_the_held_bytes_count_each_storage_once() -> None:
    stack = torch.zeros(3, 5, 4)
    views = {"a": [stack[0], stack[1]], "b": (stack[:, 1:, :], stack[:, :4, :])}
    assert held_bytes(views) == stack.nbytes
    assert held_bytes([stack, torch.zeros(2)]) == stack.nbytes + 8


@pytest.mark.parametrize("upper", [False, True])
def test_wide_matrices_by_tiles_give_the_same_full_matrices_and_writes(
    monkeypatch: pytest.MonkeyPatch, upper: bool
) -> None:
    """Matrices of TILED rows or more go tile by tile (tiles of 3 here, ragged at 7): the full
    matrices are the triangle and its mirror, and a write changes that triangle alone."""
    monkeypatch.setattr(storage, "TILED", 5)
    monkeypatch.setattr(storage, "TILE", 3)
    gen = torch.Generator().manual_seed(0)
    view, new = (torch.randn(2, 7, 7, generator=gen) for _ in range(2))
    ones = torch.ones(7, 7, dtype=torch.bool)
    mask = ones.triu() if upper else ones.tril()
    kept = view.triu() if upper else view.tril()
    expected = kept + (kept.mT.tril(-1) if upper else kept.mT.triu(1))
    assert torch.equal(storage.full(view, mask, upper=upper), expected)
    written = view.clone()
    storage.write(written, new, mask, upper=upper)
    assert torch.equal(written, torch.where(mask, new, view))


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 12), rows=st.integers(1, 3), upper=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    stacked=st.booleans(), chunk_bytes=st.sampled_from([None, 1]),
)  # fmt: skip
def test_narrow_matrices_are_gathered_and_written_by_their_bits_exactly(
    d: int, rows: int, upper: bool, dtype: torch.dtype, stacked: bool, chunk_bytes: int | None
) -> None:
    """Below TILED rows a full matrix is gathered (``index_select``) and a write goes by the
    bits: both equal ``where`` with the mirror, also on a stack's (d + 1, d) views, chunk by
    chunk, and with non-finite values on either side of the diagonal."""
    gen = torch.Generator().manual_seed(d * 7 + rows)
    stack = torch.randn(rows, d + 1, d, generator=gen).to(dtype)
    stack.view(-1)[:: max(1, d)] = float("nan")  # (NaNs and infinities in both triangles)
    stack.view(-1)[1 :: max(2, d + 1)] = float("inf")
    view = (stack[:, :d, :] if upper else stack[:, 1:, :]) if stacked else stack[:, :d, :].clone()
    new = torch.randn(rows, d, d, generator=gen).to(dtype)
    new.view(-1)[:: max(3, d)] = -float("inf")
    ones = torch.ones(d, d, dtype=torch.bool)
    mask = ones.triu() if upper else ones.tril()
    expected = torch.where(mask, view, view.mT)
    with pytest.MonkeyPatch.context() as patch:
        if chunk_bytes is not None:
            patch.setattr(storage, "CHUNK_BYTES", chunk_bytes)
        assert same_bits(storage.full(view, mask, upper=upper), expected)
        assert same_bits(storage.full(view[0], mask, upper=upper), expected[0])
    before = stack.clone()
    expected_write = torch.where(mask, new, view)
    storage.write(view, new, mask, upper=upper)
    assert same_bits(view, expected_write)
    if stacked:  # (the other view's triangle, which shares the stack: untouched)
        other, was = ((s[:, 1:, :] if upper else s[:, :d, :]) for s in (stack, before))
        assert same_bits(other[:, mask.mT], was[:, mask.mT])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaNs included (``torch.equal`` finds a NaN equal to nothing)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    bits = [x.contiguous().view(as_int) for x in (a, b)]
    return a.dtype == b.dtype and torch.equal(*bits)


def test_tiled_compact_state_trains_bitwise_as_untiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same steps, roots and checkpoint with every factor (sizes 1 to 4) tiled (tiles of
    3, from 2 rows) as with none tiled."""
    untiled = run(9, compact_state=True, async_roots=False)
    monkeypatch.setattr(storage, "TILED", 2)
    monkeypatch.setattr(storage, "TILE", 3)
    assert_bitwise_equal(run(9, compact_state=True, async_roots=False), untiled)


@pytest.mark.parametrize("block_size", [4, 16])
def test_compact_state_by_chunks_of_one_row_trains_bitwise_as_in_one_chunk(
    monkeypatch: pytest.MonkeyPatch, block_size: int
) -> None:
    """Stacks read and written chunk by chunk (here of one row; block 16: products by BLAS, not
    the small-matrix loop) give the same steps, roots and checkpoint as in one chunk each."""
    kwargs = dict(compact_state=True, async_roots=False, block_size=block_size)
    whole = run(9, **kwargs)  # (small stacks: one chunk each)
    monkeypatch.setattr(storage, "CHUNK_BYTES", 1)
    assert_bitwise_equal(run(9, **kwargs), whole)


@pytest.mark.parametrize("block_size, chunk_bytes", [(4, None), (16, 1)])
@pytest.mark.parametrize("beta2", [0.99, 1.0])
def test_the_factors_lower_triangles_are_those_of_full_matrices_bitwise(
    monkeypatch: pytest.MonkeyPatch, beta2: float, block_size: int, chunk_bytes: int | None
) -> None:
    """Before the first root step (only statistics accumulate), a compact factor's lower
    triangle is bitwise the full-matrix factor's: the same product, its triangle kept (also
    chunk by chunk of one row, products by BLAS)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(storage, "CHUNK_BYTES", chunk_bytes)
    kwargs = dict(
        betas=(0.9, beta2), precondition_frequency=50, async_roots=False, block_size=block_size
    )
    models, states = [], []
    for compact in (False, True):
        model = mixed_model()
        opt = Shampoo(model.parameters(), **{**BASE, **kwargs}, compact_state=compact)
        train(model, opt, make_batches(6))
        models.append(params_of(model))
        states.append(opt.state_dict()["state"])
        opt.close()
    assert_bitwise_equal(*models)
    for full, compact in zip(states[0].values(), states[1].values()):
        for j, factor in full["factors"].items():
            assert torch.equal(compact["factors"][j].tril(), factor.tril())
            assert torch.equal(compact["factors"][j], compact["factors"][j].mT)  # symmetric


@pytest.mark.parametrize("frequency", [1, 3])
def test_async_roots_equal_sync_roots_delayed_by_the_same_staleness(frequency: int) -> None:
    common = dict(precondition_frequency=frequency, root_staleness=frequency, compact_state=True)
    assert_bitwise_equal(run(20, async_roots=True, **common), run(20, async_roots=False, **common))


@pytest.mark.parametrize("async_roots", [False, True])
def test_a_state_dict_with_roots_in_flight_resumes_bitwise(async_roots: bool) -> None:
    kwargs = {**BASE, "root_staleness": 2, "async_roots": async_roots, "compact_state": True}
    batches = make_batches(14)
    whole = mixed_model()
    with Shampoo(whole.parameters(), **kwargs) as opt:
        train(whole, opt, batches)
    model = mixed_model()
    with Shampoo(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:7])  # roots of step 6 in flight until step 8
        saved = saved_and_loaded(model, opt)  # (torch.save, torch.load(weights_only=True))
    assert any(int(s["pending_due"]) == 8 for s in saved["opt"]["state"].values())
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(saved["model"])
    with Shampoo(resumed_model.parameters(), **kwargs) as resumed:
        resumed.load_state_dict(saved["opt"])
        train(resumed_model, resumed, batches[7:])
    assert_bitwise_equal(params_of(resumed_model), params_of(whole))


def test_checkpoints_load_across_the_two_layouts() -> None:
    """A compact checkpoint holds full symmetric matrices: an optimizer with full matrices loads
    it and saves the same tensors; a full-matrix checkpoint loads into a compact optimizer,
    which keeps each factor's lower and each root's upper triangle (mirrored when saved)."""
    kwargs = {**BASE, "betas": (0.9, 1.0), "async_roots": False}

    def make(compact: bool) -> tuple[torch.nn.Module, Shampoo]:
        model = mixed_model()
        return model, Shampoo(model.parameters(), **kwargs, compact_state=compact)

    across = checkpoints_across(make, lambda model, opt: train(model, opt, make_batches(7)))
    for compact, before_states, after_states, _ in across:
        for before, after in zip(before_states.values(), after_states.values()):
            for key, keep in (("factors", torch.tril), ("roots", torch.triu)):
                for j, x in before[key].items():
                    mask = keep(torch.ones_like(x, dtype=torch.bool))
                    expected = x if compact else torch.where(mask, x, x.mT)
                    assert torch.equal(after[key][j], expected), (key, j)


def test_a_nonfinite_step_leaves_the_triangles_and_the_weights_as_they_were() -> None:
    model = mixed_model()
    with Shampoo(model.parameters(), **BASE, async_roots=False, compact_state=True) as opt:
        train(model, opt, make_batches(7))
        before = opt.state_dict()
        weights = params_of(model)
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        opt.step()
        after = opt.state_dict()
    assert_bitwise_equal(params_of(model), weights)
    for s, t in zip(before["state"].values(), after["state"].values()):
        for key in ("factors", "roots"):
            assert_bitwise_equal(list(s[key].values()), list(t[key].values()))


@pytest.mark.parametrize("front", [SOAP, NGPlus])
def test_fronts_without_symmetric_roots_refuse_it(front: type) -> None:
    with pytest.raises(TypeError, match=r"'compact_state': .* has no such setting"):
        front(mixed_model().parameters(), compact_state=True)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_value_other_than_true_false_or_auto_is_refused_naming_it(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"Invalid compact_state: {bad!r} \(valid choices"):
        Shampoo(mixed_model().parameters(), compact_state=bad)  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 9), rows=st.integers(1, 5), packed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), chunk_bytes=st.sampled_from([None, 1]),
)  # fmt: skip
def test_chunked_products_are_those_of_the_full_wide_roots(
    d: int, rows: int, packed: bool, dtype: torch.dtype, chunk_bytes: int | None
) -> None:
    """m̂ ×₁ X₁ ×₂ X₂ with roots as stored (compact triangles or full; float32 or bfloat16, made
    wide and full chunk by chunk, one row per chunk or all at once) equals, bitwise, the plain
    product of the mirrored roots cast to float32 (``where``, ``to``, ``bmm``), row by row."""
    gen = torch.Generator().manual_seed(d * 11 + rows)
    blocks = torch.randn(rows, d, d, generator=gen)
    stacks = [torch.randn(rows, d + 1, d, generator=gen).to(dtype) for _ in range(2)]
    views = [stacks[0][:, :d, :], stacks[1][:, 1:, :]] if packed else [
        s[:, :d, :].clone() for s in stacks]  # fmt: skip
    triangles = [storage.Triangles(d, blocks.device, root_upper=u) for u in (True, False)]
    ones = torch.ones(d, d, dtype=torch.bool)
    full = [torch.where(m, v, v.mT) for v, m in zip(views, (ones.triu(), ones.tril()))]
    wide = [x.to(torch.float32) if packed else v.to(torch.float32) for x, v in zip(full, views)]
    expected = torch.stack([wide[0][i] @ blocks[i] @ wide[1][i] for i in range(rows)])
    with pytest.MonkeyPatch.context() as patch:
        if chunk_bytes is not None:
            patch.setattr(storage, "CHUNK_BYTES", chunk_bytes)
        got = kernels.mode_products_chunked(
            blocks, views, triangles if packed else None, (True, True)
        )
    assert same_bits(got, expected)
