"""Pure tensor functions of the step: the non-finite guard's flags, the mode products and the
grafted preconditioning of a parameter's blocks. No state, no Python value that changes from
step to step: the part of a step that ``torch.compile`` traces."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .blocking import BlockLayout, block_sums, split_blocks

__all__ = ["finite_blocks", "mode_products", "precondition", "scalar"]

GRAFT_NORM_EPS = 1e-16


def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A host 0-d tensor of the state dtype: dividing a state tensor by it rounds exactly as
    dividing by the Python float ``value`` does."""
    return torch.tensor(value, dtype=dtype)


def finite_blocks(
    g: torch.Tensor, layout: BlockLayout
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per block, is its gradient finite? Returns the flags as a list, as a tensor of the grid's
    shape (0-d for a single block) and the number of non-finite blocks.

    A block's float64 sum decides: it is non-finite iff an element is NaN or ±inf (a sum of
    finite float32 values cannot reach float64's range; float64 gradients near 1e308, whose
    squares overflow the statistics anyway, count as non-finite). All blocks take one reduction."""
    if layout.num_blocks == 1:
        cells = torch.isfinite(g.sum(dtype=torch.float64))
        return [cells], cells, cells.logical_not()
    cells = torch.isfinite(block_sums(g, layout, torch.float64))
    return list(cells.flatten().unbind()), cells, cells.logical_not().sum()


def mode_products(
    block: torch.Tensor, roots: Iterator[torch.Tensor], factored: tuple[bool, ...]
) -> torch.Tensor:
    """block ×₁ X_1 ×₂ X_2 … over the factored dims (each X symmetric)."""
    if block.dim() == 2 and all(factored):
        return next(roots) @ block @ next(roots)
    out = block
    for is_factored in factored:
        # Contract the leading dim and append the result as the last dim: after one pass over
        # all dims the order is restored.
        out = (
            torch.tensordot(out, next(roots), dims=([0], [0]))
            if is_factored
            else out.movedim(0, -1)
        )
    return out


def precondition(
    roots: Sequence[torch.Tensor],
    m_hat: torch.Tensor,
    direction: torch.Tensor | None,
    layout: BlockLayout,
    rooted: tuple[bool, ...] | None,
) -> torch.Tensor:
    """P = m̂ ×₁ X_1 ×₂ X_2 … per block, rescaled to the graft's norm per block; a block
    without its roots takes the graft's direction (m̂ without a graft)."""
    update = torch.empty_like(m_hat)
    remaining = iter(roots)
    per_block = sum(layout.factored)
    targets = split_blocks(update, layout)
    grafts = split_blocks(direction, layout) if direction is not None else None
    for b, block in enumerate(split_blocks(m_hat, layout)):
        if rooted is not None and not rooted[b]:
            for _ in range(per_block):
                next(remaining)
            targets[b].copy_(block if grafts is None else grafts[b])
            continue
        preconditioned = mode_products(block, remaining, layout.factored)
        if grafts is not None:
            scale = torch.linalg.vector_norm(grafts[b]) / (
                torch.linalg.vector_norm(preconditioned) + GRAFT_NORM_EPS
            )
            preconditioned = preconditioned * scale
        targets[b].copy_(preconditioned)
    return update
