"""Where root jobs read and write: host staging buffers and a job's rows of a bucket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import device
from ..layout import compact
from ..layout.compact import Triangles

__all__ = ["Slot", "Staging"]


@dataclass
class Staging:
    """Where a root job reads its (k, d, d) factors and writes their roots: host buffers reused
    at every cycle, or the bucket's stacks for a CPU root installed in the step computing it."""

    snapshot: torch.Tensor
    result: torch.Tensor
    uploaded: device.CopyDone = None
    in_place: bool = False


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

    def snapshot(self) -> torch.Tensor:
        """The factors as full matrices (a new tensor for compact state)."""
        if self.triangles is None:
            return self.factors
        return compact.full(self.factors, self.triangles.lower, upper=False)

    def stage(self, buffer: torch.Tensor) -> device.CopyDone:
        """Enqueue ``buffer`` ← the factors as full matrices (compact state on the buffer's
        device: made there, with no copy of its own)."""
        if self.triangles is None or buffer.device != self.factors.device:
            return device.to_host(buffer, self.snapshot())
        compact.full(self.factors, self.triangles.lower, upper=False, out=buffer)
        return None

    def full_roots(self) -> torch.Tensor:
        """The roots as full matrices (a new tensor for compact state)."""
        if self.triangles is None:
            return self.roots
        return compact.full(self.roots, self.triangles.upper, upper=True)

    def install(self, result: torch.Tensor, row: int | None = None) -> device.CopyDone:
        """Enqueue roots ← ``result`` (host), all rows or one (compact: the roots' triangle)."""
        roots = self.roots if row is None else self.roots[row]
        if self.triangles is None:
            return device.to_device(roots, result)
        uploaded, done = result, None
        if result.device != roots.device:
            uploaded = torch.empty_like(roots)
            done = device.to_device(uploaded, result)
        compact.write(roots, uploaded, self.triangles.upper, upper=True)
        return done
