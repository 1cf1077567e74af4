"""Buckets: equal-shape blocks stacked (``torch_shampoo.layout.buckets``), the stacked step and the
batched roots.

Claims:

* gathering a parameter-shaped tensor into a bucket gives exactly its blocks of that shape, in
  block order, and scattering gives them back (every element, bit for bit);
* the state's per-block factors and roots are rows of the bucket stacks (one storage);
* a bucket of single-block parameters steps as one unit bitwise as its parameters would one at a
  time, and parameters without a gradient in a step are left alone by their bucket (their step
  counts too, which are rows of one tensor);
* the units of a step taking each elementwise line together (``_foreach_`` ops) step bitwise as
  each unit alone (every option that changes those lines, non-finite steps included);
* batching changes a parameter's trajectory only by rounding (float64, 1e-12);
* ``inverse_roots`` on a stack agrees with ``inverse_root`` per matrix, failures included.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_shampoo.update.foreach as elementwise_module
import torch_shampoo.update.per_unit as step_module
from torch_shampoo import Shampoo
from torch_shampoo.layout.blocking import block_layout, split_blocks
from torch_shampoo.layout.buckets import factor_groups, plan_buckets
from torch_shampoo.roots.matrix_roots import inverse_root, inverse_roots
from torch_shampoo.state import init_state

shapes = st.lists(st.integers(1, 23), min_size=1, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, block_size=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_gather_gives_the_blocks_of_each_shape_and_scatter_gives_them_back(
    shape: tuple[int, ...], block_size: int, seed: int
) -> None:
    p = torch.zeros(shape)
    layout = block_layout(shape, block_size, 8192)
    state: dict[str, Any] = {}
    init_state(p, state, layout)
    _, placements = plan_buckets([(0, p, layout, state)])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    blocks = split_blocks(x, layout)
    targets: dict[torch.Tensor, torch.Tensor] = {}
    assert sorted(b for bucket, m in placements[id(p)] for b in m.blocks) == list(
        range(layout.num_blocks)
    )
    for bucket, member in placements[id(p)]:
        stack = bucket.gather([x], [member])
        assert stack.shape == (len(member.blocks), *bucket.block_shape)
        for row, b in enumerate(member.blocks):
            assert torch.equal(stack[row], blocks[b])
        bucket.scatter(stack, [member], targets)
    assert torch.equal(targets[p], x)
    # one job per bucket and factored dim, covering every factor once
    groups = factor_groups(layout)
    assert sorted(j for g in groups for j in g) == list(range(len(state["factors"])))


def test_the_state_factors_and_roots_are_rows_of_the_bucket_stacks() -> None:
    params = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(3)]
    opt = Shampoo(params, lr=0.01, block_size=8, precondition_frequency=2, async_roots=False)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(16, 16)
        opt.step()
    buckets = opt._buckets
    assert buckets is not None and len(buckets) == 1  # 3 × 4 blocks of 8×8
    bucket = buckets[0]
    assert bucket.factors[0].shape == (12, 8, 8)
    storages = {bucket.factors[0].untyped_storage().data_ptr()}
    for p in params:
        for j in range(0, 8, 2):  # dim 0 of every block
            factor = opt.state[p]["factors"][j]
            assert factor.untyped_storage().data_ptr() in storages
    assert torch.equal(opt.state[params[1]]["factors"][0], bucket.factors[0][4])
    assert torch.equal(opt.state[params[1]]["roots"][1], bucket.roots[1][4])
    opt.close()


def _many(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        for shape in [(6, 6), (6, 6), (6,), (6,), (6, 6), (13, 6)]
    ]


def _run(
    params: list[torch.nn.Parameter], steps: int, seed: int, skip: int | None = None, **kw: Any
) -> Shampoo:
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs: dict[str, Any] = dict(lr=0.02, block_size=8, precondition_frequency=3)
    opt = Shampoo(params, **{**kwargs, "async_roots": False, "momentum": 0.5, **kw})
    for t in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = None if i == skip and t % 2 else g
        opt.step()
    opt.close()
    return opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_stacked_bucket_steps_bitwise_as_its_parameters_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch, weight_decay: float
) -> None:
    """The stacked elementwise step (one unit per bucket) against the per-parameter step (every
    parameter its own unit, the same buckets for the matrix work)."""
    stacked = _many(0)
    _run(stacked, 8, 0, weight_decay=weight_decay)
    original = step_module.units_of

    def one_at_a_time(work: Any, buckets: Any) -> Any:
        return original(work, [])  # no stacked units: every parameter alone

    monkeypatch.setattr(step_module, "units_of", one_at_a_time)
    alone = _many(0)
    _run(alone, 8, 0, weight_decay=weight_decay)
    for a, b in zip(stacked, alone):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        {"betas": (0.0, 0.99), "grafting": "sgd", "weight_decay": 0.1},
        {"grafting": "adagrad", "weight_decay": 0.01, "decoupled_weight_decay": False},
        {"grafting": "rmsprop", "bias_correction": False, "maximize": True},
        {"grafting": "none", "momentum": 0.5},
    ],
    ids=["defaults", "nesterov-wd", "beta1-0-sgd", "adagrad-coupled", "rmsprop-max", "none"],
)
def test_the_units_of_a_step_take_each_elementwise_line_together_bitwise_as_alone(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    """One ``_foreach_`` call per elementwise line for all units of a group (here: a multi-block
    parameter, stacked buckets and single parameters) against every unit on its own; step 4's
    gradients are non-finite in one parameter, whose unit then takes the per-unit, masked line."""

    def run() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(5)
        params = [
            torch.nn.Parameter(torch.randn(shape, generator=gen))
            for shape in [(6, 6), (6, 6), (6,), (13, 6), (3, 4, 5), (7,)]
        ]
        opt = Shampoo(params, lr=0.02, block_size=8, precondition_frequency=3,
                      async_roots=False, **options)  # fmt: skip
        for t in range(7):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=gen)
                if t == 4 and i == 3:
                    p.grad[2, 1] = float("nan")
            opt.step()
        opt.close()
        return [p.detach().clone() for p in params]

    together = run()
    calls = 0
    original = elementwise_module._batches

    def alone(units: Any) -> Any:
        nonlocal calls
        batches, rest = original(units)
        calls += len(batches)
        return [], rest + [u for b in batches for u in b]

    monkeypatch.setattr(elementwise_module, "_batches", alone)
    apart = run()
    assert calls > 0  # the same units formed batches in the first run
    for a, b in zip(together, apart):
        assert torch.equal(a, b)


def test_a_parameter_without_a_gradient_is_left_alone_by_its_bucket() -> None:
    """Its bucket steps the others (rows gathered and written back); its own rows, moments and
    values do not change, and it resumes with its own step count."""
    params = _many(1, torch.float64)
    opt = _run(params, 6, 1, skip=1)
    assert int(opt.state[params[1]]["step"]) == 3  # stepped at t = 0, 2, 4 only
    keys = ("exp_avg", "graft_v", "momentum_buffer")
    before = {k: opt.state[params[1]][k].clone() for k in keys}
    factors = [f.clone() for f in opt.state[params[1]]["factors"]]
    value = params[1].detach().clone()
    others = [p.detach().clone() for p in params]
    for i, p in enumerate(params):
        p.grad = None if i == 1 else torch.randn(p.shape, dtype=p.dtype)
    opt.step()
    assert torch.equal(params[1], value)
    assert all(torch.equal(opt.state[params[1]][k], before[k]) for k in keys)
    assert all(map(torch.equal, opt.state[params[1]]["factors"], factors))
    assert all(not torch.equal(p, q) for i, (p, q) in enumerate(zip(params, others)) if i != 1)
    opt.close()


def test_step_counts_are_rows_of_one_stack_and_each_counts_its_own_steps() -> None:
    """A bucket of single-block parameters keeps their ``step`` as rows of one tensor, advanced
    by one add when all of them step; a parameter that skips a step, or whose ``step`` was
    replaced (a hand-edited state), still counts exactly its own steps."""
    params = _many(2)
    opt = _run(params, 5, 2, skip=1)  # params[1] has no gradient at t = 1, 3
    pairs = params[:2]  # (6, 6) and (6, 6): one bucket with params[4]
    steps = [opt.state[p]["step"] for p in (*pairs, params[4])]
    assert steps[0].untyped_storage().data_ptr() == steps[1].untyped_storage().data_ptr()
    assert [int(x) for x in steps] == [5, 3, 5]
    opt.state[params[0]]["step"] = torch.tensor(10.0)  # replaced: no longer a row
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    counts = [int(opt.state[p]["step"]) for p in params]
    assert counts == [11, 4, 6, 6, 6, 6], counts
    opt.step()  # the replaced one joined the stack again? either way, each counts its own
    assert [int(opt.state[p]["step"]) for p in params] == [12, 5, 7, 7, 7, 7]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_batching_changes_a_trajectory_only_by_rounding(seed: int) -> None:
    """Each parameter trained in a bucket with others equals it trained alone (float64)."""
    together = _many(seed, torch.float64)
    _run(together, 7, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [
        [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in together] for _ in range(7)
    ]
    for i, p in enumerate(_many(seed, torch.float64)):
        opt = Shampoo(
            [p], lr=0.02, block_size=8, precondition_frequency=3, async_roots=False, momentum=0.5
        )
        for step_grads in grads:
            p.grad = step_grads[i]
            opt.step()
        opt.close()
        torch.testing.assert_close(p, together[i], rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 6), n=st.integers(1, 12), seed=st.integers(0, 2**16), bad=st.booleans())
def test_inverse_roots_of_a_stack_agree_with_inverse_root_per_matrix(
    k: int, n: int, seed: int, bad: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, 2 * n, generator=gen, dtype=torch.float64)
    stack = w @ w.mT  # well conditioned: rounding is not amplified (rank-deficient ones are)
    if bad:
        stack[k // 2, 0, 0] = math.nan
    batched = inverse_roots(stack, 4.0, 1e-3)
    for matrix, found in zip(stack, batched):
        alone = inverse_root(matrix, 4.0, 1e-3)
        assert found.ok == alone.ok
        if alone.ok:
            torch.testing.assert_close(found.root, alone.root, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("compact_state", [False, True], ids=["full", "compact"])
def test_pickling_writes_each_tensor_once_not_each_rows_whole_bucket(compact_state: bool) -> None:
    """A parameter's factors, roots and (single-block buckets) moments are views of its
    buckets' stacks; pickle writes a view's whole storage, so they are pickled as tensors of
    their own: the pickle is about the state plus the parameters, not n times the buckets."""
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(16, 16))
    params = list(model.parameters())
    with Shampoo(params, block_size=64, async_roots=False, compact_state=compact_state) as opt:
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        held = opt.root_stats()["state_bytes"]
        size = len(pickle.dumps(opt))
        twin = pickle.loads(pickle.dumps(opt))
        twin.close()
    weights = sum(p.nbytes for p in params)
    # (compact state is pickled as full matrices: up to twice its factors' and roots' bytes)
    assert size < (2.0 if compact_state else 1.2) * (held + weights), (size, held, weights)
