"""NG+ written out in float64 for the NG+ tests (test_ngplus*.py): the paper's update solved
directly (``PlainNGPlus``), block helpers, and the small models and data the tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

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


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)

def sample_loss(out: Tensor, target: Tensor) -> Tensor:
    """ℓ_i = ½‖out_i − y_i‖², one per sample."""
    return 0.5 * (out - target).pow(2).flatten(1).sum(1)


def data(input_shape: tuple[int, ...], batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, generator=gen, dtype=F64)
    return x, torch.randn(batch, 3, generator=gen, dtype=F64)

def mean_loss_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    sample_loss(model(x), y).mean().backward()
    opt.step()
