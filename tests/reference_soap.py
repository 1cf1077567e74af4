"""A plainly written reference of the SOAP (eigenvalue-corrected Shampoo) rule, for tests only.

Literal and slow: one block at a time, float64, eigenvectors by ``torch.linalg.eigh``. It keeps
the first moment M in the *original* coordinates, as the SOAP paper writes it, and rotates it
at every step; the optimizer keeps it in the basis and moves it at basis changes. Agreement
checks that the two are the same rule. It imports only the (shapes-only) block layout.

Per block, at step t = 1, 2, ... (bases computed at step t installed at t + s, s =
``root_staleness``, never later than the next root step; a parameter's first ones at once):

0. g = grad (-grad if maximize); with coupled weight decay, g <- g + wd * W.
1. For each factored dim i: F_i <- beta * F_i + (1 - beta) * G_(i) G_(i)^T.
2. At t == start, and at t > start with t % frequency == 0 (a root step): if a basis exists
   and (t // frequency) % eigh_every != 0, every installed Q_i takes one power iteration
   (below) and that is all; else Q_i~ = eigenvectors(F_i). At the first one (Q_i = I before)
   the second moment moves into the basis as a diagonal: with O_i = Q_i^T Q_i~,
   V <- V x_i (O_i o O_i)^T; later, V is kept entry by entry. At a root step whose
   eigenvectors come later (s > 0) the installed Q_i (not the identity) take one power
   iteration with the current F_i (if basis_refresh): the columns of F_i Q_i, Gram-Schmidt
   from the largest eigenvalue's down.
3. G' = G x_1 Q_1^T x_2 Q_2^T ...; M <- b1 M + (1 - b1) g; M' = M x_1 Q_1^T ...;
   V <- b2 V + (1 - b2) G'^2.
4. N' = (M' / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps); N = N' x_1 Q_1 x_2 Q_2 ...
5. N <- N + wd W (decoupled); momentum mu: b <- mu b + N, N = N + mu b (nesterov) or b.
6. W <- W - lr N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from torch_shampoo.layout.blocking import (
    block_layout,
    merge_blocks,
    output_side_layout,
    split_blocks,
)


def unfold(block: torch.Tensor, dim: int) -> torch.Tensor:
    return block.movedim(dim, 0).reshape(block.shape[dim], -1)


def mode_product(block: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """Every fibre of ``block`` along ``dim`` multiplied by ``matrix``."""
    product = matrix @ unfold(block, dim)
    moved = (matrix.shape[0], *[s for d, s in enumerate(block.shape) if d != dim])
    return product.reshape(moved).movedim(0, dim)


@dataclass
class Block:
    dims: list[int]
    factors: list[torch.Tensor]
    bases: list[torch.Tensor]
    first: list[bool]
    m: torch.Tensor
    v: torch.Tensor
    b: torch.Tensor


class ReferenceSOAP:
    """``step(grads)`` updates ``params`` in place; arguments as for ``torch_shampoo.SOAP``."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        shampoo_beta: float | None = None,
        precondition_frequency: int = 10,
        start_preconditioning_step: int | None = None,
        block_size: int = 1024,
        max_factor_dim: int = 8192,
        precondition_1d: bool = False,
        merge_dims: bool = False,
        bias_correction: bool = True,
        momentum: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        root_staleness: int = 0,
        basis_refresh: bool = True,
        eigh_every: int = 5,
    ) -> None:
        self.params = list(params)
        self.staleness, self.refresh = root_staleness, basis_refresh
        self.eigh_every = eigh_every
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.wd, self.decoupled = weight_decay, decoupled_weight_decay
        self.beta = betas[1] if shampoo_beta is None else shampoo_beta
        self.frequency = precondition_frequency
        self.start = start_preconditioning_step or 1
        self.bias_correction, self.mu, self.nesterov = bias_correction, momentum, nesterov
        self.maximize = maximize
        self.t = 0
        self.layouts, self.blocks = [], []
        self.pending: list[tuple[int, list[list[torch.Tensor]]] | None] = [None] * len(self.params)
        for p in self.params:
            shape = tuple(p.shape)
            if len(shape) == 1 and not precondition_1d:
                layout = output_side_layout(shape, block_size, False)
            else:
                layout = block_layout(shape, block_size, max_factor_dim, merge_dims)
            self.layouts.append(layout)
            blocks = []
            for block_shape in layout.block_shapes:
                dims = [d for d in range(len(block_shape)) if layout.factored[d]]
                zeros = torch.zeros(block_shape, dtype=torch.float64)
                blocks.append(
                    Block(
                        dims=dims,
                        factors=[
                            torch.zeros(block_shape[d], block_shape[d]).double() for d in dims
                        ],
                        bases=[torch.eye(block_shape[d], dtype=torch.float64) for d in dims],
                        first=[True for _ in dims],
                        m=zeros.clone(),
                        v=zeros.clone(),
                        b=zeros.clone(),
                    )
                )
            self.blocks.append(blocks)

    def is_root_step(self) -> bool:
        return self.t == self.start or (self.t > self.start and self.t % self.frequency == 0)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        self.t += 1
        t = self.t
        for i, (p, grad, layout, blocks) in enumerate(
            zip(self.params, grads, self.layouts, self.blocks)
        ):
            pending = self.pending[i]
            if pending is not None and pending[0] <= t:  # bases of an earlier root step
                self.install(blocks, pending[1])
                self.pending[i] = None
            w = p.double()
            g = -grad.double() if self.maximize else grad.double()
            if self.wd != 0 and not self.decoupled:
                g = g + self.wd * w
            g_blocks = split_blocks(g.contiguous(), layout)
            for s, gb in zip(blocks, g_blocks):
                for k, dim in enumerate(s.dims):
                    rows = unfold(gb, dim)
                    s.factors[k] = self.beta * s.factors[k] + (1 - self.beta) * rows @ rows.T
            first = all(all(s.first) for s in blocks)  # no basis anywhere yet: at once
            f = self.frequency
            if self.is_root_step() and not first and (t // f) % self.eigh_every != 0:
                for s in blocks:  # no eigendecomposition at this root step: a power iteration
                    for k in range(len(s.dims)):
                        if not s.first[k]:
                            s.bases[k] = power_iteration(s.factors[k], s.bases[k])
            elif self.is_root_step() and any(s.dims for s in blocks):
                new = [[torch.linalg.eigh(f).eigenvectors for f in s.factors] for s in blocks]
                due = t if first else min(t + self.staleness, (t // f + 1) * f)
                if due == t:
                    self.install(blocks, new)
                else:
                    self.pending[i] = (due, new)
                    if self.refresh:
                        for s in blocks:
                            for k in range(len(s.dims)):
                                if not s.first[k]:
                                    s.bases[k] = power_iteration(s.factors[k], s.bases[k])
            pieces = zip(blocks, g_blocks, split_blocks(w, layout))
            update = merge_blocks([self.block_step(s, gb, wb) for s, gb, wb in pieces], layout)
            p.copy_(w - self.lr * update)

    @staticmethod
    def install(blocks: list[Block], new: list[list[torch.Tensor]]) -> None:
        for s, bases in zip(blocks, new):
            for k, (dim, basis) in enumerate(zip(s.dims, bases)):
                if s.first[k]:  # V is Adam's, in the original coordinates: moved as a diagonal
                    overlap = s.bases[k].T @ basis
                    s.v = mode_product(s.v, (overlap * overlap).T, dim)
                s.bases[k], s.first[k] = basis, False

    def block_step(self, s: Block, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = self.t
        rotated = g
        s.m = self.b1 * s.m + (1 - self.b1) * g
        m_rotated = s.m
        for k, dim in enumerate(s.dims):
            rotated = mode_product(rotated, s.bases[k].T, dim)
            m_rotated = mode_product(m_rotated, s.bases[k].T, dim)
        s.v = self.b2 * s.v + (1 - self.b2) * rotated * rotated
        bc1 = 1 - self.b1**t if self.bias_correction else 1.0
        bc2 = 1 - self.b2**t if self.bias_correction else 1.0
        n = (m_rotated / bc1) / ((s.v / bc2).sqrt() + self.eps)
        for k, dim in enumerate(s.dims):
            n = mode_product(n, s.bases[k], dim)
        if self.wd != 0 and self.decoupled:
            n = n + self.wd * w
        if self.mu != 0:
            s.b = self.mu * s.b + n
            n = n + self.mu * s.b if self.nesterov else s.b
        return n


def power_iteration(factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """One step: the columns of F Q, Gram-Schmidt orthonormalized from the largest
    eigenvalue's column down (``basis`` holds them in ascending order), each keeping its
    direction."""
    columns = list((factor @ basis).T)[::-1]
    done: list[torch.Tensor] = []
    for a in columns:
        for q in done:
            a = a - (q @ a) * q
        done.append(a / a.norm())
    return torch.stack(done[::-1], dim=1)
