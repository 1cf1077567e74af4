"""SOAP and the engine's promises: async bases equal sync ones delayed by the same staleness,
resume with bases in flight, failed eigendecompositions and non-finite blocks change nothing,
compiled steps, bad arguments refused by name, refreshes and eigh_every."""

from __future__ import annotations

import math
import pickle
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import (
    compiled_and_eager,
    make_batches,
    mixed_model,
    saved_and_loaded,
    square_batches,
    square_net,
    train,
)
from torch import nn

import torch_shampoo.roots.pool as root_pool
from torch_shampoo import SOAP
from torch_shampoo.update.eigenbasis import rotate_stack

# ---------------------------------------------------------------------- the engine's promises


def _train_mixed(steps: int, **kwargs: Any) -> list[torch.Tensor]:
    model = mixed_model()
    with SOAP(model.parameters(), lr=0.01, block_size=16, **kwargs) as opt:
        train(model, opt, make_batches(steps))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("frequency", [1, 4])
def test_async_bases_equal_sync_bases_delayed_by_the_same_staleness(frequency: int) -> None:
    common = dict(
        precondition_frequency=frequency, root_staleness=frequency, momentum=0.5, eigh_every=2,
        stagger_roots=False,  # (staggered: tests/test_stagger.py)
    )
    asynchronous = _train_mixed(24, async_roots=True, **common)
    synchronous = _train_mixed(24, async_roots=False, **common)
    for a, b in zip(asynchronous, synchronous):
        assert torch.equal(a, b), (a - b).abs().max()
    fresh = _train_mixed(24, async_roots=False, precondition_frequency=frequency, root_staleness=0)
    assert any(not torch.equal(a, b) for a, b in zip(fresh, synchronous))  # not vacuous


@pytest.mark.parametrize("async_roots", [True, False])
def test_resume_with_bases_in_flight_is_bitwise_identical(async_roots: bool) -> None:
    kwargs: dict[str, Any] = dict(
        lr=0.01,
        block_size=16,
        precondition_frequency=5,
        root_staleness=4,
        eigh_every=2,
        async_roots=async_roots,
        stagger_roots=False,
    )
    uninterrupted = _train_mixed(
        24, **{k: v for k, v in kwargs.items() if k not in ("lr", "block_size")}
    )
    batches = make_batches(24)
    model = mixed_model()
    opt = SOAP(model.parameters(), **kwargs)
    train(model, opt, batches[:12])  # the bases of step 10 are due at 14
    assert int(opt.state_dict()["state"][0]["pending_due"]) == 14
    checkpoint = saved_and_loaded(model, opt)
    opt.close()
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    with SOAP(resumed_model.parameters(), **kwargs) as resumed:
        resumed.load_state_dict(checkpoint["opt"])
        train(resumed_model, resumed, batches[12:])
    for a, b in zip(resumed_model.parameters(), uninterrupted):
        assert torch.equal(a.detach(), b), (a - b).abs().max()


def test_a_failed_eigendecomposition_keeps_the_previous_basis_and_the_moments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = torch.randn(4, 4, dtype=torch.float64)
    opt = SOAP(
        [w],
        lr=0.01,
        async_roots=False,
        precondition_frequency=2,
        max_root_failures=2,
        eigh_every=1,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        w.grad = torch.randn(4, 4, generator=gen, dtype=torch.float64)
        opt.step()
    state = opt.state[w]
    bases = [b.clone() for b in state["roots"]]
    real = root_pool.eigenbases

    def failing(matrices: torch.Tensor, *args: Any) -> Any:
        found = real(matrices, *args)
        return [r.__class__(r.root, False, math.nan, "injected", "eigh") for r in found]

    monkeypatch.setattr(root_pool, "eigenbases", failing)
    w.grad = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    opt.step()  # step 3: no root step
    w.grad = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    moments = state["exp_avg"].clone()
    with pytest.warns(RuntimeWarning, match="injected"):
        opt.step()  # step 4: both bases fail
    assert all(torch.equal(a, b) for a, b in zip(state["roots"], bases))
    assert torch.isfinite(w).all() and not torch.equal(state["exp_avg"], moments)
    with pytest.raises(RuntimeError, match="2 consecutive failures"):
        for _ in range(2):
            w.grad = torch.randn(4, 4, generator=gen, dtype=torch.float64)
            opt.step()
    opt.close()


def test_a_non_finite_gradient_block_changes_nothing() -> None:
    w = torch.randn(6, 4)
    opt = SOAP([w], lr=0.01, block_size=3, async_roots=False, precondition_frequency=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        w.grad = torch.randn(6, 4, generator=gen)
        opt.step()
    before = w.clone()
    grad = torch.randn(6, 4, generator=gen)
    grad[0, 0] = math.nan  # in the block of rows 0-2, columns 0-2
    w.grad = grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(w[:3, :3], before[:3, :3]) and not torch.equal(w[3:], before[3:])
    assert opt.root_stats()["skipped_blocks"] == 1 and torch.isfinite(w).all()
    opt.close()


def test_a_compiled_step_matches_eager_and_stops_recompiling() -> None:
    """``torch.compile(opt.step)``: after a warm-up (Adam before any basis, the first basis, a
    plain step, a root step whose eigh comes a step later) nothing recompiles, through the
    install of that eigh's bases and the next root step, and the result agrees with eager.

    The problem is chosen so that rounding cannot steer it. The SOAP paper's first basis, from
    one gradient (``start_preconditioning_step=1``), makes that gradient diagonal in it: its
    off-diagonal entries are rounding noise (~1e-9, eps's size), and Adam's first step there
    divides them by their own size, so entries of ±1 follow the noise's signs. With it, one
    ulp on the weights moved the result by up to 90% of the weights' size (measured), and a
    CPU without AVX-512 rounding differently failed here (62 of 64 elements off by up to
    3.6%). Here the first basis comes at step 2, from two gradients, neither diagonal in it;
    the factors have full rank (square weights, a batch of 16, no biases: eigenvectors in a
    null space would be arbitrary) and eigenvalue gaps ≥ 1.4e-3·λ_max (10⁴ float32 ulps) at
    every basis. Measured against the tolerance below (1 = its edge) with torch's avx512,
    avx2 and default kernels alike: the compiled step 0.007, the same run in float64 (every
    rounding different) 0.007, one ulp on the weights 0.009; a compiled step with its lr off
    by 1e-4 1.07, with eps 10× off 4.6."""

    def build() -> tuple[nn.Module, SOAP]:
        model = square_net()
        opt = SOAP(model.parameters(), lr=0.02, precondition_frequency=2,
                   start_preconditioning_step=2, eigh_every=1, root_staleness=1)  # fmt: skip
        return model, opt

    compiled, eager = compiled_and_eager(build, square_batches())
    # The compiled update takes the float lr as a 0-d tensor (no recompile when it changes):
    # one rounding more per step than eager's ``add_(alpha=-lr)``.
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("betas", (0.9, 1.0)),
        ("eps", 0.0),
        ("shampoo_beta", 1.5),
        ("lr", -1.0),
        ("precondition_1d", 1),
        ("merge_dims", "yes"),
        ("precondition_frequency", 0),
        ("eigh_every", 0),
        ("eigh_every", 2.0),
    ],
)
def test_a_bad_argument_is_refused_with_its_name_and_value(name: str, value: Any) -> None:
    with pytest.raises(
        (ValueError, TypeError),
        match=f"Invalid {name}: {value!r}".replace("(", r"\(").replace(")", r"\)"),
    ):
        SOAP([torch.zeros(2, 2)], **{name: value})


def test_a_shampoo_kwarg_says_what_soap_calls_it() -> None:
    with pytest.raises(TypeError, match="did you mean 'eps'"):
        SOAP([torch.zeros(2, 2)], epsilon=1e-8)
    with pytest.raises(TypeError, match="grafting"):
        SOAP([torch.zeros(2, 2)], grafting="adam")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_a_refresh_leaves_an_exact_eigenbasis_in_place(seed: int) -> None:
    """F Q = Q Λ: one power iteration from F's own eigenvectors returns them, column by column
    with their signs (to rounding); from a perturbed basis it moves towards them."""
    from torch_shampoo.update.eigenbasis import refresh

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    factor = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    exact = torch.linalg.eigh(factor).eigenvectors
    bases = exact.clone()[None]
    refresh(bases, factor[None])
    torch.testing.assert_close(bases[0], exact, rtol=0, atol=1e-10)
    perturbed = torch.linalg.qr(exact + 0.05 * torch.randn(6, 6, generator=gen).double())[0]
    perturbed = perturbed * torch.sign((perturbed * exact).sum(0))  # the same orientation
    moved = perturbed.clone()[None]
    refresh(moved, factor[None])
    off = lambda q: (q.T @ factor @ q).triu(1).norm()  # noqa: E731
    assert off(moved[0]) < off(perturbed)


def test_a_block_whose_first_basis_failed_stays_adam_beside_rotated_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A (10, 4) parameter at block 4 has blocks in two buckets: rows 0-7 (two 4×4 blocks) and
    rows 8-9 (one 2×4 block). When only the second bucket's first bases fail, its block keeps
    Adam's step (bitwise what it would be with no basis at all) while the others rotate."""
    real = root_pool.eigenbases

    def fail_single_rows(matrices: torch.Tensor, *args: Any) -> Any:
        # The 2×4 block's factors: its 2×2 one, and the last row of the 4×4 batch (jobs are
        # batched in slot order: the 4×4 bucket's two jobs of two rows, then the 2×4 one's).
        found = real(matrices, *args)
        failed = range(len(found)) if matrices.shape[-1] == 2 else range(4, len(found))
        return [
            r.__class__(r.root, False, math.nan, "injected", "eigh") if i in failed else r
            for i, r in enumerate(found)
        ]

    monkeypatch.setattr(root_pool, "eigenbases", fail_single_rows)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    plain = w.clone()
    kwargs = dict(lr=0.01, block_size=4, async_roots=False, max_root_failures=10)
    soap = SOAP([w], **kwargs)
    adam_like = SOAP([plain], **kwargs, start_preconditioning_step=10**6)
    with pytest.warns(RuntimeWarning, match="injected"):
        for _ in range(3):
            g = torch.randn(10, 4, generator=gen, dtype=torch.float64)
            w.grad, plain.grad = g.clone(), g.clone()
            soap.step()
            adam_like.step()
    assert torch.equal(w[8:], plain[8:])
    assert not torch.equal(w[:8], plain[:8])  # the other blocks did rotate
    soap.close()
    adam_like.close()


def test_vectors_without_a_basis_leave_the_root_statistics_alone() -> None:
    """A bias has no factor (plain Adam): it makes no root cycle, so the staleness statistics
    count the weight's bases only (first at step 1, age 0; then steps 4 and 8, age 3), and no
    later root step counts as a first cycle."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    opt = SOAP(
        layer.parameters(), lr=0.01, precondition_frequency=4, root_staleness=3, eigh_every=1
    )
    gen = torch.Generator().manual_seed(0)
    first = None
    for step in range(13):
        opt.zero_grad()
        layer(torch.randn(8, 5, generator=gen)).pow(2).mean().backward()
        opt.step()
        if step == 0:
            first = opt.root_stats()["first_root_seconds"]
    stats = opt.root_stats()
    opt.close()
    assert stats["mean_staleness"] == 2 and stats["max_staleness"] == 3
    assert stats["first_root_seconds"] == first


@pytest.mark.parametrize("async_roots", [True, False])
def test_the_pool_computes_eigenvectors_only_every_eigh_every_th_root_step(
    async_roots: bool,
) -> None:
    """Root steps 1, 2, 4, …, 12 (frequency 2): exact bases at the first and where (t // 2) is
    a multiple of 3 (steps 6 and 12); every other root step moves the bases by a power
    iteration on the device (its math: the reference tests with ``eigh_every`` 2 and 3)."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, dtype=torch.float64)
    opt = SOAP(
        layer.parameters(), lr=0.01, precondition_frequency=2, root_staleness=0,
        eigh_every=3, async_roots=async_roots,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    computed = []
    for _ in range(14):
        opt.zero_grad()
        layer(torch.randn(8, 5, generator=gen, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
        computed.append(opt.root_stats()["roots_computed"])
    opt.close()
    per_cycle = 2  # the weight's two factors; the bias has none
    expected = [
        per_cycle * sum(t == 1 or t in (6, 12) for t in range(1, s + 1)) for s in range(1, 15)
    ]
    assert computed == expected


@pytest.mark.parametrize("how", ["state_dict", "pickle"])
def test_a_state_saved_before_eigh_every_resumes_with_eigh_at_every_root_step(how: str) -> None:
    """A state dict (or pickle) from before ``eigh_every`` existed has no such group key: it
    loads, and goes on as it was trained (an eigh at every root step), bitwise."""
    kwargs: dict[str, Any] = dict(
        lr=0.01, block_size=16, precondition_frequency=2, async_roots=False
    )
    batches = make_batches(14)
    whole = mixed_model()
    with SOAP(whole.parameters(), eigh_every=1, **kwargs) as opt:
        train(whole, opt, batches)
    model = mixed_model()
    opt = SOAP(model.parameters(), eigh_every=1, **kwargs)
    train(model, opt, batches[:5])
    if how == "state_dict":
        saved = opt.state_dict()
        for group in saved["param_groups"]:
            del group["eigh_every"]
        resumed = SOAP(model.parameters(), **kwargs)  # the default, 5, is not what it ran
        resumed.load_state_dict(saved)
    else:
        for group in opt.param_groups:
            del group["eigh_every"]
        del opt.defaults["eigh_every"]
        model, resumed = pickle.loads(pickle.dumps((model, opt)))
    opt.close()
    assert resumed.param_groups[0]["eigh_every"] == 1
    train(model, resumed, batches[5:])
    resumed.close()
    for a, b in zip(model.parameters(), whole.parameters()):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("shape", [(5, 3, 4), (5, 4), (5, 2, 3, 2)])
@pytest.mark.parametrize("back", [False, True])
def test_rotations_by_bfloat16_bases_chunk_by_chunk_equal_those_by_their_widened_bases(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], back: bool
) -> None:
    """rotate_chunked (bfloat16 bases widened one row per chunk here) is bitwise rotate_stack
    with the bases cast to float32 whole (plain ``to``), for matrices, vectors and 3-D blocks."""
    from torch_shampoo.layout import compact
    from torch_shampoo.update.eigenbasis import rotate_chunked

    gen = torch.Generator().manual_seed(sum(shape))
    blocks = torch.randn(shape, generator=gen)
    factored = tuple(d > 2 for d in shape[1:]) if len(shape) > 3 else (True,) * (len(shape) - 1)
    bases = [torch.randn(shape[0], d, d, generator=gen).to(torch.bfloat16)
             for d, f in zip(shape[1:], factored) if f]  # fmt: skip
    expected = rotate_stack(blocks, [b.float() for b in bases], factored, back)
    monkeypatch.setattr(compact, "CHUNK_BYTES", 1)
    got = rotate_chunked(blocks, bases, factored, back)
    assert torch.equal(got, expected)
