"""SOAP: eigenvalue-corrected Shampoo, Adam in the eigenbasis of Shampoo's factors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from . import settings
from .config import EngineConfig
from .engine import PreconditionerEngine

__all__ = ["SOAP"]


class SOAP(PreconditionerEngine):
    r"""SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's factors, the bases computed
    on CPU threads while training goes on.

    A drop-in replacement for ``torch.optim.Adam`` / ``AdamW``: **lr, betas, eps and
    weight_decay mean what they mean there** and transfer::

        with torch_shampoo.SOAP(model.parameters(), lr=3e-4, weight_decay=0.1) as opt:
            ...

    For every block G of the gradient (blocks as in :class:`Shampoo`) and step t = 1, 2, …::

        g  = ∇ (−∇ if maximize);  g += wd·W                 if not decoupled_weight_decay
        F_i ← β F_i + (1 − β) G_(i) G_(i)ᵀ  for each factored dim i      (β = shampoo_beta)
        Q_i = eigenvectors(F_i)         at eigh root steps, float64 on CPU (before: Q_i = I)
        Q_i = orth(F_i Q_i)             at the other root steps (a power iteration, as SOAP)
        G' = G ×₁ Q_1ᵀ ×₂ Q_2ᵀ …                                  (Q_Lᵀ G Q_R for a matrix)
        m' ← β₁ m' + (1 − β₁) G';   v' ← β₂ v' + (1 − β₂) G'²         (in the basis)
        N' = (m' / (1 − β₁ᵗ)) / (√(v' / (1 − β₂ᵗ)) + eps)
        N  = N' ×₁ Q_1 ×₂ Q_2 …                                   (Q_L N' Q_Rᵀ)
        N  ← N + wd·W                                        if decoupled_weight_decay
        b  ← μ b + N;  N = N + μ b (nesterov) or b           if momentum μ > 0
        W  ← W − lr·N

    New bases take the moments with them (:mod:`torch_shampoo.update.eigenbasis`). Before a
    block's first basis the step is Adam's. Root steps and staleness are as in :class:`Shampoo`,
    but only the basis is s steps old: the scales are updated at every step. The first root step
    and every ``eigh_every``-th one are *eigh root steps* (exact bases from the pool); at the
    others, and (``basis_refresh``) at an eigh root step whose bases come later, the installed
    bases take one power iteration on the device (QR of F_i Q_i), the SOAP paper's update.

    Args:
        params: parameters or parameter groups; every hyperparameter below except
            ``async_roots`` and ``root_workers`` may differ per group.
        lr, betas, eps, weight_decay: Adam's (``decoupled_weight_decay=True``: AdamW's).
        decoupled_weight_decay: add wd·W to the step (AdamW) instead of to the gradient.
        shampoo_beta: β of the factors' moving average (``None``: β₂).
        precondition_frequency: steps between basis updates (root steps).
        eigh_every: root steps per exact eigendecomposition (the pool's float64 ``eigh``);
            1: at every root step. The default 5 (every 50 steps) left the steps to Adam's
            loss unchanged against 1 on the char-LM and digits demos (140 and 113 vs 140 and
            114) and took SOAP's mean training step on a 2-core CPU from 1.12-1.24× Shampoo's
            to 0.78-0.90× (the pool's eigh competes with training for the cores). A state
            dict saved before this setting existed loads with 1, as it was trained.
        basis_refresh: at an eigh root step whose bases come later (staleness > 0), refresh
            the installed ones by a power iteration meanwhile.
        start_preconditioning_step: first root step (``None``: 1, as the SOAP paper: the first
            basis, from the first gradient, is used from step 1; measured against starting at
            the frequency (10): char-LM 148 vs 179 steps to Adam's loss, digits 111 vs 118, both
            measured with an earlier second-moment rule).
        block_size, max_factor_dim: as in :class:`Shampoo`.
        precondition_1d: give vectors (biases, norm scales) a basis too (default: plain Adam).
        merge_dims: merge small neighbouring dims as :class:`Shampoo` does (``True``: a 64×3×3
            conv kernel as 64×9; ``"all"``: also a small matrix into one dim; default: one
            factor per dim of size > 1, as the SOAP paper).
        bias_correction: Adam's bias corrections.
        root_dtype: ``torch.float64`` (default) or ``torch.float32``: the dtype of the pool's
            ``eigh``; a basis that is not finite in float32 is solved again in float64.
        state_dtype: ``None`` (default) or ``torch.bfloat16``: factors, bases and both moments
            stored in bfloat16, rounded stochastically on write, as in :class:`Shampoo`.
        momentum, nesterov, maximize, root_staleness, stagger_roots, max_root_failures,
        skip_nonfinite, async_roots, root_workers, partition_roots,
        partition_state: as in :class:`Shampoo`.
    """

    # (2026-12-01; before, an eigh at every root step)
    _ADDED_GROUP_KEYS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"eigh_every": 1, "root_dtype": torch.float64, "state_dtype": None, "stagger_roots": False}
    )

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
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
        merge_dims: bool | str = False,
        bias_correction: bool = True,
        momentum: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        root_staleness: int | str | None = "auto",
        max_root_failures: int = 3,
        skip_nonfinite: bool = True,
        basis_refresh: bool = True,
        eigh_every: int = 5,
        root_dtype: torch.dtype = torch.float64,
        state_dtype: torch.dtype | None = None,
        stagger_roots: bool | str = "auto",
        *,
        async_roots: bool | str = "auto",
        root_workers: int | None = None,
        partition_roots: bool = False,
        partition_state: bool = False,
        **unknown: Any,
    ) -> None:
        defaults, flags = settings.parse("SOAP", dict(locals()), unknown)
        super().__init__(params, defaults, **flags)

    def _config(self, group: dict[str, Any]) -> EngineConfig:
        """Adam's settings in the eigenbasis, mapped by :mod:`.settings` (the graft is Adam)."""
        return EngineConfig(**settings.engine_fields("SOAP", group))

    def _validate(self, group: dict[str, Any]) -> None:
        settings.validate("SOAP", group)
