"""compact_state=True with state_dtype=torch.bfloat16: a square block's two dims are paired, one
(d + 1, d) float32 stack for both factors (dim 0 keeps its lower triangle, dim 1 its upper) and
one bfloat16 stack for both roots, the same way (layout.compact.pairs). Other blocks keep each
factor with its root. Here: the bytes, the triangles against full matrices' bitwise (also with
a bucket that steps in part), closeness to full bfloat16 state once roots exist, async ≡ sync,
resume, and checkpoints across the two layouts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import (
    assert_bitwise_equal,
    checkpoints_across,
    make_batches,
    mixed_model,
    params_of,
    saved_and_loaded,
    train,
)

from torch_shampoo import Shampoo
from torch_shampoo.layout import compact

BASE: dict[str, Any] = dict(
    lr=0.01, block_size=4, momentum=0.5, precondition_frequency=3, epsilon=1e-4,
    stagger_roots=False, state_dtype=torch.bfloat16,
)


def test_a_square_blocks_factors_and_roots_take_two_stacks_one_of_them_bfloat16() -> None:
    """An (8, 8) parameter at block 8: one (9, 8) float32 stack for both factors, one (9, 8)
    bfloat16 stack for both roots, bfloat16 moments (64 each), and the same small entries as
    test_compact_state's (8, 6) parameter, which has two factors too."""
    param = torch.nn.Parameter(torch.randn(8, 8))
    with Shampoo([param], block_size=8, async_roots=False, compact_state=True,
                 state_dtype=torch.bfloat16) as opt:  # fmt: skip
        param.grad = torch.randn(8, 8)
        opt.step()
        state, stats = opt.state[param], opt.root_stats()
    assert [r.dtype for r in state["roots"]] == [torch.bfloat16] * 2
    assert [compact.keeps_upper(f) for f in state["factors"]] == [False, True]
    assert [compact.keeps_upper(r) for r in state["roots"]] == [False, True]
    assert state["factors"][0].untyped_storage().nbytes() == 9 * 8 * 4
    assert state["roots"][1].untyped_storage().nbytes() == 9 * 8 * 2
    small = 4 + 2 * 8 + 2 + 8 + 3 * 8 + 2
    assert stats["state_bytes"] == 2 * 2 * 64 + 9 * 8 * 4 + 9 * 8 * 2 + small


def square_model() -> torch.nn.Sequential:
    """Two (8, 8) weights (four 4×4 blocks each at block 4: one bucket, paired) between an
    (8, 6) and a (3, 8) one (4×3 and 3×4 blocks: unpaired)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3),
    )


def _train_sometimes_without_one(
    model: torch.nn.Sequential, opt: Shampoo, steps: int, skips: bool = True
) -> None:
    """Train; every third step (``skips``) the second (8, 8) weight has no gradient, and the step
    takes the first one's rows of their bucket alone (``Bucket.rows``)."""
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(16, 6, generator=generator), torch.randint(3, (16,), generator=generator)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if skips and step % 3 == 1:
            model[4].weight.grad = None
        opt.step()


@pytest.mark.parametrize("beta2", [0.99, 1.0])
def test_paired_factors_keep_the_triangles_of_full_matrices_bitwise(beta2: float) -> None:
    """Before the first root step: the same weights, and each factor's kept triangle (dim 0's
    lower, dim 1's upper for square blocks; the lower one for the others) bitwise the full
    bfloat16 state's, with steps where one member of a bucket has no gradient."""
    kwargs = {**BASE, "betas": (0.9, beta2), "precondition_frequency": 50, "async_roots": False}
    models, states, orientation = [], [], []
    for packed in (False, True):
        model = square_model()
        with Shampoo(model.parameters(), **kwargs, compact_state=packed) as opt:
            _train_sometimes_without_one(model, opt, 7)
            models.append(params_of(model))
            states.append(opt.state_dict()["state"])
            if packed:
                orientation = [[compact.keeps_upper(f) for f in opt.state[p]["factors"]]
                               for p in model.parameters()]  # fmt: skip
    assert_bitwise_equal(*models)
    assert any(True in dims for dims in orientation)  # (some blocks are paired)
    for full, packed, uppers in zip(states[0].values(), states[1].values(), orientation):
        for j, factor in full["factors"].items():
            keep = torch.triu if uppers[int(j)] else torch.tril
            assert torch.equal(keep(packed["factors"][j]), keep(factor)), j
            assert torch.equal(packed["factors"][j], packed["factors"][j].mT)


def test_paired_state_trains_as_full_bfloat16_state_up_to_the_mirrored_triangles() -> None:
    """With roots: dim 1's roots are solved from its mirrored upper triangle, whose last bits
    differ from the full matrix's lower one, and unpaired blocks keep float32 roots (with their
    float32 factor), so the weights agree closely, not bitwise."""
    results = []
    for packed in (False, True):
        model = square_model()
        with Shampoo(model.parameters(), **BASE, async_roots=False, compact_state=packed) as opt:
            _train_sometimes_without_one(model, opt, 12)
        results.append(params_of(model))
    for full, packed in zip(*results):
        torch.testing.assert_close(packed, full, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("frequency", [1, 3])
def test_async_roots_equal_sync_roots_delayed_by_the_same_staleness(frequency: int) -> None:
    common = dict(precondition_frequency=frequency, root_staleness=frequency, compact_state=True)
    results = []
    for async_roots in (True, False):
        model = mixed_model()
        with Shampoo(model.parameters(), **{**BASE, **common}, async_roots=async_roots) as opt:
            train(model, opt, make_batches(15))
        results.append(params_of(model))
    assert_bitwise_equal(*results)


def test_a_state_dict_with_roots_in_flight_resumes_bitwise() -> None:
    kwargs = {**BASE, "root_staleness": 2, "compact_state": True}
    batches = make_batches(14)
    whole = mixed_model()
    with Shampoo(whole.parameters(), **kwargs) as opt:
        train(whole, opt, batches)
    model = mixed_model()
    with Shampoo(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:7])
        saved = saved_and_loaded(model, opt)
    resumed_model = mixed_model()
    resumed_model.load_state_dict(saved["model"])
    with Shampoo(resumed_model.parameters(), **kwargs) as resumed:
        resumed.load_state_dict(saved["opt"])
        train(resumed_model, resumed, batches[7:])
    assert_bitwise_equal(params_of(resumed_model), params_of(whole))


def test_checkpoints_load_across_the_two_layouts() -> None:
    """A compact checkpoint holds full symmetric matrices (each the mirror of its kept triangle):
    full bfloat16 state loads it and saves the same tensors; a full checkpoint loads into compact
    state, which keeps each matrix's triangle as its view says. (Unpaired blocks keep float32
    roots beside their float32 factors: loaded into bfloat16, they are rounded.)"""
    kwargs = {**BASE, "betas": (0.9, 1.0), "async_roots": False}

    def make(packed: bool) -> tuple[torch.nn.Module, Shampoo]:
        model = mixed_model()
        return model, Shampoo(model.parameters(), **kwargs, compact_state=packed)

    across = checkpoints_across(make, lambda model, opt: train(model, opt, make_batches(7)))
    for packed, before_states, after_states, views in across:
        for before, after, view in zip(before_states.values(), after_states.values(), views):
            for key in ("factors", "roots"):
                for j, x in before[key].items():
                    y = after[key][j]
                    if not packed:  # (full into compact: widened exactly where unpaired)
                        keep = torch.triu if compact.keeps_upper(view[key][int(j)]) else torch.tril
                        mask = keep(torch.ones_like(x, dtype=torch.bool))
                        assert torch.equal(y.float(), torch.where(mask, x, x.mT).float()), (key, j)
                    elif x.dtype == y.dtype:
                        assert torch.equal(y, x), (key, j)
                    else:  # (a float32 root into bfloat16: rounded)
                        assert key == "roots" and y.dtype == torch.bfloat16
                        torch.testing.assert_close(y.float(), x, rtol=2**-7, atol=0)


def test_a_state_dtype_changed_between_steps_repacks_the_full_matrices() -> None:
    """float32 → bfloat16 → float32 between steps: the state leaves its stacks as full matrices
    (each from the triangle it kept) and is packed again the other way (unpaired ↔ paired), so
    the weights follow full matrices' run with the same changes closely (not bitwise: dim 1 of a
    paired block keeps the upper triangle); before, a repacked square block took a root from the
    triangle that held its factor."""
    results = []
    for packed in (False, True):
        model = square_model()
        kwargs = {**BASE, "state_dtype": None, "async_roots": False, "compact_state": packed}
        with Shampoo(model.parameters(), **kwargs) as opt:
            for dtype in (None, torch.bfloat16, None):
                opt.param_groups[0]["state_dtype"] = dtype
                _train_sometimes_without_one(model, opt, 5)
        results.append(params_of(model))
    for full, packed_params in zip(*results):
        torch.testing.assert_close(packed_params, full, rtol=2e-2, atol=1e-3)


def test_auto_pairs_square_bfloat16_blocks_alone_and_leaves_float32_state_full() -> None:
    """``compact_state="auto"`` (the default): with bfloat16 state the square blocks' dims are
    paired and every other block keeps full matrices with bfloat16 roots; with float32 state
    nothing is packed, the steps bitwise those of ``compact_state=False``."""
    model = square_model()
    params = list(model.parameters())
    with Shampoo(params, **{**BASE, "async_roots": False}) as opt:
        _train_sometimes_without_one(model, opt, 4)
        for p in params:
            assert all(r.dtype == torch.bfloat16 for r in opt.state[p]["roots"])
        buckets = opt._buckets  # type: ignore[attr-defined]
        for bucket in buckets:  # (the 4×4 blocks of the (8, 6) and (8, 8) weights: paired)
            square = bucket.block_shape == (4, 4)
            assert (bucket.triangles is not None) == square, bucket.block_shape
            if square:
                assert [t.factor_upper for t in bucket.triangles] == [False, True]
                assert [r.dtype for r in bucket.roots] == [torch.bfloat16] * 2
        packed = {id(m.p) for b in buckets if b.triangles is not None for m in b.members}
        assert packed == {id(model[i].weight) for i in (0, 2, 4)}
        assert opt._ledger.packed == packed  # type: ignore[attr-defined]
    results = []
    for packing in ("auto", False):
        model = square_model()
        kwargs = {**BASE, "state_dtype": None, "async_roots": False, "compact_state": packing}
        with Shampoo(model.parameters(), **kwargs) as opt:
            _train_sometimes_without_one(model, opt, 7)
            assert not opt._ledger.packed  # type: ignore[attr-defined]
        results.append(params_of(model))
    assert_bitwise_equal(*results)


def test_auto_checkpoints_load_into_full_bfloat16_state_and_back() -> None:
    """An "auto" checkpoint holds full matrices: full bfloat16 state loads it and saves the same
    tensors, and "auto" state loads that back and saves them again (each matrix the mirror of
    the triangle it keeps, which these symmetric matrices already are)."""
    kwargs = {**BASE, "betas": (0.9, 1.0), "async_roots": False, "precondition_frequency": 5}
    model = square_model()
    with Shampoo(model.parameters(), **kwargs) as opt:
        _train_sometimes_without_one(model, opt, 6, skips=False)  # (roots at step 5)
        saved = opt.state_dict()
    for packing in (False, "auto"):
        model = square_model()
        with Shampoo(model.parameters(), **kwargs, compact_state=packing) as opt:
            opt.load_state_dict(saved)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()  # (β₂ = 1 and zero gradients: the factors add exact zeros; steps 7, 8)
            again = opt.state_dict()
        for before, after in zip(saved["state"].values(), again["state"].values()):
            for key in ("factors", "roots"):
                assert_bitwise_equal(list(after[key].values()), list(before[key].values()))
        saved = again
