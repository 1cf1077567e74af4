"""Every device-specific line of the package: host staging buffers and copy ordering.

The root pipeline moves a factor F from the parameter's device to a CPU worker thread and the
root X back. On CUDA the rules are (``torch.cuda`` stream semantics; nothing here synchronizes
the device on the main thread):

* ``to_host``: ``host.copy_(F, non_blocking=True)`` is enqueued on the *current* stream, after the
  statistics update that produced F and before the next one that changes it, so stream order alone
  keeps F intact while it is read. An event recorded right after the copy tells the worker thread
  when ``host`` holds the data: the worker calls :func:`wait` (``Event.synchronize``), which blocks
  only that worker; the events are blocking ones, so a waiting worker sleeps instead of spinning
  on a core.
* ``to_device``: ``X.copy_(host, non_blocking=True)`` on the current stream, before the kernels
  that read X. The event recorded after it guards ``host``: a worker must :func:`wait` on it
  before writing the next result into the same buffer.
* Host buffers are pinned (page-locked), which is what makes the copies asynchronous; so are
  the small host-made tensors a step needs on the device (:func:`small_tensor`).

On a CPU-only machine the very same calls run with ordinary buffers: copies are plain copies that
are complete when they return, so no event is needed and :func:`wait` does nothing.

On the CPU the step and every root solve run with subnormal numbers flushed to zero
(:func:`subnormals_flushed`): an x86 core computes on them many times slower (a batched
matmul 20× here), and a factor G Gᵀ of small gradients (a deep net's early layers) is full
of them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "CopyDone",
    "divide",
    "host_buffer",
    "known_all_true",
    "small_tensor",
    "subnormals_flushed",
    "to_device",
    "to_host",
    "wait",
]

CopyDone = torch.cuda.Event | None
"""Marks the completion of an asynchronous copy; ``None`` when the copy was synchronous."""


def host_buffer(like: torch.Tensor) -> torch.Tensor:
    """A CPU buffer shaped like ``like``: pinned when ``like`` lives on a CUDA device."""
    return torch.zeros(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)


def small_tensor(values: list[Any], device: torch.device) -> torch.Tensor:
    """A small tensor of host values (row indices, per-block flags) on ``device``: staged in
    pinned memory and copied without blocking on CUDA, since a copy from pageable memory would
    wait for the work queued on the stream."""
    tensor = torch.tensor(values)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def divide(tensors: list[torch.Tensor], by: torch.Tensor) -> list[torch.Tensor]:
    """x / ``by`` for every x, ``by`` a host 0-d tensor: one ``_foreach_div`` on the CPU; on a
    device per tensor (a host scalar is a valid operand there, while a fused kernel may want
    ``by`` on the device)."""
    if tensors[0].device.type == "cpu":
        return list(torch._foreach_div(tensors, by))
    return [x / by for x in tensors]


def known_all_true(flags: torch.Tensor) -> bool:
    """Are all ``flags`` known to be True without waiting for the device? On the CPU they are
    read (the values exist already); on CUDA the answer is always "not known", since reading
    them would wait for the stream; under ``torch.compile`` too, so the traced graph does not
    branch on data."""
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
    """Start all of the calling thread's intra-op (OpenMP) threads, if they may not exist yet,
    while the mode is still the caller's: a thread started while this one flushes inherits the
    mode (POSIX threads inherit the floating-point environment) and would then run the caller's
    later work flushed for good. One parallel region starts the whole team (a fill of 2¹⁶
    elements, two of torch's grains), at the first step and whenever ``torch.set_num_threads``
    has raised the count."""
    n = torch.get_num_threads()
    if n > getattr(_team, "size", 1):
        torch.empty(1 << 16).fill_(0.0)
        _team.size = n


@contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Within it, this thread's CPU arithmetic takes subnormal inputs as zero and flushes
    subnormal results to zero (``torch.set_flush_denormal``: the x86 FTZ and DAZ flags; a no-op
    on CPUs without them); the thread's mode before is restored after, even on an error. An
    x86 core computes on subnormals many times slower: a deep net's small gradients make
    G Gᵀ subnormal, and on 100 × Linear(64, 64) with tanh a step took 3.6× as long.
    Only numbers below 1.2e-38 (float32) or 2.2e-308 (float64) change, to zero: far below any
    ε a root or a graft adds. Not for CUDA kernels (the device has its own rules)."""
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
