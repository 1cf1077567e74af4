"""What the root-schedule tests (test_root_schedule.py, test_root_pool.py,
test_root_host_buffers.py) share: base settings, the repository root, parameter snapshots and a
root that never arrives."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from torch_shampoo.roots.matrix_roots import RootResult

BASE: dict[str, Any] = dict(lr=0.01, block_size=16, betas=(0.9, 0.99), stagger_roots=False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def params_after(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _never(matrix: torch.Tensor, *args: Any, **kwargs: Any) -> RootResult:
    return RootResult(torch.zeros_like(matrix), False, math.nan, "never arrives", "eigh")
