"""SOAP (eigenvalue-corrected Shampoo): the rule against an independent float64 reference, Adam
before any basis, rotation equivariance and basis changes. The engine's promises (async ≡
sync-delayed, resume, failures, compile, eigh_every): test_soap_engine.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_soap import ReferenceSOAP
from torch import nn

from torch_shampoo import SOAP
from torch_shampoo.layout.buckets import Member
from torch_shampoo.update.eigenbasis import change_basis, rotate_stack

SHAPES = [(6, 4), (5,), (3, 4, 2), (4, 4), ()]


def _grads(steps: int, shapes: list[tuple[int, ...]], seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)
    ]


def _against_reference(
    steps: int,
    shapes: list[tuple[int, ...]],
    reference_changes: dict[str, Any] | None = None,
    **options: Any,
) -> float:
    """Largest |difference| between SOAP (float64, synchronous) and the reference after each
    step, fed the same gradients (``reference_changes``: options only the reference gets)."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    mirror = [p.clone() for p in params]
    opt = SOAP(params, async_roots=False, **{"root_staleness": 0, **options})
    reference = ReferenceSOAP(mirror, **{**options, **(reference_changes or {})})
    worst = 0.0
    for grads in _grads(steps, shapes):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        reference.step(grads)
        worst = max(worst, *((a - b).abs().max().item() for a, b in zip(params, mirror)))
    opt.close()
    return worst


# Each option against its default at least once, with its neighbours varied (pairwise-style);
# block_size 4 gives edge blocks and full-rank factors before the first basis at step 6 (a
# rank-deficient factor has no unique eigenbasis, so two correct codes may pick different ones).
OPTION_SETS: list[dict[str, Any]] = [
    {},
    {"betas": (0.8, 0.95), "shampoo_beta": 0.9, "momentum": 0.5, "nesterov": True},
    {"weight_decay": 0.1, "decoupled_weight_decay": False, "maximize": True},
    {"weight_decay": 0.05, "bias_correction": False, "momentum": 0.3},
    {"precondition_1d": True, "merge_dims": True, "eps": 1e-6},
    {"max_factor_dim": 3, "precondition_frequency": 2, "betas": (0.0, 0.99)},
    {"root_staleness": 2, "momentum": 0.9, "eigh_every": 1},
    {"root_staleness": 3, "basis_refresh": False, "precondition_1d": True, "eigh_every": 1},
    {"root_staleness": 1, "precondition_frequency": 4, "weight_decay": 0.01},
    {"eigh_every": 2, "root_staleness": 2, "nesterov": True, "momentum": 0.5},
    {"eigh_every": 3, "basis_refresh": False, "merge_dims": True, "precondition_frequency": 2},
    {"eigh_every": 1, "betas": (0.9, 0.99)},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "defaults")
def test_equals_the_float64_reference_across_options(options: dict[str, Any]) -> None:
    kwargs = {
        "lr": 0.01,
        "block_size": 4,
        "precondition_frequency": 3,
        "start_preconditioning_step": 6,
        **options,
    }
    assert _against_reference(14, SHAPES, None, **kwargs) < 1e-9


def test_equals_the_reference_from_a_first_basis_at_step_one() -> None:
    """The default start: the first basis comes from one gradient (square blocks: full rank).
    In the basis of its own G = UΣVᵀ a gradient is diagonal, UᵀGV = Σ: the rest is rounding
    noise (1e-16), which Adam's step divides by ε; ε = 1e-4 keeps that noise below 1e-12."""
    shapes = [(5, 5), (4, 4, 4)]
    kwargs = dict(lr=0.01, precondition_frequency=4, eps=1e-4)
    assert _against_reference(12, shapes, None, **kwargs) < 1e-9


def test_the_reference_comparison_can_fail() -> None:
    """The comparison is sensitive: another factor β, or stale bases without the refresh,
    are caught."""
    kwargs = dict(lr=0.01, block_size=4, precondition_frequency=3, start_preconditioning_step=6)
    assert _against_reference(14, SHAPES, {"shampoo_beta": 0.95}, **kwargs) > 1e-6
    stale = _against_reference(
        14, SHAPES, {"basis_refresh": False}, root_staleness=2, eigh_every=1, **kwargs
    )
    assert stale > 1e-6
    every = _against_reference(14, SHAPES, {"eigh_every": 1}, eigh_every=2, **kwargs)
    assert every > 1e-6


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_without_a_basis_it_is_adam_to_rounding(weight_decay: float) -> None:
    """With no basis ever installed the rule is AdamW's (torch's own), up to rounding: torch
    divides by √v/√bc₂ + ε, SOAP by √(v/bc₂) + ε."""
    torch.manual_seed(0)
    ours = nn.Linear(7, 5, dtype=torch.float64)
    theirs = nn.Linear(7, 5, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    soap = SOAP(
        ours.parameters(),
        lr=0.01,
        weight_decay=weight_decay,
        async_roots=False,
        start_preconditioning_step=10**6,
    )
    adamw = torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        x = torch.randn(16, 7, generator=gen, dtype=torch.float64)
        for model, opt in ((ours, soap), (theirs, adamw)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert soap.root_stats()["roots_computed"] == 0
    soap.close()


def _random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), frequency=st.integers(1, 4))
def test_rotating_the_problem_rotates_the_trajectory(seed: int, frequency: int) -> None:
    """SOAP is equivariant to orthogonal changes of the row and column space of a matrix:
    gradients U G Vᵀ from W₀' = U W₀ Vᵀ give W_t' = U W_t Vᵀ (Adam is not; its diagonal
    depends on the coordinates)."""
    gen = torch.Generator().manual_seed(seed)
    u, v = _random_orthogonal(5, gen), _random_orthogonal(4, gen)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    w_rot = (u @ w @ v.T).clone()
    kwargs = dict(lr=0.01, precondition_frequency=frequency, async_roots=False, eps=1e-4)
    plain, rotated = SOAP([w], **kwargs), SOAP([w_rot], **kwargs)
    for _ in range(8):
        g = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        w.grad, w_rot.grad = g, u @ g @ v.T
        plain.step()
        rotated.step()
    torch.testing.assert_close(w_rot, u @ w @ v.T, rtol=0, atol=1e-9)
    adam_plain, adam_rot = w.clone().requires_grad_(), (u @ w @ v.T).requires_grad_()
    adams = [torch.optim.Adam([x], lr=0.01) for x in (adam_plain, adam_rot)]
    for _ in range(3):
        g = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        adam_plain.grad, adam_rot.grad = g, u @ g @ v.T
        for opt in adams:
            opt.step()
    assert (adam_rot - u @ adam_plain.detach() @ v.T).abs().max() > 1e-6  # the test can fail


# ------------------------------------------------------------------------- basis changes


def _member(shape: tuple[int, ...]) -> Member:
    from torch_shampoo.layout.blocking import block_layout

    layout = block_layout(shape, 1024, 1024, merge=False)
    return Member(
        torch.empty(shape), layout, 0, [0], (0,) * len(shape), (1,) * len(shape), (0,) * len(shape)
    )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.integers(0, 1))
def test_a_new_basis_moves_the_first_moment_exactly_and_keeps_the_second(
    seed: int, dim: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    shape = (5, 4)
    old, new = (_random_orthogonal(shape[dim], gen)[None] for _ in range(2))
    m = torch.randn(shape, generator=gen, dtype=torch.float64)
    v = torch.rand(shape, generator=gen, dtype=torch.float64)
    state = {"exp_avg": m.clone(), "graft_v": v.clone()}
    change_basis(state, _member(shape), shape, dim, old, new)
    factored = (True, False) if dim == 0 else (False, True)
    back = rotate_stack(m[None], [old], factored, back=True)
    back_new = rotate_stack(state["exp_avg"][None], [new], factored, back=True)
    torch.testing.assert_close(back_new, back, rtol=0, atol=1e-12)  # the same original M
    assert torch.equal(state["graft_v"], v)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_a_first_basis_takes_adams_second_moment_as_a_diagonal(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = _random_orthogonal(5, gen)
    v = torch.rand(5, 3, generator=gen, dtype=torch.float64)
    state = {"graft_v": v.clone()}
    eye = torch.eye(5, dtype=torch.float64)[None]
    change_basis(state, _member((5, 3)), (5, 3), 0, eye, q[None], torch.tensor([True]))
    expected = (q * q).T @ v  # Ṽ_a = Σ_k Q_ka² V_k
    torch.testing.assert_close(state["graft_v"], expected, rtol=0, atol=1e-14)
    assert (state["graft_v"] >= 0).all()
    torch.testing.assert_close(state["graft_v"].sum(0), v.sum(0), rtol=1e-12, atol=0)
    # a basis that only permutes and flips the old one permutes V exactly
    perm = torch.randperm(5, generator=gen)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    state = {"graft_v": v.clone()}
    change_basis(
        state,
        _member((5, 3)),
        (5, 3),
        0,
        eye,
        (eye[0][:, perm] * signs)[None],
        torch.tensor([True]),
    )
    assert torch.equal(state["graft_v"], v[perm])
