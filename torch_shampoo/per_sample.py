"""Per-sample generalized Fisher statistics for NG+ (Yang et al., 2021), captured with hooks.

A handled layer's weight W ∈ ℝ^{m×n} (a Conv2d's read as C_out × C_in·k_h·k_w) takes a tracked
bias as an extra input column (W̃ = [W  b], ã = [a; 1]). Sample i's gradient is
G_i = Σ_t δ_{i,t} ã_{i,t}ᵀ over its positions t, δ the gradient of its loss w.r.t. the layer's
output; the hooks estimate F = (1/B) Σ_i G_i G_iᵀ ∈ ℝ^{m×m}.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["PerSampleFisher"]

_REDUCTIONS = ("mean", "sum")
_CHUNK_ELEMENTS = 1 << 25  # temporary elements per batch chunk (128 MiB in float32)


def _is_handled(module: nn.Module) -> bool:
    """True for plain nn.Linear and zero-padded, ungrouped nn.Conv2d (forward not overridden)."""
    if {name for name, _ in module.named_parameters(recurse=False)} - {"weight", "bias"}:
        return False
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.Conv2d):
        return (
            type(module).forward is nn.Conv2d.forward
            and module.groups == 1
            and module.padding_mode == "zeros"
        )
    return False


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Zero padding (left, right, top, bottom) for F.pad that reproduces ``conv``'s padding."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        # "same", split as PyTorch does: total d·(k−1), the odd element goes right/bottom.
        th, tw = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _tracked(module: nn.Module, name: str, tracked: set[int]) -> Tensor | None:
    """``module.<name>`` if it is a tracked parameter, else None."""
    param = getattr(module, name)
    return param if isinstance(param, Tensor) and id(param) in tracked else None


def _cat_positions(parts: list[Tensor]) -> Tensor:
    """Concatenate (b, T_c, ·) tensors along the position dimension (no copy for one part)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _Layer:
    """One handled module's pending captures and sum S = Σ_passes Σ_i G_i G_iᵀ over N samples."""

    def __init__(self, module: nn.Module, weight: Tensor | None, bias: Tensor | None) -> None:
        self.module, self.weight, self.bias = module, weight, bias
        self.tracked = tuple(p for p in (weight, bias) if p is not None)
        self.pad = _conv_padding(module) if isinstance(module, nn.Conv2d) else None
        shape = module.get_parameter("weight").shape
        self.m: int = shape[0]
        self.n: int = shape[1:].numel()  # Linear: in_features; Conv2d: C_in·k_h·k_w
        self.pending: list[tuple[Tensor | None, Tensor]] = []
        self.total: Tensor | None = None
        self.count = 0
        self.popped: set[int] = set()
        self.reduced = False  # S and N are the sum over the processes: the next pass starts anew

    @property
    def dtype(self) -> torch.dtype:
        """Accumulation dtype: float64 for float64 params, float32 otherwise."""
        f64 = any(p.dtype == torch.float64 for p in self.tracked)
        return torch.float64 if f64 else torch.float32

    def clear(self) -> None:
        self.total, self.count, self.popped, self.reduced = None, 0, set(), False

    def positions(
        self, x: Tensor | None, delta: Tensor, lo: int, hi: int
    ) -> tuple[Tensor | None, Tensor]:
        """Samples lo:hi of one capture as inputs (b, T, n) (None if the weight is untracked)
        and δ (b, T, m); for Conv2d, T = output pixels and a = unfold(input)ᵀ."""
        dtype = self.dtype
        if self.pad is None:
            d = delta[lo:hi].reshape(hi - lo, -1, delta.shape[-1]).to(dtype)
            if x is None:
                return None, d
            return x[lo:hi].reshape(hi - lo, -1, x.shape[-1]).to(dtype), d
        d = delta[lo:hi].flatten(2).transpose(1, 2).to(dtype)
        if x is None:
            return None, d
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        padded = F.pad(x[lo:hi].to(dtype), self.pad)
        cols = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        return cols.transpose(1, 2), d

    def sum_outer(self, captures: list[tuple[Tensor | None, Tensor]], batch: int) -> Tensor:
        """Σ_i G_i G_iᵀ over ``batch`` samples whose positions are those of all ``captures``.

        G_i G_iᵀ = δ_iᵀ a_i a_iᵀ δ_i + g_i g_iᵀ (g_i = Σ_t δ_{i,t}, the bias's); the weight term
        takes the cheaper of G_i = δ_iᵀ a_i then G_i G_iᵀ (m·n·T + m²·n flops) and the Gram route
        δ_iᵀ ((a_i a_iᵀ) δ_i) (T²·n + T²·m + T·m² flops; always for T = 1), in bounded chunks.
        """
        t = sum(int(d[0].numel()) // self.m for _, d in captures)  # positions per sample
        n, m = self.n, self.m
        gram = t * t * (n + m) + t * m * m < m * n * (t + m)
        per_sample = t * (n + m) + (t * t if gram else m * n)
        chunk = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
        device = captures[0][1].device
        total = torch.zeros(m, m, dtype=self.dtype, device=device)
        for lo in range(0, batch, chunk):
            hi = min(batch, lo + chunk)
            parts = [self.positions(x, d, lo, hi) for x, d in captures]
            delta = _cat_positions([d for _, d in parts])
            if self.bias is not None:
                g = delta.sum(dim=1)
                total.addmm_(g.T, g)
            if self.weight is None:
                continue
            a = _cat_positions([p for p, _ in parts if p is not None])
            if gram:
                k_delta = torch.bmm(torch.bmm(a, a.transpose(1, 2)), delta)
                total.addmm_(delta.reshape(-1, m).T, k_delta.reshape(-1, m))
            else:
                grads = torch.bmm(delta.transpose(1, 2), a)  # (b, m, n) per-sample ∂ℓ/∂W
                h = grads.transpose(0, 1).reshape(m, -1)
                total.addmm_(h, h.T)
        return total


class PerSampleFisher:
    """Hooks on nn.Linear and nn.Conv2d layers that compute each one's F = (1/B) Σ_i G_i G_iᵀ.

    Capture. A forward with grad enabled whose output requires grad keeps its input and hooks the
    output tensor (a tensor hook tolerates in-place ops such as ``ReLU(inplace=True)``). The batch
    is dim 0; a Linear input's middle dims are positions; an unbatched input is one sample.

    Passes. When a tracked weight's or bias's ``.grad`` is accumulated, the captures since then
    form one pass, those of equal batch size the same samples (a layer applied k times gets the
    exact G_i), adding S += Σ_i G_i G_iᵀ and N += B. Captures of a backward that accumulates no
    ``.grad`` (``torch.autograd.grad``) are dropped at the next capturing forward.

    Reduction. ``"mean"``: δ carries the loss's 1/B, so each pass is multiplied by B² (F does not
    shrink with B); ``"sum"``: no rescale. Any other loss scale c scales F by c².
    """

    def __init__(
        self, model: nn.Module, params: Iterable[Tensor] | None = None, reduction: str = "mean"
    ) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self._mean = reduction == "mean"
        self._removed = False
        self._handles: list[RemovableHandle] = []
        self._layers: dict[int, _Layer] = {}
        self._unsupported: list[str] = []

        wanted = list(model.parameters()) if params is None else list(params)
        holders = Counter(id(p) for mod in model.modules() for p in mod.parameters(recurse=False))
        if any(id(p) not in holders for p in wanted):
            raise ValueError("params contains a tensor that is not a parameter of model")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in wanted):
            raise ValueError("params are uninitialized: run a forward of the lazy modules first")
        tracked = {id(p) for p in wanted if p.requires_grad}
        # MultiheadAttention uses out_proj's weight functionally; its forward never runs.
        skipped = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}

        for name, mod in model.named_modules():
            own = [p for p in mod.parameters(recurse=False) if id(p) in tracked]
            if not own:
                continue
            # A param shared with another module also gets gradient the hooks cannot see.
            if not _is_handled(mod) or id(mod) in skipped or any(holders[id(p)] > 1 for p in own):
                self._unsupported.append(name or type(mod).__name__)
                continue
            layer = _Layer(mod, _tracked(mod, "weight", tracked), _tracked(mod, "bias", tracked))
            self._handles.append(
                mod.register_forward_hook(partial(self._on_forward, layer), with_kwargs=True)
            )
            for param in layer.tracked:
                self._layers[id(param)] = layer
                self._handles.append(
                    param.register_post_accumulate_grad_hook(partial(self._on_accumulated, layer))
                )

    def handles(self, param: Tensor) -> bool:
        """Is ``param`` (a weight or bias of a handled layer) given per-sample statistics?"""
        return id(param) in self._layers

    def _unique_layers(self) -> list[_Layer]:
        return list({id(layer): layer for layer in self._layers.values()}.values())

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(weight, bias) of every handled layer that tracks both: the two get the same F."""
        return [
            (layer.weight, layer.bias)
            for layer in self._unique_layers()
            if layer.weight is not None and layer.bias is not None
        ]

    def all_reduce(self) -> None:
        """Sum every layer's S and N over ``torch.distributed``'s default group (one float64
        collective, layers in a fixed order), so each process's F is the global batch's. Every
        process calls it at the same point of its step."""
        layers = self._unique_layers()
        if not layers:
            return
        where = layers[0].tracked[0].device
        # A layer still holding an earlier sum (none of its params stepped since) sends zeros.
        fresh = [layer.total is not None and not layer.reduced for layer in layers]
        parts = [
            layer.total.reshape(-1).to(torch.float64).to(where)  # type: ignore[union-attr]
            if new
            else torch.zeros(layer.m * layer.m, dtype=torch.float64, device=where)
            for layer, new in zip(layers, fresh)
        ]
        counts = [float(layer.count) if new else 0.0 for layer, new in zip(layers, fresh)]
        flat = torch.cat([*parts, torch.tensor(counts, dtype=torch.float64).to(where)])
        torch.distributed.all_reduce(flat)
        totals = flat[: -len(layers)].split([layer.m * layer.m for layer in layers])
        for layer, total, count in zip(layers, totals, flat[-len(layers) :].tolist()):
            if layer.reduced:
                continue
            layer.count, layer.reduced = int(count), count > 0
            layer.total = (
                None
                if layer.count == 0
                else total.view(layer.m, layer.m).to(layer.dtype).to(layer.tracked[0].device)
            )

    def remove(self) -> None:
        """Remove every hook and drop captured statistics (idempotent)."""
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._layers.values():
            layer.pending.clear()
            layer.clear()

    def owner(self, param: Tensor) -> nn.Module | None:
        """The handled module whose tracked weight or bias ``param`` is, else None."""
        layer = self._layers.get(id(param))
        return None if layer is None else layer.module

    def unsupported(self) -> list[str]:
        """Names of the modules holding tracked params that the hooks cannot handle (other types,
        grouped or non-zero padded convs, MultiheadAttention.out_proj, shared params)."""
        return list(self._unsupported)

    def pop(self, param: Tensor) -> Tensor | None:
        """F = S/N (symmetrized, on ``param``'s device) of the owning layer, or None if nothing
        was committed since it was last cleared: once every tracked param of the layer has
        popped it, or after a partial pop at the layer's next capturing forward or pass."""
        layer = self._layers.get(id(param))
        if layer is None or layer.total is None:
            return None
        total = layer.total
        fisher = (total + total.T).mul_(0.5 / layer.count).to(param.device)
        layer.popped.add(id(param))
        if len(layer.popped) == len(layer.tracked):
            layer.clear()
        return fisher

    def _on_forward(
        self,
        layer: _Layer,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        """Forward hook: start a capture whose output gradient arrives in ``_on_grad``."""
        if not (
            torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
            and any(p.requires_grad for p in layer.tracked)
        ):
            return
        layer.pending.clear()
        if layer.popped or layer.reduced:
            layer.clear()
        x = (args[0] if args else kwargs["input"]).detach() if layer.weight is not None else None
        output.register_hook(partial(self._on_grad, layer, x))

    def _on_grad(self, layer: _Layer, x: Tensor | None, delta: Tensor) -> None:
        """Output-gradient hook: queue (input, δ) until the layer's ``.grad`` is accumulated."""
        if self._removed:
            return
        if delta.dim() == (1 if layer.pad is None else 3):  # unbatched: one sample
            delta = delta.unsqueeze(0)
            x = None if x is None else x.unsqueeze(0)
        layer.pending.append((x, delta.detach()))

    def _on_accumulated(self, layer: _Layer, param: Tensor) -> None:
        """Post-accumulate-grad hook: commit the pending captures as one pass."""
        if not layer.pending:
            return
        pending, layer.pending = layer.pending, []
        if layer.popped or layer.reduced:
            layer.clear()
        groups: dict[int, list[tuple[Tensor | None, Tensor]]] = {}
        for x, delta in pending:
            groups.setdefault(delta.shape[0], []).append((x, delta))
        for batch, captures in groups.items():
            if batch == 0:
                continue
            with torch.autocast(captures[0][1].device.type, enabled=False):
                stat = layer.sum_outer(captures, batch)
            if self._mean:
                stat.mul_(float(batch * batch))
            layer.total = stat if layer.total is None else layer.total.add_(stat)
            layer.count += batch
