"""Shampoo: Kronecker-factored preconditioning with grafting and asynchronous CPU roots."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from . import settings
from .config import EngineConfig
from .engine import PreconditionerEngine

__all__ = ["Shampoo"]


class Shampoo(PreconditionerEngine):
    r"""Shampoo (Gupta et al. 2018; Anil et al. 2020) with grafting and asynchronous CPU roots.

    A drop-in replacement for ``torch.optim.Adam``; **use the lr you use for Adam** (the default
    Adam graft gives the step its size, Shampoo only changes its direction)::

        with torch_shampoo.Shampoo(model.parameters(), lr=3e-4, weight_decay=0.1) as opt:
            for x, y in loader:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            print(opt.root_stats())   # roots computed, stalls, the staleness in use, ...

    ``with`` or ``opt.close()`` stops the root worker threads (so do garbage collection, exit).

    For every block G of the gradient (:mod:`torch_shampoo.layout.blocking`) and step t = 1, 2, …::

        g  = ∇ (−∇ if maximize);  g += wd·W                 if not decoupled_weight_decay
        F_i ← β₂ F_i + w G_(i) G_(i)ᵀ  for each factored dim i   (w = 1 if β₂ = 1 else 1 − β₂)
        X_i = (F_i / bc₂ + εI)^(−1/r)   at root steps, in float64 on CPU  (r = 2·#factors)
        m  ← β₁ m + (1 − β₁) g;  m̂ = m / (1 − β₁ᵗ)
        P  = m̂ ×₁ X_1 ×₂ X_2 …                    (D while the block has no roots: before start)
        P  ← P · ‖D‖ / (‖P‖ + 1e-16)                        D from the graft, per block
        P  ← P + wd·W                                        if decoupled_weight_decay
        b  ← μ b + P;  P = P + μ b (nesterov) or b           if momentum μ > 0
        W  ← W − lr·P

    Root steps are t = start and every t > start divisible by ``precondition_frequency``. A block
    takes the graft's direction D until its roots exist; a parameter's first roots are installed
    in the step that computes them. A later root from the statistics of step t is installed at
    the start of step t + s (at the latest the next root step), computed meanwhile on CPU threads
    if ``async_roots``. s is ``root_staleness``: ``"auto"`` fits it at the first later root
    cycle to the measured root work per preconditioned step, again when either changes over 2×
    (docs/design.md; the frequency with several processes or deterministic algorithms); an
    integer makes async runs bitwise equal to synchronous ones.

    Args:
        params: parameters or parameter groups; every hyperparameter below except
            ``async_roots`` and ``root_workers`` may differ per group.
        lr: learning rate (float or 0-d tensor).
        betas: (β₁, β₂): β₁ for the first moment m, β₂ for the Shampoo statistics (1 → sums).
        epsilon: ε added to every factor before its root.
        weight_decay: weight decay coefficient.
        decoupled_weight_decay: add wd·W to the step (AdamW-style) instead of to the gradient.
        momentum: heavy-ball momentum μ on the final step.
        nesterov: Nesterov's form of that momentum (needs momentum > 0).
        block_size: largest side of a block; larger dims are cut into blocks.
        max_factor_dim: dims larger than this are not cut and get no factor (one-sided Shampoo;
            the exponent counts only the factored dims, so a matrix with one huge side gets
            X^(−1/2) on the other side: full-matrix AdaGrad shared by its rows or columns).
        precondition_frequency: steps between roots.
        start_preconditioning_step: first root step (``None``: = precondition_frequency); the
            graft alone drives the steps before it.
        bias_correction: divide m by 1 − β₁ᵗ and the statistics by 1 − β₂ᵗ.
        grafting: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or ``"none"``.
        grafting_beta2, grafting_epsilon: the graft's β₂ and ε.
        root_exponent: r for every factor (``None``: 2 × the number of factors of the block).
        root_method: ``"eigh"`` (default), ``"newton"`` or ``"cholesky"`` (r = 1 only).
        root_dtype: ``torch.float64`` (default): roots solved in float64; ``torch.float32``
            (``root_method="eigh"`` only): solved in float32 first, and a root that fails there
            (not finite, or condition number above 0.1 / float32's eps, where float32 cannot
            resolve its small eigenvalues) solved again in float64 (``root_stats()``'s
            ``root_retries``).
        eigh_every: root steps per exact eigendecomposition (``root_method="eigh"``). 1 (the
            default): every root is the pool's exact root. k > 1: each factor keeps its
            eigenbasis Q; a first and every k-th root step the pool computes it exactly, the
            others take one power iteration Q ← orth(F Q) on the device; the root is then
            Q diag(λ + ε)^(−1/r) Qᵀ with λ = diag(QᵀFQ) of the current statistics (docs/design.md).
        basis_tolerance: with ``eigh_every`` > 1, a root step between exact ones computes a
            parameter's exact eigh instead where one of its bases drifted, ‖offdiag(QᵀFQ)‖_F >
            τ‖F‖_F (Purifying Shampoo's criterion; one host sync per slot); 0: off.
        state_dtype: ``None`` (default): factors, roots and moments in float32 (float64 for
            float64 parameters); ``torch.bfloat16``: stored in bfloat16, each step's math in
            float32 and every write rounded stochastically (unbiased, from a hash of position and
            step: reproducible), so that the statistics' small increments are kept on average;
            roots still solved in float64. ``torch.float16`` is refused (its range).
        maximize: maximize the objective.
        root_staleness: steps between a later root's snapshot and its use: ``"auto"`` (``None``
            is the same) or an integer ≥ 0; see above.
        stagger_roots: ``True``: after the first root step, each parameter's roots at its own
            phase of the frequency, the phases spreading the root work evenly over a cycle's
            steps (:mod:`torch_shampoo.roots.phases`): an async root is ready after about 1/f
            of a cycle's work, so "auto" staleness fits a step or two instead of most of the
            cycle; a sync root step waits for its share only. ``False``: every parameter's at
            every f-th step, as the paper. ``"auto"`` (default): ``True`` with async roots,
            ``False`` with sync ones (there staggering only moved the same work: per step 1/f
            of it, on fewer cores). A sync run reproduces an async one with the same
            ``root_staleness`` and ``stagger_roots=True``.
        max_root_failures: consecutive failed roots of one factor that raise an error.
        skip_nonfinite: leave a block's statistics, moments, momentum and weights unchanged at a
            step whose gradient holds NaN/Inf in that block (decided on the device, no host
            sync; counted as ``skipped_blocks`` in ``root_stats()``).
        merge_dims: merge neighbouring small dims from the right while the product stays
            ≤ ``block_size`` (a 64×3×3×3 conv: 64×27), a tensor of several dims keeping two
            (``True``, the default: a 64×16 weight keeps factors of 64² and 16²); ``"all"``:
            also down to one dim (a 64×16 weight: one 1024² factor, as JAX's and Meta's
            Shampoo do, and this package before 2026-12-06); ``False``: no merging.
        precondition_1d: give 1-D parameters (biases, norm scales) a factor, a d × d block of
            full-matrix AdaGrad each (the paper's rule); ``False``: the graft alone steps them,
            which saves their roots (on a transformer, about half of all root work).
        async_roots: compute roots on CPU worker threads (``False``: inside ``step()``, on
            every core at once). ``"auto"``: ``True`` unless every parameter is on the CPU and
            the step's threads (``torch.get_num_threads()``) and the workers' would be more than
            the cores: there workers only slow the step down (decided at construction;
            ``plan()`` says which).
        root_workers: worker threads (``None``: half the CPU cores, at least 1). Each worker
            computes with ``torch.get_num_threads() // (2 * root_workers)`` intra-op threads (at
            least 1; fixed when the workers start): the workers take at most half of torch's
            threads, the training thread keeps the rest (on 2 cores, a 2-thread worker made
            every step of a small model 4x slower). Synchronous roots use the same count.
        partition_roots: under DDP (several processes in ``torch.distributed``), solve each
            root on one rank and broadcast it at the install step
            (:mod:`torch_shampoo.distributed.partition_roots`; bitwise the replicated result);
            without a process group it changes nothing.
        partition_state: under DDP, each parameter is kept (state, factors, roots) and stepped
            by one rank, then broadcast from it (:mod:`torch_shampoo.distributed.partition_state`;
            bitwise the replicated result, about 1/world of its memory and work per rank);
            checkpoint with :meth:`consolidate_state_dict` on every rank, then ``state_dict()``.
        compact_state: ``True``: keep each block's factor and root, both symmetric, as the two
            triangles of one (d + 1) × d tensor (:mod:`torch_shampoo.layout.compact`): about
            half their memory (state 2.1x Adam's instead of 3.2x on an MLP at block 128), for a
            gather per root and a masked write per factor at every step (that MLP's step
            1.04-1.11x on a CPU core). The same results (the same lower triangles; the matrices
            symmetric to the last bit); ``state_dict()`` saves full matrices, so checkpoints
            load either way. With bfloat16 state a square block's two factors share one
            float32 tensor and its two roots one bfloat16 tensor (the second factor keeps its
            upper triangle: the same up to last bits). ``"auto"`` (default): only those square
            blocks, so ``state_dtype=torch.bfloat16`` alone gives 1.4x Adam's state on that MLP
            (at the step cost of full bfloat16 matrices); float32 state stays full.
            ``False``: full matrices.
    """

    # (2026-12-06; before, a tensor of ≤ block_size elements merged into one dim and every
    # vector had a factor; root_dtype: roots were float64 before it existed; eigh_every: 1 and
    # basis_tolerance: 0, exact roots; stagger_roots: every parameter's roots at one step)
    _ADDED_GROUP_KEYS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {
            "merge_dims": "all",
            "precondition_1d": True,
            "root_dtype": torch.float64,
            "eigh_every": 1,
            "basis_tolerance": 0.0,
            "state_dtype": None,
            "stagger_roots": False,
        }
    )

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
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
        root_method: str = "eigh",
        maximize: bool = False,
        root_staleness: int | str | None = "auto",
        max_root_failures: int = 3,
        skip_nonfinite: bool = True,
        merge_dims: bool | str = True,
        precondition_1d: bool = True,
        root_dtype: torch.dtype = torch.float64,
        eigh_every: int = 1,
        basis_tolerance: float = 0.0,
        state_dtype: torch.dtype | None = None,
        stagger_roots: bool | str = "auto",
        *,
        async_roots: bool | str = "auto",
        root_workers: int | None = None,
        partition_roots: bool = False,
        partition_state: bool = False,
        compact_state: bool | str = "auto",
        **unknown: Any,
    ) -> None:
        defaults, flags = settings.parse("Shampoo", dict(locals()), unknown)
        super().__init__(params, defaults, **flags)

    def _config(self, group: dict[str, Any]) -> EngineConfig:
        """Shampoo's kwargs are the engine's settings, one to one (:mod:`.settings`)."""
        return EngineConfig(**settings.engine_fields("Shampoo", group))

    def _validate(self, group: dict[str, Any]) -> None:
        settings.validate("Shampoo", group)
