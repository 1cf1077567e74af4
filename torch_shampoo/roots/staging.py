"""Where root jobs read and write: host staging buffers and a job's rows of a bucket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import device
from ..layout import compact
from ..layout.compact import Triangles

__all__ = ["UNSET", "HostBuffers", "Slot", "Staging"]

UNSET = torch.empty(0)
"""No buffer: a result's before its job is handed over, or one given back."""


@dataclass
class Staging:
    """Where a root job reads its (k, d, d) factors and writes their roots: host buffers of the
    scheduler's :class:`HostBuffers` (``pooled``), the bucket's stacks for a CPU root installed
    in the step computing it (``in_place``), or scratch tensors of that step."""

    snapshot: torch.Tensor
    result: torch.Tensor
    uploaded: device.CopyDone = None
    """The last upload out of ``result`` (at the install, or by its earlier use)."""
    in_place: bool = False
    pooled: bool = False


class HostBuffers:
    """Host buffers of root jobs by (shape, dtype, pinned), each free one with the last upload
    out of it: a job takes its snapshot's at its snapshot and its result's when handed over; the
    scheduler gives them back once nothing can read them again, and releases at the end of a
    step what no job took again (:meth:`trim`)."""

    def __init__(self) -> None:
        self.free: dict[tuple[Any, ...], list[tuple[torch.Tensor, device.CopyDone]]] = {}

    def take(self, like: torch.Tensor) -> tuple[torch.Tensor, device.CopyDone]:
        """A buffer shaped like ``like`` (pinned when ``like`` is on CUDA or pinned) and the last
        upload out of it, which any write into it must follow."""
        pinned = like.is_cuda or like.is_pinned()
        free = self.free.get((like.shape, like.dtype, pinned))
        return free.pop() if free else (device.host_buffer(like, pinned), None)

    def give(self, buffer: torch.Tensor, uploaded: device.CopyDone = None) -> None:
        if buffer is not UNSET:
            key = (buffer.shape, buffer.dtype, buffer.is_pinned())
            self.free.setdefault(key, []).append((buffer, uploaded))

    def trim(self) -> None:
        """Release the free buffers (on CUDA, to torch's pinned-memory cache)."""
        self.free.clear()

    def held(self) -> list[torch.Tensor]:
        return [buffer for free in self.free.values() for buffer, _ in free]


@dataclass
class Slot:
    """One root job's share of a parameter: its factor indices and their bucket stack rows."""

    indices: list[int]
    factors: torch.Tensor
    roots: torch.Tensor
    place: Any = None
    """(bucket, member, block dim) of these rows, for what installs must touch besides."""
    triangles: Triangles | None = None
    """Compact state: factors and roots are two triangles of one stack; None: full matrices."""
    bases: torch.Tensor | None = None
    """Warm-started roots (``EngineConfig.warm_roots``): the factors' eigenbases, full matrices."""
    phase: int = 0
    """The parameter's root phase (:mod:`.phases`; 0 unless its group staggers its roots)."""

    @property
    def work(self) -> float:
        """Rows × d³: what a root (or power step) of these rows costs, for balancing."""
        return self.factors.shape[0] * float(self.factors.shape[-1]) ** 3

    def snapshot(self) -> torch.Tensor:
        """The factors as full matrices (a new tensor for compact state)."""
        if self.triangles is None:
            return self.factors
        t = self.triangles
        return compact.full(self.factors, t.factor_mask, t.factor_upper)

    def stage(self, buffer: torch.Tensor) -> device.CopyDone:
        """Enqueue ``buffer`` ← the factors as full matrices (compact state on the buffer's
        device: made there, with no copy of its own)."""
        if self.triangles is None or buffer.device != self.factors.device:
            return device.to_host(buffer, self.snapshot())
        t = self.triangles
        compact.full(self.factors, t.factor_mask, t.factor_upper, out=buffer)
        return None

    def full_roots(self) -> torch.Tensor:
        """The roots as full matrices (a new tensor for compact state)."""
        if self.triangles is None:
            return self.roots
        return compact.full(self.roots, self.triangles.root_mask, self.triangles.root_upper)

    def install(self, result: torch.Tensor, row: int | None = None) -> device.CopyDone:
        """Enqueue roots ← ``result`` (host), all rows or one (compact: the roots' triangle)."""
        roots = self.roots if row is None else self.roots[row]
        if self.triangles is None:
            return device.to_device(roots, result)
        uploaded, done = result, None
        if result.device != roots.device:
            uploaded = torch.empty_like(roots)
            done = device.to_device(uploaded, result)
        compact.write(roots, uploaded, self.triangles.root_mask, self.triangles.root_upper)
        return done
