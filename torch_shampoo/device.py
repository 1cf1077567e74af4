"""Every device-specific line of the package: pinned host buffers, copies ordered on the current
stream with an event a worker waits on (docs/design.md, CUDA ordering; on the CPU plain copies
and no events), and the CPU's subnormal flushing for the step and every root solve.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "CopyDone", "after", "divide", "host_buffer", "known_all_true", "small_tensor",
    "subnormals_flushed", "to_device", "to_host", "wait",
]  # fmt: skip

CopyDone = torch.cuda.Event | None
"""Marks the completion of an asynchronous copy; ``None`` when the copy was synchronous."""


def host_buffer(like: torch.Tensor, pinned: bool) -> torch.Tensor:
    """A CPU buffer shaped like ``like``, uninitialized; ``pinned`` for copies to and from a CUDA
    device (released, it goes back to torch's pinned-memory cache)."""
    return torch.empty(like.shape, dtype=like.dtype, pin_memory=pinned)


def small_tensor(values: list[Any], device: torch.device) -> torch.Tensor:
    """A small tensor of host values on ``device``, staged in pinned memory on CUDA (a copy from
    pageable memory would wait for the work queued on the stream)."""
    tensor = torch.tensor(values)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def divide(tensors: list[torch.Tensor], by: torch.Tensor) -> list[torch.Tensor]:
    """x / ``by`` for every x, ``by`` a host 0-d tensor: one ``_foreach_div`` on the CPU, one
    division per tensor on a device (where a fused kernel may want ``by`` on the device)."""
    if tensors[0].device.type == "cpu":
        return list(torch._foreach_div(tensors, by))
    return [x / by for x in tensors]


def known_all_true(flags: torch.Tensor) -> bool:
    """Are all ``flags`` known to be True without waiting for the device? Only on the CPU, and
    not under ``torch.compile`` (the traced graph must not branch on data)."""
    if flags.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(flags.all())


_SMALLEST_DOUBLE, _ONE = 5e-324, 1.0  # (names, so that Python cannot fold the product)


def _flushing() -> bool:
    """Does this thread's CPU flush subnormals now? Python's float arithmetic runs in the same
    mode: the smallest float64 subnormal times 1 is then 0 (torch has no getter for it)."""
    return _SMALLEST_DOUBLE * _ONE == 0.0


_team = threading.local()


def _start_intra_op_threads() -> None:
    """Start the calling thread's intra-op (OpenMP) team while the mode is still the caller's: a
    thread started while this one flushes inherits the mode and would keep it for good. One
    parallel region (a fill of 2¹⁶ elements, two of torch's grains) starts the whole team."""
    n = torch.get_num_threads()
    if n > getattr(_team, "size", 1):
        torch.empty(1 << 16).fill_(0.0)
        _team.size = n


@contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Within it, this thread's CPU arithmetic flushes subnormal inputs and results to zero
    (``torch.set_flush_denormal``: x86's FTZ and DAZ), restoring the mode after. An x86 core
    computes on subnormals many times slower (a deep net's small gradients make G Gᵀ subnormal:
    a step 3.6× as long); only numbers far below any ε a root or a graft adds change."""
    changed = False
    if not _flushing():
        _start_intra_op_threads()
        changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def _copy(dst: torch.Tensor, src: torch.Tensor, cuda_device: torch.device | None) -> CopyDone:
    if dst is src:  # a CPU root computed in place: nothing to move
        return None
    dst.copy_(src, non_blocking=cuda_device is not None)
    if cuda_device is None:
        return None
    done = torch.cuda.Event(blocking=True)  # a waiting worker sleeps instead of spinning
    done.record(torch.cuda.current_stream(cuda_device))
    return done


def after(done: CopyDone, like: torch.Tensor) -> None:
    """Order the work put later on the current stream of ``like``'s device after ``done`` (a
    reused host buffer's last upload, maybe on another stream, before a copy into it)."""
    if done is not None and like.is_cuda:
        torch.cuda.current_stream(like.device).wait_event(done)


def to_host(host: torch.Tensor, src: torch.Tensor) -> CopyDone:
    """Enqueue ``host ← src`` (device → host) after all work already on the current stream."""
    return _copy(host, src, src.device if src.is_cuda else None)


def to_device(dst: torch.Tensor, host: torch.Tensor) -> CopyDone:
    """Enqueue ``dst ← host`` (host → device) before all work later put on the current stream."""
    return _copy(dst, host, dst.device if dst.is_cuda else None)


def wait(done: CopyDone) -> None:
    """Block the calling (worker) thread until the copy behind ``done`` has finished."""
    if done is not None:
        done.synchronize()
