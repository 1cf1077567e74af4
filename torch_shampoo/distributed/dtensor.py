"""DTensor parameters (FSDP2's ``fully_shard``): single-process math on gathered tensors.

A parameter sharded on dim 0 (beside ``Replicate`` mesh dims, as FSDP2 and HSDP make them) is
stepped as one process steps the whole: every rank all-gathers the parameter and its gradient,
runs the engine's math on them and writes its rows back into its shard (docs/design.md). Other
placements are refused, named.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import is_dtensor

__all__ = ["check_parameter", "gathered", "write_back"]


def _shard_dims(p: Any, owner: str = "torch_shampoo") -> list[int]:
    """The mesh dims along which ``p`` is sharded on dim 0; raises for any other placement."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = [d for d, x in enumerate(p.placements) if isinstance(x, Shard) and x.dim == 0]
    others = [x for x in p.placements if not isinstance(x, (Shard, Replicate))]
    others += [x for x in p.placements if isinstance(x, Shard) and x.dim != 0]
    if len(sharded) > 1 or others:
        raise NotImplementedError(
            f"{owner}: DTensor parameters sharded on dim 0 (FSDP2's fully_shard) are supported, "
            f"got one of shape {tuple(p.shape)} with placements {p.placements}"
        )
    return sharded


def check_parameter(p: Any, owner: str) -> None:
    """Refuse a parameter the engine cannot step: not real floating point (ValueError), or a
    DTensor with placements other than dim-0 shards (NotImplementedError, naming them)."""
    if not isinstance(p, torch.Tensor):
        return  # the base class names the bad type
    if p.is_complex() or not p.is_floating_point():
        raise ValueError(f"{owner} optimizes real floating-point parameters, got dtype {p.dtype}")
    if is_dtensor(p):
        _shard_dims(p, owner)


def gathered(p: torch.Tensor) -> torch.Tensor:
    """What the step's math reads and writes for ``p``: ``p``, or for a DTensor a plain copy of
    the whole with the whole gradient (two all-gathers: every rank, the same parameter order)."""
    if not is_dtensor(p):
        return p
    whole = p.detach().full_tensor()  # type: ignore[attr-defined]
    if p.grad is not None:
        whole.grad = p.grad.full_tensor()  # type: ignore[attr-defined]
    return whole


def _local_rows(p: Any) -> slice:
    """The rows of the whole parameter that this rank's shard holds (``torch.chunk``'s split)."""
    sharded = _shard_dims(p)
    rows = p.shape[0]
    if not sharded:
        return slice(0, rows)
    mesh_dim = sharded[0]
    parts, index = p.device_mesh.size(mesh_dim), p.device_mesh.get_local_rank(mesh_dim)
    chunk = -(-rows // parts) if rows else 0
    start = min(rows, index * chunk)
    return slice(start, min(rows, start + chunk))


def write_back(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's rows of the stepped ``whole`` into the DTensor ``p``'s local shard."""
    if whole is p:
        return
    local = p.to_local()  # type: ignore[attr-defined]
    rows = _local_rows(p)
    if local.shape[0] != rows.stop - rows.start:
        raise RuntimeError(
            f"the local shard of a parameter of shape {tuple(p.shape)} holds {local.shape[0]} "
            f"rows, not the {rows.stop - rows.start} of torch.chunk's split ({p.placements})"  # type: ignore[attr-defined]
        )
    local.copy_(whole[rows])
