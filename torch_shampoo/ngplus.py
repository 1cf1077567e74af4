"""NG+ (Yang, Xu, Cui, Wen, Xu 2021) as one-sided Shampoo: one output-side factor per weight,
exponent 1, the damping as a (relative) ε, no first moment, an Adam graft; optionally the
per-sample statistics of :mod:`torch_shampoo.per_sample`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from . import settings
from .config import EngineConfig, is_dtensor, world_size
from .engine import PreconditionerEngine
from .layout.blocking import BlockLayout, output_side_layout
from .per_sample import PerSampleFisher
from .settings import STATISTICS

__all__ = ["EARLIER_RULE", "STATISTICS", "NGPlus"]

Damping = float | Callable[[int], float]

EARLIER_RULE: dict[str, Any] = {
    "relative_damping": False,
    "bias_correction": False,
    "grafting": "none",
    "grafting_beta2": 0.999,
    "grafting_epsilon": 1e-8,
}
"""The settings a checkpoint saved by a release without them trained with."""


@cache  # one entry per shape and settings (a bounded cache evicts on a model of many shapes)
def _layout(shape: tuple[int, ...], block_size: int, vectors: bool) -> BlockLayout:
    return output_side_layout(shape, block_size, vectors)


class NGPlus(PreconditionerEngine):
    r"""NG+: the generalized natural gradient with the output-side Fisher matrix, reused T steps.

    A weight is a matrix G ∈ ℝ^{m×n} (m outputs; a conv weight is C_out × C_in·k_h·k_w). At step t::

        Ĝ = G Gᵀ                       (statistics="minibatch")
        Ĝ = (1/B) Σ_i G_i G_iᵀ          (statistics="per_sample": per-sample gradients, bias folded)
        F ← β F + (1 − β) Ĝ;   F̂ = F / (1 − βᵗ)            (F̂ = F if not bias_correction)
        X = (F̂ + λ_t·τ I)^(−1), τ = tr(F̂)/m               (τ = 1 if not relative_damping)
                                   every T = inverse_frequency steps, float64 on CPU threads
        D = X G;  D ← D·‖A‖/‖D‖ per block, A = the graft's step (grafting="adam": G/(√v̂ + ε))
        D ← D + wd·W;  b ← μ b + D (D + μ b if nesterov, else b);  W ← W − lr·D

    The paper's rule is ``relative_damping=False, bias_correction=False, grafting="none"``; the
    defaults make a constant factor on the loss change nothing, with an lr about a tenth of
    Adam's (the default 1e-4; at Adam's lr NG+ diverged on a small MLP where a tenth of it beat
    Adam; docs/tuning.md). F is cut into diagonal blocks of ``block_size``. Vectors take the grafted
    gradient, except a hooked layer's bias (per-sample statistics): it shares its layer's F
    (ã = [a; 1]) and the weight's inverse.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (float or 0-d tensor).
        momentum: heavy-ball momentum μ.
        nesterov: Nesterov's form of that momentum (D + μb); with μ = 0 both forms are D.
        weight_decay: added to the preconditioned direction, before momentum.
        damping: λ, a float or a function of the step (called at each inverse step); a function
            is not saved by ``state_dict()`` and is kept from the loading optimizer. Default 3
            (relative: three times each block's mean eigenvalue), chosen from a measured grid
            (``python -m benchmarks.convergence --sections ngplus``; docs/tuning.md).
        curvature_beta: β of the moving average of F.
        inverse_frequency: T, the steps between inverses.
        statistics: ``"minibatch"`` or ``"per_sample"`` (needs ``model=`` or :meth:`attach`;
            under ``torch.distributed`` each process's hooks see only its own samples, so the
            step sums the statistics over the processes first: one all-reduce per step).
        block_size: largest diagonal block of F.
        maximize: maximize the objective.
        root_method: ``"eigh"`` or ``"cholesky"`` (``"newton"`` also works: exponent 1).
        root_dtype: ``torch.float64`` or ``torch.float32`` (float32 first, as for
            :class:`~torch_shampoo.Shampoo`; damped blocks rarely need the float64 retry).
        start_preconditioning_step: first inverse step (``None``: 1).
        root_staleness: steps between a later inverse's snapshot and its use: an integer, or
            ``"auto"`` (as for :class:`~torch_shampoo.Shampoo`). The first inverse is always
            used from the step that computes it.
        stagger_roots: each parameter's later inverses at its own phase of the frequency (as
            for :class:`~torch_shampoo.Shampoo`; ``"auto"``: with async roots).
        max_root_failures: consecutive failed inverses of one factor that raise an error.
        skip_nonfinite: leave a block's state and weights unchanged at a step whose gradient
            holds NaN/Inf in that block (decided on the device; counted in ``root_stats()``).
        relative_damping: λ multiplies each block's mean eigenvalue tr(F̂)/m (a block whose F
            is still zero uses λ itself).
        grafting: whose step size each block takes: ``"adam"``, ``"rmsprop"``, ``"adagrad"``,
            ``"sgd"`` (the gradient's norm) or ``"none"`` (NG+'s own, the paper's).
        grafting_beta2, grafting_epsilon: β₂ and ε of the graft's second moment.
        bias_correction: divide F by 1 − βᵗ (and the graft's second moment by 1 − β₂ᵗ).
        async_roots, root_workers, partition_roots, partition_state: as for
            :class:`~torch_shampoo.Shampoo`.
        model: with ``statistics="per_sample"``, the model whose layers are hooked.
    """

    _ADDED_GROUP_KEYS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"root_dtype": torch.float64, "stagger_roots": False}
    )

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-4,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: Damping = 3.0,
        curvature_beta: float = 0.95,
        inverse_frequency: int = 20,
        statistics: str = "minibatch",
        block_size: int = 1024,
        nesterov: bool = True,
        maximize: bool = False,
        root_method: str = "eigh",
        start_preconditioning_step: int | None = None,
        root_staleness: int | str | None = "auto",
        max_root_failures: int = 3,
        skip_nonfinite: bool = True,
        relative_damping: bool = True,
        grafting: str = "adam",
        grafting_beta2: float = 0.999,
        grafting_epsilon: float = 1e-8,
        bias_correction: bool = True,
        root_dtype: torch.dtype = torch.float64,
        stagger_roots: bool | str = "auto",
        *,
        async_roots: bool | str = "auto",
        root_workers: int | None = None,
        partition_roots: bool = False,
        partition_state: bool = False,
        model: nn.Module | None = None,
        **unknown: Any,
    ) -> None:
        defaults, flags = settings.parse("NGPlus", dict(locals()), unknown)
        self.statistics = statistics
        self._fisher: PerSampleFisher | None = None
        self._leaders: dict[torch.Tensor, torch.Tensor] = {}
        self._followers: dict[torch.Tensor, list[torch.Tensor]] = {}
        super().__init__(params, defaults, **flags)
        if model is not None:
            self.attach(model)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        if self.statistics == "per_sample" and self._fisher is None:
            raise RuntimeError(
                "NGPlus(statistics='per_sample') needs the model: pass model=... or call "
                "optimizer.attach(model) before the first step"
            )
        if self.statistics != "per_sample" or world_size() == 1:
            return super().step(closure)
        loss = None
        if closure is not None:  # its backward's statistics must be in the sum below
            with torch.enable_grad():
                loss = closure()
        # The hooks saw only this process's samples: every rank must build the global batch's F.
        assert self._fisher is not None
        self._fisher.all_reduce()
        super().step()
        return loss

    def _config(self, group: dict[str, Any]) -> EngineConfig:
        """One-sided Shampoo with exponent 1 and the damping as ε (:mod:`.settings`)."""
        return EngineConfig(**settings.engine_fields("NGPlus", group))

    def _layout_of(self, p: torch.Tensor, config: EngineConfig) -> BlockLayout:
        # A vector gets a factor only as a hooked layer's bias: any other's g gᵀ is no Fisher
        # estimate (preconditioning LayerNorms by it cost the char-LM 194 steps against 150).
        fisher = getattr(self, "_fisher", None)  # (None while unpickling)
        vector = fisher is not None and fisher.handles(p)
        return _layout(tuple(p.shape), config.block_size, vector)

    def _take_curvature(self, p: torch.Tensor) -> torch.Tensor | None:
        return self._fisher.pop(p) if self._fisher is not None else None

    def _leader_of(self, p: torch.Tensor) -> torch.Tensor | None:
        return self._leaders.get(p)

    def _followers_of(self, p: torch.Tensor) -> list[torch.Tensor]:
        return self._followers.get(p, [])

    def _share_inverses(self, fisher: PerSampleFisher) -> None:
        """A hooked layer's bias uses its weight's inverse when both have the same blocks of F."""
        for weight, bias in fisher.pairs():
            (_, group), (_, other) = self._locate(weight), self._locate(bias)
            if group is not other:
                continue
            config = self._config(group)
            layouts = [self._layout_of(q, config) for q in (weight, bias)]
            dims = [[x.factor_dims(b) for b in range(x.num_blocks)] for x in layouts]
            if dims[0] != dims[1]:
                continue
            self._leaders[bias] = weight
            self._followers.setdefault(weight, []).append(bias)

    def _validate(self, group: dict[str, Any]) -> None:
        settings.validate("NGPlus", group)

    def attach(self, model: nn.Module) -> NGPlus:
        """Hook ``model``'s Linear and Conv2d layers for per-sample statistics; returns self."""
        if self.statistics != "per_sample":
            raise ValueError("attach() is for statistics='per_sample'")
        if any(self.state[p] for p in self._all_params() if p in self.state):
            raise RuntimeError("attach(model) before the first step: the layout depends on it")
        self.detach()
        ours = {id(p) for p in self._all_params()}
        tracked = [p for p in model.parameters() if id(p) in ours]
        if any(is_dtensor(p) for p in tracked):
            raise NotImplementedError(
                "NGPlus(statistics='per_sample') does not support DTensor parameters (FSDP2's "
                "fully_shard): use statistics='minibatch' there, or DDP"
            )
        self._fisher = PerSampleFisher(model, tracked)
        self._share_inverses(self._fisher)
        self._shares = None  # (partition_state) owners again: a bias goes with its weight
        unsupported = self._fisher.unsupported()
        if unsupported:
            warnings.warn(
                f"NGPlus: no per-sample statistics for {', '.join(unsupported)}; their "
                "parameters use minibatch statistics",
                UserWarning,
                stacklevel=2,
            )
        return self

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach` (idempotent)."""
        if self._fisher is not None:
            self._fisher.remove()
            self._fisher = None
        self._leaders, self._followers = {}, {}

    def state_dict(self) -> dict[str, Any]:
        """As the engine's; a damping function is saved as ``None`` (it is code, not state)."""
        packed = super().state_dict()
        packed["param_groups"] = [
            {**g, "damping": None if callable(g["damping"]) else g["damping"]}
            for g in packed["param_groups"]
        ]
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the engine's; a damping saved as ``None`` keeps this optimizer's damping, and a
        group saved before the step-size settings existed keeps :data:`EARLIER_RULE`."""
        # Every saved group goes on, so that a count that differs is refused as by Shampoo.
        saved = state_dict["param_groups"]
        current = [g["damping"] for g in self.param_groups]
        current += [None] * (len(saved) - len(current))
        groups = [
            {**EARLIER_RULE, **g, **({"damping": here} if g.get("damping", 0) is None else {})}
            for g, here in zip(saved, current)
        ]
        super().load_state_dict({**state_dict, "param_groups": groups})

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["statistics"] = self.statistics
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        fresh = getattr(self, "_loading", None) is None  # else: load_state_dict's last stage
        super().__setstate__(state)
        if fresh:  # an unpickled copy: the hooks belong to the original's model
            self._fisher = None
            self._leaders, self._followers = {}, {}
