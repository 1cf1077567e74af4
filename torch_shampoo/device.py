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
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "CopyDone",
    "divide",
    "host_buffer",
    "known_all_true",
    "small_tensor",
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
