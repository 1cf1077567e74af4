"""A plainly written reference of the Shampoo update rule, for tests only.

It is deliberately slow and literal: one block at a time, one step of the rule at a time, all
arithmetic in float64, inverse roots by ``torch.linalg.eigh``. It does not import
``torch_shampoo.shampoo``, ``torch_shampoo.update.grafting`` or
``torch_shampoo.roots.matrix_roots``.

The block layout (which entries of a parameter form a block, and which dims of a block are
factored) is taken from ``torch_shampoo.layout.blocking``: it is shapes only, and it has its own
tests (``test_blocking.py``). Everything numeric is written out here.

The rule, per block, at step t = 1, 2, ...:

0. g = grad (-grad if maximize); with coupled weight decay, g <- g + wd * W.
1. For each factored dim i: F_i <- beta2 * F_i + w * G_(i) G_(i)^T, w = 1 if beta2 == 1 else
   1 - beta2, where G_(i) is the block unfolded along dim i (dim i as rows, all else as columns).
2. At t == start, and at t > start with t % frequency == phase (the parameter's phase: 0 unless
   ``phases`` gives one, as a staggered optimizer's ``stagger_roots`` does):
   X_i = (F_i / bc2 + eps I)^(-1/r), bc2 = 1 - beta2^t (1 if no bias correction or beta2 == 1),
   r = 2 * (number of factored dims) unless root_exponent is given. Before that, X_i = I.
3. m <- beta1 * m + (1 - beta1) * g; m_hat = m / (1 - beta1^t) (m_hat = m if no bias correction).
4. P = m_hat x_1 X_1 x_2 X_2 ... (mode products over the factored dims).
5. Grafting direction D from m_hat and an elementwise state v (see ``graft_direction``).
   Before start: P = D. From start on: P <- P * |D| / (|P| + 1e-16) (Frobenius norms), except
   for grafting "none", which leaves P alone (and has D = m_hat).
6. Decoupled weight decay: P <- P + wd * W.
7. Momentum mu: b <- mu * b + P; P = P + mu * b if nesterov else b.
8. W <- W - lr * P.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from torch_shampoo.layout.blocking import (
    BlockLayout,
    block_layout,
    merge_blocks,
    output_side_layout,
    split_blocks,
)

GRAFTINGS = ("adam", "adagrad", "rmsprop", "sgd", "none")
NORM_GUARD = 1e-16
"""Added to |P| in the grafting rescale, so a zero P does not divide by zero."""


def inverse_root(matrix: torch.Tensor, epsilon: float, exponent: float) -> torch.Tensor:
    """(matrix + epsilon I)^(-1/exponent) for a symmetric positive semi-definite ``matrix``.

    Through the eigendecomposition A = Q diag(lambda) Q^T: A^(-1/r) = Q diag(lambda^(-1/r)) Q^T.
    Rounding can push the smallest eigenvalue of A below epsilon (even below zero); then the
    whole spectrum is shifted up so that the smallest one is epsilon.
    """
    size = matrix.shape[0]
    a = matrix.double() + epsilon * torch.eye(size, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(a)
    smallest = eigenvalues.min()
    if smallest < epsilon:
        eigenvalues = eigenvalues - smallest + epsilon
    powered = eigenvalues ** (-1.0 / exponent)
    return eigenvectors @ torch.diag(powered) @ eigenvectors.T


def unfold(block: torch.Tensor, dim: int) -> torch.Tensor:
    """The block as a matrix: one row per index along ``dim``, the other dims flattened."""
    return block.movedim(dim, 0).reshape(block.shape[dim], -1)


def factor_statistic(block: torch.Tensor, dim: int) -> torch.Tensor:
    """G_(dim) G_(dim)^T: entry (a, b) sums G[..., a, ...] * G[..., b, ...] over the other dims."""
    rows = unfold(block, dim)
    return rows @ rows.T


def mode_product(block: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """block x_dim matrix: every fibre of ``block`` along ``dim`` is multiplied by ``matrix``."""
    rows = unfold(block, dim)
    product = matrix @ rows
    moved_shape = (matrix.shape[0], *[s for d, s in enumerate(block.shape) if d != dim])
    return product.reshape(moved_shape).movedim(0, dim)


def frobenius_norm(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.pow(2).sum().sqrt()


@dataclass
class BlockState:
    factored_dims: list[int]
    factors: list[torch.Tensor]
    """F_i, one per factored dim."""
    roots: list[torch.Tensor]
    """X_i, one per factored dim."""
    first_moment: torch.Tensor
    """m."""
    graft_state: torch.Tensor
    """v."""
    momentum_buffer: torch.Tensor
    """b."""


@dataclass
class ParamState:
    layout: BlockLayout
    blocks: list[BlockState] = field(default_factory=list)


class ReferenceShampoo:
    """Applies the rule to a list of tensors, given their gradients explicitly.

    ``step(grads)`` updates the tensors in place. Arguments mean what they mean for
    ``torch_shampoo.Shampoo``.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        momentum: float = 0.0,
        nesterov: bool = False,
        block_size: int = 1024,
        max_factor_dim: int = 8192,
        precondition_frequency: int = 20,
        start_preconditioning_step: int | None = None,
        bias_correction: bool = True,
        grafting: str = "adam",
        grafting_beta2: float = 0.999,
        grafting_epsilon: float = 1e-8,
        root_exponent: float | None = None,
        maximize: bool = False,
        merge_dims: bool | str = True,
        precondition_1d: bool = True,
        phases: Sequence[int] | None = None,
    ) -> None:
        if grafting not in GRAFTINGS:
            raise ValueError(f"unknown grafting {grafting!r}")
        self.params = list(params)
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.decoupled_weight_decay = decoupled_weight_decay
        self.momentum = momentum
        self.nesterov = nesterov
        self.precondition_frequency = precondition_frequency
        if start_preconditioning_step is None:
            start_preconditioning_step = precondition_frequency
        self.start = start_preconditioning_step
        self.bias_correction = bias_correction
        self.grafting = grafting
        self.grafting_beta2 = grafting_beta2
        self.grafting_epsilon = grafting_epsilon
        self.root_exponent = root_exponent
        self.maximize = maximize
        self.t = 0
        self.phases = list(phases) if phases is not None else [0] * len(self.params)

        self.states = []
        for param in self.params:
            if param.dim() == 1 and not precondition_1d:  # no factor: the graft alone
                layout = output_side_layout(tuple(param.shape), block_size, False)
            else:
                layout = block_layout(tuple(param.shape), block_size, max_factor_dim, merge_dims)
            state = ParamState(layout)
            for block_shape in layout.block_shapes:
                factored_dims = [d for d in range(len(block_shape)) if layout.factored[d]]
                zeros = torch.zeros(block_shape, dtype=torch.float64)
                state.blocks.append(
                    BlockState(
                        factored_dims=factored_dims,
                        factors=[
                            torch.zeros(block_shape[d], block_shape[d], dtype=torch.float64)
                            for d in factored_dims
                        ],
                        roots=[
                            torch.eye(block_shape[d], dtype=torch.float64) for d in factored_dims
                        ],
                        first_moment=zeros.clone(),
                        graft_state=zeros.clone(),
                        momentum_buffer=zeros.clone(),
                    )
                )
            self.states.append(state)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        self.t += 1
        for param, grad, state, phase in zip(
            self.params, grads, self.states, self.phases, strict=True
        ):
            root_step = self.is_root_step(phase)
            weights = param.double()
            g = grad.double()
            if self.maximize:
                g = -g
            if self.weight_decay != 0 and not self.decoupled_weight_decay:
                g = g + self.weight_decay * weights
            g_blocks = split_blocks(g.contiguous(), state.layout)
            w_blocks = split_blocks(weights.contiguous(), state.layout)
            updates = [
                self.block_update(block_state, g_block, w_block, root_step)
                for block_state, g_block, w_block in zip(
                    state.blocks, g_blocks, w_blocks, strict=True
                )
            ]
            update = merge_blocks(updates, state.layout)
            param.copy_(weights - self.lr * update)

    def is_root_step(self, phase: int = 0) -> bool:
        t, start = self.t, self.start
        return t == start or (t > start and t % self.precondition_frequency == phase)

    def block_update(
        self, s: BlockState, g: torch.Tensor, w: torch.Tensor, root_step: bool
    ) -> torch.Tensor:
        """Steps 1-7 of the rule for one block: returns P (the caller does W <- W - lr P)."""
        t = self.t
        beta1, beta2 = self.beta1, self.beta2

        # 1. Statistics.
        weight = 1.0 if beta2 == 1 else 1.0 - beta2
        for k, dim in enumerate(s.factored_dims):
            s.factors[k] = beta2 * s.factors[k] + weight * factor_statistic(g, dim)

        # 2. Inverse roots.
        if root_step and s.factored_dims:
            bc2 = 1.0 - beta2**t if self.bias_correction and beta2 < 1 else 1.0
            r = 2 * len(s.factored_dims) if self.root_exponent is None else self.root_exponent
            s.roots = [inverse_root(f / bc2, self.epsilon, r) for f in s.factors]

        # 3. First moment.
        s.first_moment = beta1 * s.first_moment + (1 - beta1) * g
        bc1 = 1.0 - beta1**t if self.bias_correction else 1.0
        m_hat = s.first_moment / bc1

        # 4. Precondition.
        p = m_hat
        for dim, root in zip(s.factored_dims, s.roots, strict=True):
            p = mode_product(p, root, dim)

        # 5. Grafting.
        d = self.graft_direction(s, g, m_hat)
        if t < self.start:
            p = d
        elif self.grafting != "none":
            p = p * (frobenius_norm(d) / (frobenius_norm(p) + NORM_GUARD))

        # 6. Decoupled weight decay.
        if self.weight_decay != 0 and self.decoupled_weight_decay:
            p = p + self.weight_decay * w

        # 7. Momentum (with mu = 0 this is P unchanged).
        mu = self.momentum
        s.momentum_buffer = mu * s.momentum_buffer + p
        p = p + mu * s.momentum_buffer if self.nesterov else s.momentum_buffer
        return p

    def graft_direction(self, s: BlockState, g: torch.Tensor, m_hat: torch.Tensor) -> torch.Tensor:
        """D, the direction whose norm the Shampoo step borrows; updates v from g."""
        t = self.t
        beta2g, eps = self.grafting_beta2, self.grafting_epsilon
        if self.grafting == "adam":
            s.graft_state = beta2g * s.graft_state + (1 - beta2g) * g * g
            bc2 = 1.0 - beta2g**t if self.bias_correction else 1.0
            return m_hat / ((s.graft_state / bc2).sqrt() + eps)
        if self.grafting == "adagrad":
            s.graft_state = s.graft_state + g * g
            return m_hat / (s.graft_state.sqrt() + eps)
        if self.grafting == "rmsprop":
            s.graft_state = beta2g * s.graft_state + (1 - beta2g) * g * g
            return m_hat / (s.graft_state.sqrt() + eps)
        # "sgd" and "none": the first moment itself.
        return m_hat
