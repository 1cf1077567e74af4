"""NG+ (Yang, Xu, Cui, Wen, Xu 2021) against the paper's update written out in float64.

For a weight matrix G ∈ ℝ^{m×n} (a conv weight read as C_out × C_in·k·k) NG+ keeps the output-side
Fisher F ← βF + (1 − β)Ĝ, with Ĝ = G Gᵀ (mini-batch) or (1/B) Σ_i G_i G_iᵀ (per-sample, the bias
folded in as an extra input column), and steps along D = (F + λI)⁻¹ G, the inverse refreshed only
every T steps. The references below solve that system directly with ``torch.linalg.solve``; the
optimizer computes an explicit inverse on the root pool, so agreement to 1e-10 checks the algebra.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import assert_bitwise_equal, make_batches, mixed_model, train
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from torch_shampoo import NGPlus
from torch_shampoo.ngplus import EARLIER_RULE

F64 = torch.float64
SYNC: dict[str, Any] = dict(async_roots=False, root_staleness=0)


# ----------------------------------------------------------------------------------- references


def as_matrix(t: Tensor) -> Tensor:
    """A parameter as NG+ sees it: (outputs, rest); a conv weight is C_out × C_in·k·k."""
    return t.reshape(t.shape[0], -1)


def outer(g: Tensor) -> Tensor:
    """G Gᵀ of the matrix view of ``g`` in float64."""
    m = as_matrix(g).to(F64)
    return m @ m.T


def solve_blocks(
    fisher: Tensor,
    g: Tensor,
    damping: float,
    block_size: int | None = None,
    relative: bool = False,
) -> Tensor:
    """D = (F_b + λ_b I)⁻¹ G_b per diagonal block b of ``block_size`` rows (one block if None);
    λ_b = λ, or λ·tr(F_b)/m_b with ``relative`` damping."""
    gm = as_matrix(g).to(F64)
    m = gm.shape[0]
    size = block_size or m
    out = torch.empty_like(gm)
    for lo in range(0, m, size):
        hi = min(m, lo + size)
        block = fisher[lo:hi, lo:hi]
        level = damping * block.trace() / (hi - lo) if relative else damping
        eye = torch.eye(hi - lo, dtype=F64)
        out[lo:hi] = torch.linalg.solve(block + level * eye, gm[lo:hi])
    return out.reshape(g.shape)


def graft_blocks(d: Tensor, size: Tensor, block_size: int | None) -> Tensor:
    """D_b·‖A_b‖/‖D_b‖ per block of ``block_size`` rows: NG+'s direction with the graft's size."""
    dm, am = as_matrix(d).clone(), as_matrix(size)
    step = block_size or dm.shape[0]
    for lo in range(0, dm.shape[0], step):
        dm[lo : lo + step] *= am[lo : lo + step].norm() / dm[lo : lo + step].norm()
    return dm.reshape(d.shape)


# The paper's rule: absolute damping, no bias correction of F, the step's size NG+'s own.
PAPER: dict[str, Any] = dict(relative_damping=False, bias_correction=False, grafting="none")


class PlainNGPlus:
    """NG+ with T = 1 written out: per step t and parameter (``block_size`` rows per block)

    F ← βF + (1 − β) G Gᵀ;  F̂ = F / (1 − βᵗ) (``bias_correction``) or F;
    D = (F̂_b + λ_b I)⁻¹ G_b per block, λ_b = λ or λ·tr(F̂_b)/m_b (``relative``);
    the graft's direction A = G ("sgd") or G / (√(v / (1 − β₂ᵗ)) + ε) with v ← β₂v + (1 − β₂)G²
    ("adam"), and D_b ← D_b·‖A_b‖/‖D_b‖ (a non-matrix: D = G·‖A‖/‖G‖, one block);
    D ← D + wd·W;  b ← μ b + D;  D ← D + μ b (Nesterov) or b;  W ← W − lr·D.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        momentum: float,
        weight_decay: float,
        damping: float,
        beta: float,
        nesterov: bool = False,
        block_size: int | None = None,
        relative: bool = False,
        bias_correction: bool = False,
        graft: str = "none",
        graft_beta2: float = 0.999,
        graft_epsilon: float = 1e-8,
    ) -> None:
        self.weights = [p.detach().to(F64, copy=True) for p in params]
        self.fishers = [
            torch.zeros(p.shape[0], p.shape[0], dtype=F64) if p.dim() >= 2 else None for p in params
        ]
        self.buffers = [torch.zeros_like(w) for w in self.weights]
        self.second = [torch.zeros_like(w) for w in self.weights]
        self.lr, self.mu, self.wd, self.damping = lr, momentum, weight_decay, damping
        self.beta, self.nesterov, self.block_size = beta, nesterov, block_size
        self.relative, self.bias_correction = relative, bias_correction
        self.graft, self.graft_beta2, self.graft_epsilon = graft, graft_beta2, graft_epsilon
        self.t = 0

    def graft_direction(self, i: int, g: Tensor) -> Tensor | None:
        if self.graft == "sgd":
            return g
        if self.graft == "adam":
            b2 = self.graft_beta2
            self.second[i] = b2 * self.second[i] + (1 - b2) * g * g
            v = self.second[i] / (1 - b2**self.t) if self.bias_correction else self.second[i]
            return g / (v.sqrt() + self.graft_epsilon)
        return None

    def step(self, grads: list[Tensor]) -> None:
        self.t += 1
        for i, (w, g) in enumerate(zip(self.weights, grads)):
            g = g.to(F64)
            size = self.graft_direction(i, g)
            fisher = self.fishers[i]
            if fisher is None:  # the identity as preconditioner: one block, grafted
                d = g if size is None else g * (size.norm() / g.norm())
            else:
                fisher = self.fishers[i] = self.beta * fisher + (1 - self.beta) * outer(g)
                if self.bias_correction:
                    fisher = fisher / (1 - self.beta**self.t)
                d = solve_blocks(fisher, g, self.damping, self.block_size, self.relative)
                if size is not None:
                    d = graft_blocks(d, size, self.block_size)
            d = d + self.wd * w
            if self.mu != 0:
                self.buffers[i] = self.mu * self.buffers[i] + d
                d = d + self.mu * self.buffers[i] if self.nesterov else self.buffers[i]
            self.weights[i] = w - self.lr * d


def scheduled_directions(
    grads: list[Tensor],
    beta: float,
    damping: Callable[[int], float],
    frequency: int,
    staleness: int,
) -> tuple[list[Tensor], set[int]]:
    """D_t = (F_s + λ(s) I)⁻¹ G_t where s is the refresh step whose inverse is in use at step t.

    Refreshes happen at s = 1 and every multiple of T = ``frequency``; the first inverse is in
    use from its own step, every later one from step s + ``staleness`` (or from the next
    refresh, if that comes first). Also returns the steps at which a new inverse comes into use.
    """
    m = grads[0].shape[0]
    fisher = torch.zeros(m, m, dtype=F64)
    in_use: tuple[Tensor, float] | None = None
    pending: tuple[int, Tensor, float] | None = None
    directions, changes = [], set()
    for t, g in enumerate(grads, start=1):
        fisher = beta * fisher + (1 - beta) * outer(g)
        for refresh in (False, True):
            if refresh and (t == 1 or t % frequency == 0):
                due = t if in_use is None else min(t + staleness, (t // frequency + 1) * frequency)
                pending = (due, fisher.clone(), damping(t))
            if pending is not None and pending[0] <= t:
                in_use, pending = pending[1:], None
                changes.add(t)
        if in_use is None:
            directions.append(g.to(F64))
        else:
            directions.append(solve_blocks(in_use[0], g, in_use[1]))
    return directions, changes


def random_grads(shapes: list[tuple[int, ...]], steps: int, seed: int = 0) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(steps)]


def leaves(shapes: list[tuple[int, ...]], seed: int = 1, dtype: torch.dtype = F64) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def step_with(opt: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype, copy=True)
    opt.step()


def assert_close(actual: Tensor, expected: Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=tol, atol=tol)


def snapshot(params: Iterator[Tensor] | list[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def gradients(params: list[Tensor]) -> list[Tensor]:
    """Copies of the ``.grad`` of every parameter (each must have one)."""
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    return [g.clone() for g in grads if g is not None]


def roundtrip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


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


# --------------------------------------------------------------------------- per-sample Fisher


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(F64)


MODELS = {"mlp": (mlp, (4,), ["0", "2"]), "cnn": (cnn, (2, 4, 4), ["0", "3"])}


def sample_loss(out: Tensor, target: Tensor) -> Tensor:
    """ℓ_i = ½‖out_i − y_i‖², one per sample."""
    return 0.5 * (out - target).pow(2).flatten(1).sum(1)


def data(input_shape: tuple[int, ...], batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, generator=gen, dtype=F64)
    return x, torch.randn(batch, 3, generator=gen, dtype=F64)


def per_sample_fisher(model: nn.Module, x: Tensor, y: Tensor, layer: str) -> Tensor:
    """(1/B) Σ_i G_i G_iᵀ with G_i = [∂ℓ_i/∂W  ∂ℓ_i/∂b] from torch.func, W as an m × n matrix."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return sample_loss(functional_call(model, p, (xi[None],)), yi[None]).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([grads[f"{layer}.weight"].flatten(2), grads[f"{layer}.bias"][..., None]], dim=2)
    return torch.einsum("bij,bkj->ik", g, g) / x.shape[0]


def mean_loss_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    sample_loss(model(x), y).mean().backward()
    opt.step()


@pytest.mark.parametrize("how", ["model=", "attach"])
@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_factor_is_the_brute_force_fisher_with_the_bias_folded(
    name: str, how: str
) -> None:
    make, input_shape, layers = MODELS[name]
    beta, damping = 0.9, 0.1
    model = make()
    x, y = data(input_shape, 5)
    expected = {layer: per_sample_fisher(model, x, y, layer) for layer in layers}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    kwargs: dict[str, Any] = dict(
        lr=1.0,
        momentum=0.0,
        damping=damping,
        curvature_beta=beta,
        inverse_frequency=1,
        **PAPER,
        **SYNC,
    )
    if how == "model=":
        opt = NGPlus(model.parameters(), statistics="per_sample", model=model, **kwargs)
    else:
        opt = NGPlus(model.parameters(), statistics="per_sample", **kwargs).attach(model)
    with opt:
        opt.zero_grad()
        sample_loss(model(x), y).mean().backward()
        names, params = zip(*model.named_parameters())
        grads = dict(zip(names, gradients(list(params))))
        opt.step()
        for layer in layers:
            weight, bias = (
                model.get_parameter(f"{layer}.weight"),
                model.get_parameter(f"{layer}.bias"),
            )
            factor = opt.state[weight]["factors"][0]
            assert_close(factor, (1 - beta) * expected[layer])
            assert torch.equal(opt.state[bias]["factors"][0], factor)
            # The direction of W̃ = [W b] is (F + λI)⁻¹ [G g_b] with the mini-batch gradient.
            g_tilde = torch.cat(
                [as_matrix(grads[f"{layer}.weight"]), grads[f"{layer}.bias"][:, None]], dim=1
            )
            d = solve_blocks((1 - beta) * expected[layer], g_tilde, damping)
            assert_close(
                before[f"{layer}.weight"] - weight.detach(), d[:, :-1].reshape(weight.shape)
            )
            assert_close(before[f"{layer}.bias"] - bias.detach(), d[:, -1])
            # Not vacuous: the per-sample Fisher is not the mini-batch G̃ G̃ᵀ.
            assert (expected[layer] - g_tilde @ g_tilde.T).abs().max() > 1e-3


@pytest.mark.parametrize("async_roots", [False, True])
def test_a_bias_shares_its_layers_inverse_instead_of_computing_it_again(
    async_roots: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With per-sample statistics W and b of a layer have one F (b is W̃'s last column), so b
    takes W's installed inverse: no job of its own, and the same steps as an optimizer that
    computes b's inverse separately."""
    kwargs: dict[str, Any] = dict(
        lr=0.05, inverse_frequency=2, root_staleness=1, async_roots=async_roots,
        stagger_roots=False,  # (a bias of its own would get a phase of its own)
    )

    def run(share: bool) -> tuple[list[Tensor], NGPlus, nn.Module]:
        model = mlp()
        opt = NGPlus(model.parameters(), statistics="per_sample", model=model, **kwargs)
        if not share:  # the same optimizer, every parameter on its own
            monkeypatch.setattr(opt, "_leader_of", lambda p: None)
            monkeypatch.setattr(opt, "_followers_of", lambda p: [])
        for seed in range(7):
            mean_loss_step(model, opt, *data((4,), 5, seed))
        opt.close()
        return snapshot(model.parameters()), opt, model

    shared, opt, model = run(True)
    apart, separate, _ = run(False)
    for a, b in zip(shared, apart):
        assert_close(a, b, tol=1e-12)
    for layer in ("0", "2"):
        weight, bias = (model.get_parameter(f"{layer}.{k}") for k in ("weight", "bias"))
        assert opt._leader_of(bias) is weight
        for x, y in zip(opt.state[weight]["roots"], opt.state[bias]["roots"]):
            assert torch.equal(x, y)
        assert torch.equal(opt.state[bias]["has_root"], opt.state[weight]["has_root"])
    # Roots of steps 1 (at once), 2 and 4 (installed a step later), 6 (at 7): four cycles,
    # each one root per factor of the weights only; separately, the biases' too.
    weights = sum(len(opt.state[p]["factors"]) for p in model.parameters() if p.dim() > 1)
    biases = sum(len(opt.state[p]["factors"]) for p in model.parameters() if p.dim() == 1)
    assert opt.root_stats()["roots_computed"] == 4 * weights
    assert separate.root_stats()["roots_computed"] == 4 * (weights + biases)


def test_a_shared_inverse_in_flight_survives_a_checkpoint_bitwise() -> None:
    """Saved after step 4, whose weight inverse is due at 5 (the bias has none in flight of
    its own): the resumed run copies it into the bias at 5, as the uninterrupted run does."""
    kwargs: dict[str, Any] = dict(
        lr=0.05, inverse_frequency=2, root_staleness=1, statistics="per_sample"
    )
    batches = [data((4,), 5, seed) for seed in range(8)]
    model = mlp()
    with NGPlus(model.parameters(), model=model, **kwargs) as opt:
        for x, y in batches:
            mean_loss_step(model, opt, x, y)
    uninterrupted = snapshot(model.parameters())

    model = mlp()
    with NGPlus(model.parameters(), model=model, **kwargs) as opt:
        for x, y in batches[:4]:
            mean_loss_step(model, opt, x, y)
        checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    saved = checkpoint["opt"]["state"]
    assert int(saved[0]["pending_due"]) == 5 and int(saved[1]["pending_due"]) == -1
    resumed_model = mlp()
    resumed_model.load_state_dict(checkpoint["model"])
    with NGPlus(resumed_model.parameters(), model=resumed_model, **kwargs) as resumed:
        resumed.load_state_dict(checkpoint["opt"])
        for x, y in batches[4:]:
            mean_loss_step(resumed_model, resumed, x, y)
    assert_bitwise_equal(snapshot(resumed_model.parameters()), uninterrupted)


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_fisher_undoes_the_batch_mean(name: str) -> None:
    """Doubling the batch with duplicated samples leaves F unchanged (it does not shrink)."""
    make, input_shape, layers = MODELS[name]
    x, y = data(input_shape, 4)
    factors = []
    for xs, ys in [(x, y), (torch.cat([x, x]), torch.cat([y, y]))]:
        model = make()
        with NGPlus(model.parameters(), statistics="per_sample", model=model, **SYNC) as opt:
            mean_loss_step(model, opt, xs, ys)
            factors.append(
                [opt.state[model.get_parameter(f"{k}.weight")]["factors"][0] for k in layers]
            )
    for small, doubled in zip(*factors):
        assert small.abs().max() > 1e-4
        assert_close(doubled, small, tol=1e-12)


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, dtype=F64)
        self.fc = nn.Linear(4, 3, dtype=F64)

    def forward(self, idx: Tensor) -> Tensor:
        return self.fc(self.emb(idx))


class WithGroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(2, 4, 3, groups=2, dtype=F64)
        self.fc = nn.Linear(16, 3, dtype=F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.grouped(x)).flatten(1))


@pytest.mark.parametrize(
    ("make", "unsupported"), [(WithEmbedding, "emb"), (WithGroupedConv, "grouped")]
)
def test_an_unsupported_module_warns_once_and_falls_back_to_minibatch(
    make: Callable[[], nn.Module], unsupported: str
) -> None:
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(3)
    if unsupported == "emb":
        inputs = [torch.randint(0, 7, (6,), generator=gen) for _ in range(3)]
    else:
        inputs = [torch.randn(6, 2, 4, 4, generator=gen, dtype=F64) for _ in range(3)]
    targets = [torch.randn(6, 3, generator=gen, dtype=F64) for _ in range(3)]
    beta = 0.8
    with pytest.warns(UserWarning, match=unsupported) as caught:
        opt = NGPlus(
            model.parameters(), statistics="per_sample", model=model, curvature_beta=beta, **SYNC
        )
    assert len([w for w in caught if issubclass(w.category, UserWarning)]) == 1
    weight = model.get_parameter(f"{unsupported}.weight")
    fc_weight = model.get_parameter("fc.weight")
    fc_expected = per_sample_fisher(model, inputs[0], targets[0], "fc")
    with opt, warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        fisher = torch.zeros(weight.shape[0], weight.shape[0], dtype=F64)
        for t, (x, y) in enumerate(zip(inputs, targets)):
            opt.zero_grad()
            sample_loss(model(x), y).mean().backward()
            assert weight.grad is not None
            fisher = beta * fisher + (1 - beta) * outer(weight.grad)
            opt.step()
            assert_close(opt.state[weight]["factors"][0], fisher)
            if t == 0:  # the supported layer next to it still gets per-sample statistics
                assert_close(opt.state[fc_weight]["factors"][0], (1 - beta) * fc_expected)
    assert not [w for w in later if issubclass(w.category, UserWarning)]


def _hooks(model: nn.Module) -> int:
    modules = sum(len(m._forward_hooks) for m in model.modules())
    params = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    return modules + params


def test_detach_removes_the_hooks() -> None:
    model = cnn()
    with NGPlus(model.parameters(), statistics="per_sample", model=model, **SYNC) as opt:
        assert _hooks(model) > 0
        opt.detach()
        assert _hooks(model) == 0
        opt.detach()  # idempotent
        assert _hooks(model) == 0
    with NGPlus(model.parameters(), statistics="minibatch") as opt, pytest.raises(ValueError):
        opt.attach(model)
    assert _hooks(model) == 0


def test_per_sample_without_a_model_raises_a_clear_error() -> None:
    model = mlp()
    x, y = data((4,), 5)
    with (
        NGPlus(model.parameters(), statistics="per_sample", **SYNC) as opt,
        pytest.raises(RuntimeError, match=r"per_sample.*attach\(model\)"),
    ):
        mean_loss_step(model, opt, x, y)


def test_attach_after_the_missing_model_error_trains_like_a_fresh_optimizer() -> None:
    """The error says "call optimizer.attach(model)": doing so must work, and the failed step
    must leave no trace (no step counted, no statistics)."""
    x, y = data((4,), 5)
    model = mlp()
    with NGPlus(model.parameters(), statistics="per_sample", **SYNC) as opt:
        with pytest.raises(RuntimeError, match="attach"):
            mean_loss_step(model, opt, x, y)
        opt.attach(model)
        for _ in range(3):
            mean_loss_step(model, opt, x, y)
    fresh = mlp()
    with NGPlus(fresh.parameters(), statistics="per_sample", model=fresh, **SYNC) as opt:
        for _ in range(3):
            mean_loss_step(fresh, opt, x, y)
    assert_bitwise_equal(snapshot(model.parameters()), snapshot(fresh.parameters()))


# ------------------------------------------------------------------- async roots equal sync ones


def ngplus_run(
    steps: int, make: Callable[[], nn.Module] | None = None, **kwargs: Any
) -> list[Tensor]:
    model = mixed_model() if make is None else make()
    extra = {"model": model} if kwargs.get("statistics") == "per_sample" else {}
    base = dict(lr=0.02, block_size=16, damping=0.01, momentum=0.5)
    with NGPlus(model.parameters(), **{**base, **kwargs}, **extra) as opt:
        train(model, opt, make_batches(steps))
    return snapshot(model.parameters())


def cnn32() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(100, 3))


@pytest.mark.parametrize(
    ("frequency", "staleness", "statistics"),
    [(1, 1, "minibatch"), (4, 3, "minibatch"), (4, 2, "per_sample")],
)
def test_async_roots_equal_sync_roots_with_the_same_staleness(
    frequency: int, staleness: int, statistics: str
) -> None:
    make = cnn32 if statistics == "per_sample" else None
    common = dict(inverse_frequency=frequency, root_staleness=staleness, statistics=statistics,
                  stagger_roots=True)  # (async's default; sync then repeats it)
    asynchronous = ngplus_run(30, make, async_roots=True, **common)
    synchronous = ngplus_run(30, make, async_roots=False, **common)
    assert_bitwise_equal(asynchronous, synchronous)
    # Not vacuous: without the delay the trajectory is different.
    fresh = ngplus_run(30, make, async_roots=False, **{**common, "root_staleness": 0})
    assert any(not torch.equal(a, b) for a, b in zip(fresh, synchronous))


# -------------------------------------------------------------------------- drop-in conventions

BAD_VALUES: list[tuple[str, Any, type[Exception]]] = [
    ("lr", -0.1, ValueError),
    ("lr", "fast", TypeError),
    ("momentum", 1.0, ValueError),
    ("momentum", -0.5, ValueError),
    ("weight_decay", -1e-4, ValueError),
    ("damping", 0.0, ValueError),
    ("damping", -1e-3, ValueError),
    ("damping", float("nan"), ValueError),
    ("curvature_beta", 1.0, ValueError),
    ("curvature_beta", -0.1, ValueError),
    ("inverse_frequency", 0, ValueError),
    ("inverse_frequency", 2.5, TypeError),
    ("block_size", 0, ValueError),
    ("nesterov", "yes", TypeError),
    ("root_staleness", -1, ValueError),
    ("max_root_failures", 0, ValueError),
    ("relative_damping", "yes", TypeError),
    ("bias_correction", 1, TypeError),
    ("grafting", "lamb", ValueError),
    ("grafting_beta2", 1.0, ValueError),
    ("grafting_epsilon", -1e-8, ValueError),
]
GOOD_VALUES: dict[str, Any] = dict(
    lr=0.1,
    momentum=0.0,
    weight_decay=0.0,
    damping=1e-6,
    curvature_beta=0.0,
    inverse_frequency=1,
    block_size=1,
    nesterov=False,
    root_staleness=0,
    max_root_failures=1,
    relative_damping=False,
    bias_correction=False,
    grafting="none",
    grafting_beta2=0.0,
    grafting_epsilon=1e-30,
)


@pytest.mark.parametrize(
    ("name", "value", "error"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES]
)
def test_a_bad_hyperparameter_is_refused_naming_it_and_its_value(
    name: str, value: Any, error: type[Exception]
) -> None:
    p = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(error, match=rf"{name}.*{re.escape(repr(value))}"):
        NGPlus([p], **{name: value})
    q = torch.zeros(3, requires_grad=True)
    with NGPlus([q]) as opt, pytest.raises(error, match=rf"{name}.*{re.escape(repr(value))}"):
        opt.add_param_group({"params": [p], name: value})
    # The same argument with a valid value is accepted.
    NGPlus([p], **{name: GOOD_VALUES[name]}).close()


@pytest.mark.parametrize(
    ("name", "choices"),
    [("statistics", ("minibatch", "per_sample")), ("root_method", ("eigh", "newton", "cholesky"))],
)
def test_an_unknown_choice_lists_the_valid_ones(name: str, choices: tuple[str, ...]) -> None:
    p = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=rf"{name}.*'bogus'") as info:
        NGPlus([p], **{name: "bogus"})
    assert all(choice in str(info.value) for choice in choices)
    for choice in choices:
        NGPlus([p], **{name: choice}).close()


def test_without_momentum_nesterov_changes_nothing() -> None:
    """Nesterov is the default; momentum=0 alone then gives the plain step (no error)."""
    shapes = [(6, 4), (5,)]
    runs = []
    for nesterov in (True, False):
        params = leaves(shapes)
        with NGPlus(params, momentum=0.0, nesterov=nesterov, inverse_frequency=2, **SYNC) as opt:
            for grads in random_grads(shapes, 4):
                step_with(opt, params, grads)
        runs.append(snapshot(params))
    assert_bitwise_equal(runs[0], runs[1])
    assert not torch.equal(runs[0][0], leaves(shapes)[0])


@pytest.mark.parametrize("split", [5, 6])
def test_state_dict_round_trip_continues_bitwise(split: int) -> None:
    """Saved with a root in flight (split 5: the root of step 4 is due at 7) or not."""
    kwargs: dict[str, Any] = dict(
        lr=0.02, block_size=16, inverse_frequency=4, root_staleness=3, damping=0.1
    )
    batches = make_batches(14)
    model = mixed_model()
    with NGPlus(model.parameters(), **kwargs) as opt:
        train(model, opt, batches)
    uninterrupted = snapshot(model.parameters())

    model = mixed_model()
    with NGPlus(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:split])
        checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    with NGPlus(resumed_model.parameters(), **{**kwargs, "damping": 0.5}) as resumed:
        resumed.load_state_dict(checkpoint["opt"])
        assert resumed.param_groups[0]["damping"] == 0.1  # the saved float wins
        train(resumed_model, resumed, batches[split:])
    assert_bitwise_equal(snapshot(resumed_model.parameters()), uninterrupted)


def test_step_lr_is_honoured() -> None:
    model = mixed_model()
    batches = make_batches(6)
    with NGPlus(model.parameters(), lr=0.02, block_size=16, inverse_frequency=2) as opt:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.0)
        start = snapshot(model.parameters())
        train(model, opt, batches[:3], after_step=lambda i: sched.step())
        assert opt.param_groups[0]["lr"] == 0.0
        moved = snapshot(model.parameters())
        train(model, opt, batches[3:], after_step=lambda i: sched.step())
    assert all(not torch.equal(a, b) for a, b in zip(start, moved))
    assert_bitwise_equal(snapshot(model.parameters()), moved)


def test_one_cycle_lr_cycles_lr_and_momentum() -> None:
    model = mixed_model()
    lrs, momenta = [], []
    kwargs: dict[str, Any] = dict(lr=0.002, damping=0.1, block_size=16, inverse_frequency=2)
    with NGPlus(model.parameters(), **kwargs) as opt:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.02, total_steps=12, base_momentum=0.8, max_momentum=0.95
        )

        def record(i: int) -> None:
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
            momenta.append(opt.param_groups[0]["momentum"])

        losses = train(model, opt, make_batches(11), after_step=record)
    assert max(lrs) > 10 * min(lrs)
    assert 0.8 <= min(momenta) < max(momenta) <= 0.95
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(loss == loss for loss in losses)


def test_param_groups_use_their_own_hyperparameters() -> None:
    shapes = [(6, 4), (5,), (3, 2, 2, 2)]
    defaults: dict[str, Any] = dict(lr=0.5, momentum=0.5, damping=1.0, **SYNC)
    settings: list[dict[str, Any]] = [
        dict(lr=0.1, damping=0.01, momentum=0.9, nesterov=True),
        dict(lr=0.03, momentum=0.0, weight_decay=0.1, inverse_frequency=2, block_size=2),
    ]
    together = leaves(shapes)
    apart = [p.detach().clone().requires_grad_() for p in together]
    groups = [
        {"params": together[:2], **settings[0]},
        {"params": together[2:], **settings[1]},
    ]
    combined = NGPlus(groups, **defaults)
    separate = [
        NGPlus(apart[:2], **{**defaults, **settings[0]}),
        NGPlus(apart[2:], **{**defaults, **settings[1]}),
    ]
    for grads in random_grads(shapes, 5):
        step_with(combined, together, grads)
        step_with(separate[0], apart[:2], grads[:2])
        step_with(separate[1], apart[2:], grads[2:])
    for opt in [combined, *separate]:
        opt.close()
    assert_bitwise_equal(snapshot(together), snapshot(apart))
    assert combined.param_groups[1]["block_size"] == 2
    assert len(combined.state[together[2]]["factors"]) == 2  # 3 outputs in blocks of 2


def test_closure_returns_its_loss() -> None:
    model = mixed_model()
    x, y = make_batches(1)[0]
    before = snapshot(model.parameters())
    with NGPlus(model.parameters(), lr=0.02) as opt:
        calls: list[Tensor] = []

        def closure() -> Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            calls.append(loss)
            return loss

        assert opt.step(closure) is calls[0]
        assert len(calls) == 1
        assert opt.step() is None
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "extra",
    [{}, {"maximize": True}, {"weight_decay": 0.1, "nesterov": True}],
    ids=["plain", "maximize", "nesterov-wd"],
)
def test_step_never_modifies_the_gradient(extra: dict[str, Any]) -> None:
    shapes = [(6, 4), (6,), (), (3, 2, 2, 2)]
    params = leaves(shapes, dtype=torch.float32)
    with NGPlus(params, inverse_frequency=1, **extra) as opt:
        for grads in random_grads(shapes, 4):
            for p, g in zip(params, grads):
                p.grad = g.float()
            kept = gradients(params)
            opt.step()
            assert_bitwise_equal(gradients(params), kept)


def test_maximize_equals_minimizing_the_negated_objective() -> None:
    shapes = [(6, 4), (6,)]
    up, down = leaves(shapes), leaves(shapes)
    with (
        NGPlus(up, maximize=True, inverse_frequency=2, **SYNC) as ascend,
        NGPlus(down, inverse_frequency=2, **SYNC) as descend,
    ):
        for grads in random_grads(shapes, 5):
            step_with(ascend, up, grads)
            step_with(descend, down, [-g for g in grads])
    assert_bitwise_equal(snapshot(up), snapshot(down))


@pytest.mark.parametrize("statistics", ["minibatch", "per_sample"])
def test_training_a_small_model_reduces_the_loss(statistics: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
    teacher = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 5, generator=gen) for _ in range(40)]
    extra = {"model": model} if statistics == "per_sample" else {}
    with NGPlus(
        model.parameters(),
        lr=0.02,
        damping=0.1,
        inverse_frequency=5,
        statistics=statistics,
        **extra,
    ) as opt:
        losses = []
        for x in xs:
            with torch.no_grad():
                y = teacher(x)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-5:]) < 0.1 * sum(losses[:5])


# ------------------------------------------------------------------------ multi-process training

DDP_STEPS, DDP_BATCH = 4, 6


def _ddp_batches() -> list[tuple[Tensor, Tensor]]:
    return [data((4,), DDP_BATCH, seed) for seed in range(DDP_STEPS)]


def _ddp_run(rank: int, store: str, out: str, statistics: str) -> None:
    """NG+ on a DDP-wrapped MLP in a 2-process gloo group, each rank on its half of every
    batch; saves the rank's final parameters to ``out``.rank."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = DistributedDataParallel(mlp())
    hooked = model if statistics == "per_sample" else None
    kwargs: dict[str, Any] = dict(lr=0.05, inverse_frequency=2, root_staleness=1,
                                  stagger_roots=False)  # (auto: off under several processes)
    with NGPlus(model.parameters(), statistics=statistics, model=hooked, **kwargs) as opt:
        half = DDP_BATCH // 2
        for x, y in _ddp_batches():
            lo = rank * half
            mean_loss_step(model, opt, x[lo : lo + half], y[lo : lo + half])
    torch.save([p.detach() for p in model.module.parameters()], f"{out}.{rank}")
    dist.destroy_process_group()
    os._exit(0)  # gloo's atexit teardown sometimes aborts spawned processes


@pytest.mark.parametrize("statistics", ["per_sample", "minibatch"])
def test_under_ddp_ranks_agree_and_equal_one_process_on_the_combined_batch(
    statistics: str, tmp_path: Path
) -> None:
    """Each rank's hooks see only its own samples; NG+ sums the per-sample statistics over the
    processes, so both ranks build the global batch's F: they stay bitwise identical and equal
    one process that sees every sample (gradients averaged by DDP, F summed by NG+)."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path / "params")
    mp.spawn(_ddp_run, args=(str(tmp_path / "store"), out, statistics), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    assert_bitwise_equal(ranks[0], ranks[1])
    model = mlp()
    hooked = {"model": model} if statistics == "per_sample" else {}
    kwargs: dict[str, Any] = dict(lr=0.05, inverse_frequency=2, root_staleness=1,
                                  stagger_roots=False)  # (auto: off under several processes)
    with NGPlus(model.parameters(), statistics=statistics, **hooked, **kwargs) as opt:
        for x, y in _ddp_batches():
            mean_loss_step(model, opt, x, y)
    for a, b in zip(ranks[0], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-12)
    # Not vacuous: the ranks' own halves give different statistics than the whole batch.
    assert not torch.equal(ranks[0][0], mlp().get_parameter("0.weight").detach())


def test_a_checkpoint_from_before_the_step_size_settings_continues_with_its_own_rule() -> None:
    """A checkpoint of the release before relative damping and the graft has no such keys in
    its groups (and an exp_avg per parameter): it loads into today's defaults and continues
    bitwise as the paper's rule it was trained with, not as the new defaults."""
    batches = make_batches(8)
    kwargs: dict[str, Any] = dict(lr=0.02, block_size=16, inverse_frequency=2, **SYNC)
    model = mixed_model()
    with NGPlus(model.parameters(), **kwargs, **PAPER) as opt:
        train(model, opt, batches)
    uninterrupted = snapshot(model.parameters())

    model = mixed_model()
    with NGPlus(model.parameters(), **kwargs, **PAPER) as opt:
        train(model, opt, batches[:4])
        old = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    for group in old["opt"]["param_groups"]:
        for key in EARLIER_RULE:
            del group[key]
    for i, p in enumerate(model.parameters()):
        old["opt"]["state"][i]["exp_avg"] = torch.zeros_like(p)
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(old["model"])
    with NGPlus(resumed_model.parameters(), **kwargs) as resumed:  # today's defaults
        resumed.load_state_dict(old["opt"])
        assert {k: resumed.param_groups[0][k] for k in EARLIER_RULE} == EARLIER_RULE
        train(resumed_model, resumed, batches[4:])
    assert_bitwise_equal(snapshot(resumed_model.parameters()), uninterrupted)


def test_with_per_sample_statistics_only_a_hooked_layers_bias_gets_a_factor() -> None:
    """A hooked layer's bias is W̃'s last column and shares its F; a vector the hooks do not
    see (a LayerNorm's scale and shift) has no Fisher estimate and takes the grafted gradient,
    exactly as with minibatch statistics."""

    def net(frozen: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
        for layer in (model[0], model[3]):
            layer.requires_grad_(not frozen)
        return model.to(F64)

    for frozen in (False, True):
        model, twin = net(frozen), net(frozen)
        params = [p for p in model.parameters() if p.requires_grad]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the LayerNorm has no per-sample statistics
            per_sample = NGPlus(params, statistics="per_sample", model=model, **SYNC)
        minibatch = NGPlus([p for p in twin.parameters() if p.requires_grad], **SYNC)
        with per_sample, minibatch:
            for seed in range(4):
                x, y = data((4,), 5, seed)
                mean_loss_step(model, per_sample, x, y)
                mean_loss_step(twin, minibatch, x, y)
            norm = model[1]
            assert all(per_sample.state[p]["factors"] == [] for p in norm.parameters())
            if not frozen:
                assert per_sample.state[model[0].bias]["factors"]  # shares the layer's F
            else:  # only the LayerNorm trains: its steps are the minibatch optimizer's
                for p, q in zip(norm.parameters(), twin[1].parameters()):
                    assert torch.equal(p, q)
                assert not torch.equal(norm.weight, torch.ones(6, dtype=F64))
