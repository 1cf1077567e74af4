"""NG+ (Yang, Xu, Cui, Wen, Xu 2021) against the paper's update written out in float64.

For a weight matrix G ∈ ℝ^{m×n} (a conv weight read as C_out × C_in·k·k) NG+ keeps the output-side
Fisher F ← βF + (1 − β)Ĝ, with Ĝ = G Gᵀ (mini-batch) or (1/B) Σ_i G_i G_iᵀ (per-sample, the bias
folded in as an extra input column), and steps along D = (F + λI)⁻¹ G, the inverse refreshed only
every T steps. The references (ngplus_reference.py) solve that system directly with
``torch.linalg.solve``; the optimizer computes an explicit inverse on the root pool, so agreement to
1e-10 checks the algebra. Per-sample statistics: test_ngplus_per_sample.py; the optimizer's
conventions (async roots, bad values, schedulers, DDP, checkpoints): test_ngplus_conventions.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import assert_bitwise_equal, make_batches, mixed_model, roundtrip, train
from ngplus_reference import (
    F64,
    PAPER,
    SYNC,
    PlainNGPlus,
    as_matrix,
    assert_close,
    leaves,
    outer,
    random_grads,
    scheduled_directions,
    snapshot,
    solve_blocks,
    step_with,
)
from torch import Tensor

from torch_shampoo import NGPlus

# ------------------------------------------------------------------- the direction (F + λI)⁻¹G

MATRICES = [(6, 4), (5, 2, 3, 3)]  # a Linear weight and a conv weight (5 × 18)


@pytest.mark.parametrize("root_method", ["eigh", "cholesky"])
@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_direction_solves_the_damped_moving_average_fisher(
    root_method: str, damping: float
) -> None:
    beta = 0.9
    params = leaves(MATRICES)
    fishers = [torch.zeros(s[0], s[0], dtype=F64) for s in MATRICES]
    with NGPlus(
        params,
        lr=1.0,
        momentum=0.0,
        damping=damping,
        curvature_beta=beta,
        inverse_frequency=1,
        root_method=root_method,
        **PAPER,
        **SYNC,
    ) as opt:
        for grads in random_grads(MATRICES, 5):
            before = snapshot(params)
            step_with(opt, params, grads)
            for i, (p, g) in enumerate(zip(params, grads)):
                fishers[i] = beta * fishers[i] + (1 - beta) * outer(g)
                expected = solve_blocks(fishers[i], g, damping)
                assert_close(before[i] - p.detach(), expected)
                assert_close(opt.state[p]["factors"][0], fishers[i])
                # Not vacuous: the preconditioner is far from a multiple of the identity.
                cosine = torch.nn.functional.cosine_similarity(
                    expected.flatten(), g.flatten(), dim=0
                )
                assert cosine < 0.99


@pytest.mark.parametrize("nesterov", [False, True])
def test_weight_decay_and_momentum_follow_the_plain_reference(nesterov: bool) -> None:
    shapes = [(6, 4), (4, 3, 2, 2), (6,), ()]
    hyper: dict[str, Any] = dict(lr=0.3, momentum=0.8, weight_decay=0.05, damping=0.1)
    params = leaves(shapes)
    reference = PlainNGPlus(params, beta=0.7, nesterov=nesterov, **hyper)
    with NGPlus(
        params,
        curvature_beta=0.7,
        inverse_frequency=1,
        nesterov=nesterov,
        **hyper,
        **PAPER,
        **SYNC,
    ) as opt:
        for grads in random_grads(shapes, 6):
            step_with(opt, params, grads)
            reference.step(grads)
            for p, w in zip(params, reference.weights):
                assert_close(p.detach(), w)


# ------------------------------------------------------------------- the inverse every T steps


@pytest.mark.parametrize("staleness", [0, 1, 2, 4])
def test_the_inverse_is_refreshed_every_t_steps(staleness: int) -> None:
    beta, damping, frequency, steps = 0.8, 0.05, 3, 10
    (param,) = leaves([(5, 3)])
    grads = [g for (g,) in random_grads([(5, 3)], steps)]
    expected, changes = scheduled_directions(grads, beta, lambda t: damping, frequency, staleness)
    roots = [torch.eye(5, dtype=F64)]
    with NGPlus(
        [param],
        lr=1.0,
        momentum=0.0,
        damping=damping,
        curvature_beta=beta,
        inverse_frequency=frequency,
        async_roots=False,
        root_staleness=staleness,
        **PAPER,
    ) as opt:
        for t, g in enumerate(grads, start=1):
            before = param.detach().clone()
            step_with(opt, [param], [g])
            assert_close(before - param.detach(), expected[t - 1])
            roots.append(opt.state[param]["roots"][0].clone())
            assert torch.equal(roots[t], roots[t - 1]) == (t not in changes), t
    if staleness == 0:  # the paper's schedule: refreshed at 1, 3, 6, 9, kept in between
        assert changes == {1, 3, 6, 9}
        assert torch.equal(roots[3], roots[4]) and torch.equal(roots[4], roots[5])
    assert min(changes) == 1  # the first inverse is never stale
    later = min(c for c in changes if c > 1)
    assert max(changes) > 3 and later == min(frequency + staleness, 2 * frequency)


@pytest.mark.parametrize("shape", [(10, 3), (9, 2, 2, 2)])
def test_an_output_dim_above_block_size_uses_diagonal_blocks_of_f(shape: tuple[int, ...]) -> None:
    block_size, beta, damping = 4, 0.6, 0.05
    params = leaves([shape])
    reference = PlainNGPlus(params, 1.0, 0.0, 0.0, damping, beta, block_size=block_size)
    with NGPlus(
        params,
        lr=1.0,
        momentum=0.0,
        damping=damping,
        curvature_beta=beta,
        inverse_frequency=1,
        block_size=block_size,
        **PAPER,
        **SYNC,
    ) as opt:
        for grads in random_grads([shape], 4):
            step_with(opt, params, grads)
            reference.step(grads)
            assert_close(params[0].detach(), reference.weights[0])
        factors = opt.state[params[0]]["factors"]
        assert [f.shape[0] for f in factors] == [4, 4, shape[0] - 8]
    # Not vacuous: the full F gives a different direction than its diagonal blocks.
    full = reference.fishers[0]
    assert full is not None
    g = grads[0]
    gap = solve_blocks(full, g, damping) - solve_blocks(full, g, damping, block_size)
    assert gap.abs().max() > 1e-3


# ------------------------------------------------------------------------ non-matrix parameters


@pytest.mark.parametrize(
    ("momentum", "weight_decay", "nesterov"),
    [(0.9, 0.0, False), (0.9, 0.01, True), (0.0, 0.01, False)],
)
def test_non_matrix_parameters_take_sgd_momentum_steps(
    momentum: float, weight_decay: float, nesterov: bool
) -> None:
    shapes = [(7,), ()]
    ours = leaves(shapes, dtype=torch.float32)
    theirs = snapshot(ours)
    for p in theirs:
        p.requires_grad_()
    hyper: dict[str, Any] = dict(
        lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )
    sgd = torch.optim.SGD(theirs, **hyper)
    with NGPlus(ours, damping=1e-3, inverse_frequency=1, **hyper, **PAPER) as opt:
        for grads in random_grads(shapes, 6):
            step_with(opt, ours, grads)
            step_with(sgd, theirs, grads)
            for a, b in zip(ours, theirs):
                # SGD fuses g + μb into one add(alpha=μ): up to an ulp apart per step, either
                # way depending on the CPU's kernels (an ulp off in every step's direction,
                # always up, always down or at random, moves the 6 steps by ≤ 0.35 of this).
                if nesterov:
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
                else:
                    assert torch.equal(a, b), (a - b).abs().max()
        assert all(opt.state[p]["factors"] == [] for p in ours)
    assert not torch.equal(ours[0], leaves(shapes, dtype=torch.float32)[0])


# ----------------------------------------------------------------------- the size of the step


@pytest.mark.parametrize("grafting", ["none", "sgd", "adam"])
@pytest.mark.parametrize(
    ("relative", "bias_correction", "nesterov"),
    [(False, True, True), (True, False, False), (True, True, True)],
)
def test_relative_damping_bias_correction_and_the_graft_follow_the_plain_reference(
    grafting: str, relative: bool, bias_correction: bool, nesterov: bool
) -> None:
    shapes = [(10, 3), (6, 2, 2), (5,), ()]
    hyper: dict[str, Any] = dict(lr=0.1, momentum=0.8, weight_decay=0.01, damping=0.1)
    params = leaves(shapes)
    reference = PlainNGPlus(
        params,
        beta=0.7,
        block_size=4,
        relative=relative,
        bias_correction=bias_correction,
        graft=grafting,
        graft_beta2=0.9,
        graft_epsilon=1e-3,
        nesterov=nesterov,
        **hyper,
    )
    with NGPlus(
        params,
        curvature_beta=0.7,
        inverse_frequency=1,
        block_size=4,
        relative_damping=relative,
        bias_correction=bias_correction,
        grafting=grafting,
        grafting_beta2=0.9,
        grafting_epsilon=1e-3,
        nesterov=nesterov,
        **hyper,
        **SYNC,
    ) as opt:
        for grads in random_grads(shapes, 5):
            step_with(opt, params, grads)
            reference.step(grads)
            for p, w in zip(params, reference.weights):
                assert_close(p.detach(), w)


def one_step(params: list[Tensor], grads: list[Tensor], **kwargs: Any) -> list[Tensor]:
    """The update W_before − W_after of NG+'s first step on copies of ``params``."""
    copies = [p.detach().clone().requires_grad_() for p in params]
    with NGPlus(copies, inverse_frequency=1, **kwargs, **SYNC) as opt:
        step_with(opt, copies, grads)
    return [p.detach() - q.detach() for p, q in zip(params, copies)]


@settings(max_examples=25, deadline=None)
@given(log_c=st.floats(-3.0, 3.0), seed=st.integers(0, 2**16), relative=st.booleans())
def test_scaling_the_loss_by_c_scales_the_natural_gradient_by_one_over_c(
    log_c: float, seed: int, relative: bool
) -> None:
    """D = (F + λI)⁻¹ G: loss × c makes G → cG and F → c²F, so with relative damping (or an
    absolute λ → c²λ, its counterpart) D → D/c: the direction is unchanged."""
    c = 10.0**log_c
    shapes = [(6, 4), (9, 3)]
    params, grads = leaves(shapes, seed), random_grads(shapes, 1, seed)[0]
    kwargs: dict[str, Any] = dict(
        lr=1.0, momentum=0.0, block_size=4, grafting="none", relative_damping=relative
    )
    plain = one_step(params, grads, damping=0.1, **kwargs)
    scaled = one_step(
        params, [c * g for g in grads], damping=0.1 if relative else 0.1 * c * c, **kwargs
    )
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b * c, a, rtol=1e-9, atol=0.0)


@settings(max_examples=25, deadline=None)
@given(log_c=st.floats(-3.0, 3.0), seed=st.integers(0, 2**16))
def test_with_relative_damping_and_the_adam_graft_the_step_ignores_the_loss_scale(
    log_c: float, seed: int
) -> None:
    """The defaults: relative damping and the Adam graft (ε negligible here: it must be > 0)
    make every step, momentum and all, independent of a constant factor on the loss."""
    c = 10.0**log_c
    shapes = [(6, 4), (9, 3), (5,)]
    kwargs: dict[str, Any] = dict(
        lr=0.1, block_size=4, inverse_frequency=2, grafting="adam", grafting_epsilon=1e-30, **SYNC
    )
    a, b = leaves(shapes, seed), leaves(shapes, seed)
    with NGPlus(a, **kwargs) as plain, NGPlus(b, **kwargs) as scaled:
        for grads in random_grads(shapes, 4, seed):
            step_with(plain, a, grads)
            step_with(scaled, b, [c * g for g in grads])
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), lr=st.floats(1e-3, 10.0))
def test_the_adam_graft_gives_every_block_the_size_of_adams_step(seed: int, lr: float) -> None:
    """Per block of F (``block_size`` output rows) the step's norm is Adam's (torch.optim.Adam
    with β₁ = 0), whatever the curvature, so no block steps further than Adam would."""
    shapes, block_size = [(10, 3), (6, 2, 2)], 4
    ours = leaves(shapes, seed)
    theirs = snapshot(ours)
    for p in theirs:
        p.requires_grad_()
    adam = torch.optim.Adam(theirs, lr=lr, betas=(0.0, 0.99), eps=1e-8)
    kwargs: dict[str, Any] = dict(lr=lr, momentum=0.0, grafting="adam", grafting_beta2=0.99, **SYNC)
    with NGPlus(ours, block_size=block_size, inverse_frequency=2, **kwargs) as opt:
        for grads in random_grads(shapes, 4, seed):
            ours_before, theirs_before = snapshot(ours), snapshot(theirs)
            step_with(opt, ours, grads)
            step_with(adam, theirs, grads)
            for i in range(len(shapes)):
                mine = as_matrix(ours_before[i] - ours[i].detach())
                adams = as_matrix(theirs_before[i] - theirs[i].detach())
                for lo in range(0, mine.shape[0], block_size):
                    expected = adams[lo : lo + block_size].norm()
                    actual = mine[lo : lo + block_size].norm()
                    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=0.0)
                # Not vacuous: the direction is NG+'s, not Adam's.
                cosine = torch.nn.functional.cosine_similarity(
                    mine.flatten(), adams.flatten(), dim=0
                )
                assert cosine < 0.999


def test_no_first_moment_buffer_is_kept_and_an_old_one_is_dropped_on_load() -> None:
    """NG+ has β₁ = 0: the first moment is the gradient, so no parameter-sized buffer holds it;
    a checkpoint of an earlier release that has one loads and continues as if it had none."""
    batches = make_batches(8)
    kwargs: dict[str, Any] = dict(lr=0.02, block_size=16, inverse_frequency=2, **SYNC)
    model = mixed_model()
    with NGPlus(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:4])
        assert all("exp_avg" not in opt.state[p] for p in model.parameters())
        checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    runs = []
    for garbage in (False, True):
        resumed_model = mixed_model(seed=1)
        resumed_model.load_state_dict(checkpoint["model"])
        saved = roundtrip(checkpoint["opt"])
        if garbage:  # the earlier layout: an exp_avg per parameter (its value is never read)
            for i, p in enumerate(resumed_model.parameters()):
                saved["state"][i]["exp_avg"] = torch.full_like(p, 7.0)
        with NGPlus(resumed_model.parameters(), **kwargs) as resumed:
            resumed.load_state_dict(saved)
            train(resumed_model, resumed, batches[4:])
            assert all("exp_avg" not in resumed.state[p] for p in resumed_model.parameters())
        runs.append(snapshot(resumed_model.parameters()))
    assert_bitwise_equal(runs[0], runs[1])


# ------------------------------------------------------------------------------------- damping


def test_a_damping_schedule_is_called_at_inverse_steps_and_used() -> None:
    beta, frequency, steps = 0.8, 2, 7
    calls: list[int] = []

    def schedule(t: int) -> float:
        return 0.5 / t

    def recorded(t: int) -> float:
        calls.append(t)
        return schedule(t)

    (param,) = leaves([(4, 6)])
    grads = [g for (g,) in random_grads([(4, 6)], steps)]
    expected, _ = scheduled_directions(grads, beta, schedule, frequency, 0)
    with NGPlus(
        [param],
        lr=1.0,
        momentum=0.0,
        damping=recorded,
        curvature_beta=beta,
        inverse_frequency=frequency,
        **PAPER,
        **SYNC,
    ) as opt:
        for t, g in enumerate(grads, start=1):
            before = param.detach().clone()
            step_with(opt, [param], [g])
            assert_close(before - param.detach(), expected[t - 1])
    assert calls == [1, 2, 4, 6]
    # Not vacuous: a constant damping λ(1) would step differently at step 6.
    constant, _ = scheduled_directions(grads, beta, lambda t: schedule(1), frequency, 0)
    assert (constant[5] - expected[5]).abs().max() > 1e-3


def test_a_damping_function_is_saved_as_none_and_kept_by_the_loading_optimizer() -> None:
    batches = make_batches(12)
    kwargs: dict[str, Any] = dict(lr=0.02, block_size=16, inverse_frequency=2, root_staleness=1,
                                  stagger_roots=False)  # fmt: skip

    def damping(t: int) -> float:
        return 0.1 / (1 + t)

    model = mixed_model()
    with NGPlus(model.parameters(), damping=damping, **kwargs) as opt:
        train(model, opt, batches)
    uninterrupted = snapshot(model.parameters())

    model = mixed_model()
    opt = NGPlus(model.parameters(), damping=damping, **kwargs)
    train(model, opt, batches[:5])
    checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    assert opt.param_groups[0]["damping"] is damping  # saving does not touch the optimizer
    opt.close()
    assert checkpoint["opt"]["param_groups"][0]["damping"] is None

    calls: list[int] = []

    def same_damping(t: int) -> float:
        calls.append(t)
        return damping(t)

    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    with NGPlus(resumed_model.parameters(), damping=same_damping, **kwargs) as resumed:
        resumed.load_state_dict(checkpoint["opt"])
        assert resumed.param_groups[0]["damping"] is same_damping
        train(resumed_model, resumed, batches[5:])
    assert sorted(set(calls)) == [6, 8, 10, 12]
    assert_bitwise_equal(snapshot(resumed_model.parameters()), uninterrupted)
