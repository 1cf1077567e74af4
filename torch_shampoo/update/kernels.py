"""Pure tensor functions of the step on stacks of blocks (n, *block): the non-finite guard's
flags, the statistics, the mode products and the graft's rescaling. No state, no Python value
that changes from step to step: the part of a step that ``torch.compile`` traces."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layout import compact
from ..layout.blocking import BlockLayout, block_sums

__all__ = [
    "accumulate_statistics",
    "basis_drift",
    "curvature_statistics",
    "eigen_roots",
    "finite_blocks",
    "graft_stacks",
    "mode_products",
    "mode_products_chunked",
    "mode_products_stack",
    "power_step",
]

GRAFT_NORM_EPS = 1e-16


def finite_blocks(g: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, is its gradient finite? The flags in the grid's shape (0-d for one block) and
    the number of non-finite blocks, from one float64 sum per block (finite float32 values cannot
    overflow it; float64 ones near 1e308 count as non-finite, their squares would anyway)."""
    if layout.num_blocks == 1:
        cells = torch.isfinite(g.sum(dtype=torch.float64))
        return cells, cells.logical_not()
    cells = torch.isfinite(block_sums(g, layout, torch.float64))
    return cells, cells.logical_not().sum()


def _unfold(blocks: torch.Tensor, dim: int) -> torch.Tensor:
    """A stack (n, *block) unfolded along block dim ``dim``: (n, d, rest); a view for dim 0, -1."""
    n, d = blocks.shape[0], blocks.shape[1 + dim]
    if dim == 0:
        return blocks.reshape(n, d, -1)
    if dim == blocks.dim() - 2:
        return blocks.reshape(n, -1, d).mT
    return blocks.movedim(1 + dim, 1).reshape(n, d, -1)


OUTER_PRODUCT_MIN = 64
"""Vector blocks of at least this length accumulate g gᵀ as a scale and an ``addcmul``: on the
CPU a batched matmul of inner dimension 1 ran 3–7× slower (2 × 512: 0.71 ms against 0.11 ms).
Decided by the block's length alone, so a block's bits do not depend on its stack."""


GRAM_SPLIT_MIN = 512
"""Factors of at least this size, with U at least d/4 columns wide, add U Uᵀ by halves: both
diagonal blocks and the upper off-diagonal one by ``baddbmm``, the lower one the upper's
transpose (¾ of the flops). Against one ``baddbmm`` on 1 and 2 CPU threads: d × m = 1024 × 1024
0.76–0.79×, 1024 × 256 0.83–0.88×, 512 × 256 0.84–0.87×; but 1024 × 128 0.98×, 1024 × 64 1.15×,
128 × 128 1.36×. Decided by d and m alone: a factor's bits do not depend on its stack."""


def _gram_update(
    f: torch.Tensor, u: torch.Tensor, beta2: float, weight: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """β₂·f + w·U Uᵀ of stacks f (n, d, d) and U (n, d, m): in place (``out`` None) or in
    ``out``; by halves from :data:`GRAM_SPLIT_MIN` (U at least d/4 wide)."""
    d = f.shape[-1]
    if d < GRAM_SPLIT_MIN or 4 * u.shape[-1] < d:
        if out is None:
            return f.baddbmm_(u, u.mT, beta=beta2, alpha=weight)
        return torch.baddbmm(f, u, u.mT, beta=beta2, alpha=weight, out=out)
    new = f if out is None else out.copy_(f)
    h = d // 2
    top, bottom = u[:, :h], u[:, h:]
    new[:, :h, :h].baddbmm_(top, top.mT, beta=beta2, alpha=weight)
    new[:, h:, h:].baddbmm_(bottom, bottom.mT, beta=beta2, alpha=weight)
    new[:, :h, h:].baddbmm_(top, bottom.mT, beta=beta2, alpha=weight)
    new[:, h:, :h].copy_(new[:, :h, h:].mT)
    return new


def accumulate_statistics(
    factors: Sequence[torch.Tensor],
    blocks: torch.Tensor,
    factored: tuple[bool, ...],
    beta2: float,
    flags: torch.Tensor | None,
    triangles: Sequence[compact.Triangles] | None = None,
) -> None:
    """F_k ← β₂F_k + w·G_(k)G_(k)ᵀ per factored dim k of a stack (n, *block), one batched matmul
    each (w = 1 − β₂, or 1 for β₂ = 1). A block whose ``flags`` entry is False keeps its factors;
    ``triangles`` (compact state): per dim, whose ``factor_mask`` is the triangle written."""
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    outer = blocks.dim() == 2 and blocks.shape[1] >= OUTER_PRODUCT_MIN
    dims = [dim for dim, is_factored in enumerate(factored) if is_factored]
    for k, (dim, factor) in enumerate(zip(dims, factors)):
        unfolded = _unfold(blocks, dim)
        mask = None if triangles is None else triangles[k]
        if flags is None and mask is None:
            if outer:
                if beta2 != 1.0:  # (β₂ = 1: nothing to scale)
                    factor.mul_(beta2)
                factor.addcmul_(unfolded, unfolded.mT, value=weight)
            else:
                _gram_update(factor, unfolded, beta2, weight)
            continue
        if mask is not None:
            _compact_statistics(factor, unfolded, outer, beta2, weight, mask, flags)
            continue
        assert flags is not None
        if outer:
            new = torch.addcmul(factor * beta2, unfolded, unfolded.mT, value=weight)
        else:
            new = _gram_update(factor, unfolded, beta2, weight, torch.empty_like(factor))
        torch.where(flags.view(-1, 1, 1), new, factor, out=factor)


def _compact_statistics(
    factor: torch.Tensor,
    unfolded: torch.Tensor,
    outer: bool,
    beta2: float,
    weight: float,
    triangles: compact.Triangles,
    flags: torch.Tensor | None,
) -> None:
    """The statistics of a compact stack's factors (``triangles.factor_mask``), chunk by chunk of
    rows (:func:`.compact.chunk_rows`): the new matrices in one scratch, their triangle written
    (the same products as full matrices', row by row: the same bits)."""
    n, rows = factor.shape[0], compact.chunk_rows(factor)
    scratch = factor.new_empty((min(rows, n), *factor.shape[1:]))
    for start in range(0, n, rows):
        f, u = factor[start : start + rows], unfolded[start : start + rows]
        new = scratch[: f.shape[0]]
        if outer:
            torch.mul(f, beta2, out=new).addcmul_(u, u.mT, value=weight)
        else:
            _gram_update(f, u, beta2, weight, new)
        mask = triangles.factor_mask
        if flags is None:
            compact.write(f, new, mask, upper=triangles.factor_upper)
        else:  # (a compact stack's view: in place too)
            torch.where(mask & flags[start : start + rows].view(-1, 1, 1), new, f, out=f)


def mode_products_stack(
    blocks: torch.Tensor,
    roots: Sequence[torch.Tensor],
    factored: tuple[bool, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """block ×₁ X_1 ×₂ X_2 … over the factored dims, for every block of a stack (n, *block)
    with its own roots (each X symmetric); new, or written into ``out`` (the stack's shape)."""
    if blocks.dim() == 3 and all(factored):
        return torch.bmm(torch.bmm(roots[0], blocks), roots[1], out=out)
    if blocks.dim() == 2 and factored[0]:  # vectors: gᵀX per block
        into = None if out is None else out.unsqueeze(1)
        return torch.bmm(blocks.unsqueeze(1), roots[0], out=into).squeeze(1)
    products = mode_products(blocks, roots, factored)
    return products if out is None else out.copy_(products)


def mode_products_chunked(
    blocks: torch.Tensor,
    views: Sequence[torch.Tensor],
    triangles: Sequence[compact.Triangles] | None,
    factored: tuple[bool, ...],
) -> torch.Tensor:
    """:func:`mode_products_stack` with roots as stored: compact ones (``views``: the
    ``root_mask`` triangles of ``triangles``) or full (``triangles`` None), maybe narrower than
    ``blocks`` (bfloat16), chunk by chunk of rows (:func:`.compact.chunk_rows`): each chunk's
    roots made wide, then full, in scratch reused by the next chunk, used while in cache (the same
    products row by row: the same bits). Widened first: the gather (``index_select``) ran 6×
    faster in float32 than in bfloat16 (102 µs with the widening against 598 µs, 16 × 128²)."""
    n, dtype = blocks.shape[0], blocks.dtype

    def made(view: torch.Tensor, k: int, into: torch.Tensor | None = None) -> torch.Tensor:
        if triangles is None:
            return view
        return compact.full(view, triangles[k].root_mask, triangles[k].root_upper, into)

    rows = min((compact.chunk_rows(v) for v in views), default=n)
    if rows >= n:
        roots = [made(v.to(dtype), k) for k, v in enumerate(views)]
        return mode_products_stack(blocks, roots, factored)
    out = blocks.new_empty(blocks.shape)
    wide = [None if v.dtype == dtype else blocks.new_empty((rows, *v.shape[1:])) for v in views]
    scratch = [None if triangles is None else blocks.new_empty((rows, *v.shape[1:])) for v in views]
    for start in range(0, n, rows):
        chunk = slice(start, start + rows)
        size = min(rows, n - start)
        roots = [v[chunk] if w is None else w[:size].copy_(v[chunk]) for v, w in zip(views, wide)]
        roots = [made(r, k, None if s is None else s[:size])
                 for k, (r, s) in enumerate(zip(roots, scratch))]  # fmt: skip
        mode_products_stack(blocks[chunk], roots, factored, out=out[chunk])
    return out


def mode_products(
    blocks: torch.Tensor, matrices: Sequence[torch.Tensor], factored: tuple[bool, ...]
) -> torch.Tensor:
    """out[.., a, ..] = Σ_k block[.., k, ..]·M[k, a] along every factored dim in turn, for every
    block of a stack (n, *block) with its own ``matrices`` (one (n, d, d) per factored dim)."""
    n, out, remaining = blocks.shape[0], blocks, iter(matrices)
    for is_factored in factored:
        moved = out.movedim(1, -1)  # contract the leading block dim, append it as the last
        if is_factored:
            shape = moved.shape
            out = torch.matmul(moved.reshape(n, -1, shape[-1]), next(remaining)).view(shape)
        else:
            out = moved
    return out


def graft_stacks(
    stacks: Sequence[torch.Tensor], directions: Sequence[torch.Tensor | None]
) -> list[torch.Tensor]:
    """P·‖D‖/(‖P‖ + eps) per block of every stack (n, *block) of Shampoo's directions P, as new
    tensors (D: the graft's, None: P as it is); single-block stacks' norms by ``_foreach_norm``."""
    out = list(stacks)
    singles, single_directions, rows = [], [], []
    for i, (p, d) in enumerate(zip(stacks, directions)):
        if d is None:
            continue
        if p.shape[0] == 1:
            singles.append(p)
            single_directions.append(d)
            rows.append(i)
        else:
            norms = torch.linalg.vector_norm(p.flatten(1), dim=1).add_(GRAFT_NORM_EPS)
            scale = torch.linalg.vector_norm(d.flatten(1), dim=1).div_(norms)
            out[i] = p * scale.view(-1, *(1,) * (p.dim() - 1))
    if singles:
        norms = torch._foreach_norm(singles)
        torch._foreach_add_(norms, GRAFT_NORM_EPS)
        scales = torch._foreach_div(torch._foreach_norm(single_directions), norms)
        for i, scaled in zip(rows, torch._foreach_mul(singles, scales)):
            out[i] = scaled
    return out


def curvature_statistics(
    factors: Sequence[torch.Tensor],
    curvature: torch.Tensor,
    layout: BlockLayout,
    beta2: float,
    cells: torch.Tensor | None,
) -> None:
    """F_b ← β₂F_b + (1 − β₂)·Ĝ[rows_b, rows_b] per block b (one factor each, over the output dim)
    from NG+'s per-sample Ĝ; a block whose flag in ``cells`` is False keeps its factor."""
    flags = None if cells is None else cells.reshape(-1)
    for b, (factor, offset, size) in enumerate(zip(factors, layout.offsets, layout.block_shapes)):
        rows = slice(offset[0], offset[0] + size[0])
        if flags is None:
            factor.mul_(beta2).add_(curvature[rows, rows], alpha=1.0 - beta2)
        else:
            new = (factor * beta2).add_(curvature[rows, rows], alpha=1.0 - beta2)
            torch.where(flags[b], new, factor, out=factor)


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def power_step(bases: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """One step of orthogonal (power) iteration from ``bases`` (n, d, d), columns ordered by
    ascending eigenvalue: Q = orth(F Q), the QR taken from the largest eigenvalue's column down,
    each column keeping its direction; in ``bases``' dtype. SOAP's basis refresh and Shampoo's
    warm-started roots (:func:`eigen_roots`) both take it; bfloat16 bases in float32."""
    bases = bases.to(_work(bases.dtype))
    # QR by its two LAPACK halves (torch.linalg.qr's own: the same Q), R's diagonal read off
    # the first's result: no R made (a triu copy, 6% of a 1024² warm root)
    reflectors, tau = torch.geqrf(torch.matmul(factors.to(bases.dtype), bases.flip(-1)))
    q = torch.linalg.householder_product(reflectors, tau)  # (columns by descending eigenvalue)
    signs = torch.where(torch.diagonal(reflectors, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs.unsqueeze(-2)).flip(-1)


def _rayleigh(
    bases: torch.Tensor, a: torch.Tensor, drift: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """λ = diag(QᵀAQ) and (``drift``) ‖offdiag(QᵀAQ)‖_F / ‖A‖_F from one product AQ (Q
    orthogonal: ‖QᵀAQ‖_F = ‖AQ‖_F, so ‖offdiag‖² = ‖AQ‖² − Σλ², summed in float64)."""
    moved = torch.matmul(a, bases)
    quotients = (bases * moved).sum(-2)
    if not drift:
        return quotients, None
    whole = moved.double().square().sum((-2, -1))
    off = (whole - quotients.double().square().sum(-1)).clamp_(min=0.0)
    return quotients, (off / torch.where(whole > 0, whole, 1.0)).sqrt().to(bases.dtype)


def basis_drift(bases: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per row, how far ``bases`` are from diagonalizing ``factors``: ‖offdiag(QᵀFQ)‖_F / ‖F‖_F
    (Purifying Shampoo's criterion; 0 for an exact eigenbasis, to rounding)."""
    bases = bases.to(_work(bases.dtype))
    found = _rayleigh(bases, factors.to(bases.dtype))[1]
    assert found is not None
    return found


def eigen_roots(
    bases: torch.Tensor,
    factors: torch.Tensor,
    scale: float,
    exponent: float,
    epsilon: float,
    relative: bool,
    drift: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse roots X = Q diag(λ + ε)^(−1/r) Qᵀ of the factors (n, d, d) in the bases Q
    (n, d, d), λ = diag(QᵀAQ) their Rayleigh quotients, A = F/``scale``, with the conventions
    of the pool's exact roots (:func:`torch_shampoo.roots.pool.solve`): ``relative``: ε·τ with
    τ = tr(A)/d (τ ≤ 0 or not finite: 1); λ − λ_min + ε where λ_min + ε < ε. In ``bases``'
    dtype, on their device, no host sync. Returns the roots, per row whether it is usable (its
    root finite, the shifted λ_min > 0) and (``drift``, else None) the basis's drift
    ‖offdiag(QᵀAQ)‖_F / ‖A‖_F."""
    bases = bases.to(_work(bases.dtype))  # (bfloat16 state: float32 math)
    a = factors.to(bases.dtype) / scale
    level = None
    if relative:
        level = a.diagonal(dim1=-2, dim2=-1).mean(-1)
        level = torch.where(level > 0, level, 1.0).nan_to_num_(1.0, 1.0, 1.0)[:, None, None]
        a = a / level
    quotients, drifts = _rayleigh(bases, a, drift)
    values = quotients + epsilon
    smallest = values.amin(-1, keepdim=True)
    values = torch.where(smallest < epsilon, (values - smallest) + epsilon, values)
    scaled = bases * values.pow(-0.5 / exponent).unsqueeze(-2)
    roots = torch.matmul(scaled, scaled.mT)
    roots = roots.mT.mul(0.5).add_(roots, alpha=0.5)  # symmetric to the last bit
    if level is not None:
        roots = roots * level.pow(-1.0 / exponent)
    ok = (values.amin(-1) > 0) & torch.isfinite(roots).flatten(1).all(1)
    return roots, ok, drifts
