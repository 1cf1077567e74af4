"""CUDA parameters: the root pipeline's host staging and copy ordering (``torch_shampoo/device.py``,
``docs/design.md``, "CUDA ordering"), and training on the GPU against the CPU path.

Every test here needs a GPU and is skipped without one. To make the ordering observable, the
tests put GPU work in front of ``step()`` (``torch.cuda._sleep``, the GPU "lags"): the host then
runs ahead of the device, so a copy or an event on the wrong stream, a blocking copy or a worker
that reads a snapshot too early changes the results or fails an assertion instead of passing by
luck. Bitwise comparisons need deterministic GPU kernels: cuDNN is made deterministic (and TF32 is
turned off, which the CPU comparison needs anyway) for every test of this module, and cuBLAS gets
a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, set before the first cuBLAS call of the process).
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from models import Batch, assert_bitwise_equal, make_batches, mixed_model

from torch_shampoo import SOAP, Shampoo

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
BASE: dict[str, Any] = dict(lr=0.01, block_size=16, betas=(0.9, 0.99), momentum=0.5)
LAG = 0.005
"""Seconds of GPU work put before each step: enough for the host to run ahead of the device."""


@pytest.fixture(autouse=True)
def _deterministic_float32() -> Iterator[None]:
    """Deterministic cuDNN kernels and full float32 precision (no TF32) in matmuls and convs."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    matmul.allow_tf32, cudnn.allow_tf32 = False, False
    cudnn.deterministic, cudnn.benchmark = True, False
    yield
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


# ----------------------------------------------------------------------------------- helpers


@functools.cache
def _cycles_per_second() -> float:
    """GPU clock cycles per second of ``torch.cuda._sleep`` (measured once)."""
    torch.cuda._sleep(1000)  # warm-up: the first launch loads the kernel
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10**7
    begin.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (begin.elapsed_time(end) / 1e3)


def gpu_sleep(seconds: float) -> None:
    """Keep the current stream busy for about ``seconds`` (returns at once on the host)."""
    torch.cuda._sleep(max(1, int(seconds * _cycles_per_second())))


def to_cuda(batches: list[Batch]) -> list[Batch]:
    return [(x.to(CUDA), y.to(CUDA)) for x, y in batches]


def cuda_batches(n: int, dtype: torch.dtype = torch.float32) -> list[Batch]:
    return to_cuda(make_batches(n, dtype=dtype))


def train_lagging(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], lag: float = 0.0
) -> list[torch.Tensor]:
    """``models.train`` without its per-step ``loss.item()`` (no host sync) and with ``lag``
    seconds of GPU work between the backward pass and ``opt.step()``; returns the losses."""
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if lag > 0:
            gpu_sleep(lag)
        opt.step()
        losses.append(loss.detach())
    return losses


@dataclass
class Run:
    model: torch.nn.Module
    opt: Any
    params: list[torch.Tensor]
    losses: list[float]
    stats: dict[str, Any]

    @property
    def factors(self) -> int:
        return sum(len(s["factors"]) for s in self.opt.state.values())


def train_fresh(
    batches: list[Batch],
    kwargs: dict[str, Any],
    lag: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device = CUDA,
    optimizer: type[torch.optim.Optimizer] = Shampoo,
) -> Run:
    """A fresh ``mixed_model`` and Shampoo (or ``optimizer``) on ``device``, trained on
    ``batches``, closed."""
    model = mixed_model(dtype=dtype).to(device)
    opt = optimizer(model.parameters(), **kwargs)
    losses = train_lagging(model, opt, batches, lag if device.type == "cuda" else 0.0)
    opt.close()
    params = [p.detach().clone() for p in model.parameters()]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Run(model, opt, params, torch.stack(losses).float().tolist(), opt.root_stats())


def _forbidden(*args: object, **kwargs: object) -> None:
    raise AssertionError("torch.cuda.synchronize() was called by the optimizer")


# ------------------------------------------------------------------------- (a) the staging


def test_host_buffers_are_pinned_and_copies_are_ordered_on_the_current_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a side stream, behind half a second of GPU work: step() returns at once (no host
    sync, non-blocking copies), the snapshot and upload events are not complete yet (recorded
    on the current stream, after the queued work), the workers wait for them (no ticket ends
    early, they call ``Event.synchronize``; the main thread never does, and nothing calls
    ``torch.cuda.synchronize``); once the stream is done, the snapshots hold the factors and
    the installed roots the result buffers, bitwise."""
    _cycles_per_second()  # calibrated before the spies below
    main_thread_waits: list[bool] = []
    original = torch.cuda.Event.synchronize

    def spy(self: torch.cuda.Event) -> None:
        main_thread_waits.append(threading.current_thread() is threading.main_thread())
        original(self)

    monkeypatch.setattr(torch.cuda.Event, "synchronize", spy)
    monkeypatch.setattr(torch.cuda, "synchronize", _forbidden)

    model = mixed_model().to(CUDA)
    batches = cuda_batches(8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt = Shampoo(model.parameters(), **BASE, precondition_frequency=3, root_staleness=2)
        train_lagging(model, opt, batches[:5], LAG)  # step 3: the first cycle, installed at once
        params = [p for p in model.parameters() if opt.state[p]["factors"]]
        assert len(params) >= 4
        for p in params:
            assert bool(opt.state[p]["has_root"].all())
        assert not opt._roots.staging  # given back after the install, released at the step's end
        assert opt.root_stats()["host_buffer_bytes"] == 0

        # Step 6: a later cycle (due at step 8), its snapshots queued behind the GPU's work.
        train_lagging(model, opt, batches[5:6], lag=0.5)
        assert not side.query(), "step() waited for the GPU (a host sync or a blocking copy)"
        pending = {p: opt._roots.pending[p] for p in params}
        staging = {p: list(pending[p].buffers) for p in params}
        results = {p: [b.result for b in staging[p]] for p in params}
        for p in params:
            slots = opt._slots[id(p)]  # one job per bucket and factored dim
            assert pending[p].due == 8 and len(pending[p].tickets) == len(pending[p].jobs) > 0
            assert len(staging[p]) == len(slots)
            for job, buffers, slot in zip(pending[p].jobs, staging[p], slots):
                assert slot.factors.is_cuda and slot.roots.is_cuda
                for host in (buffers.snapshot, buffers.result):
                    assert host.device.type == "cpu" and host.is_pinned()
                    assert host.shape == slot.factors.shape and host.dtype == slot.factors.dtype
                assert job.snapshot is buffers.snapshot and job.result is buffers.result
                assert isinstance(job.snapshot_ready, torch.cuda.Event)
                assert not job.snapshot_ready.query(), (
                    "the snapshot's event is complete while the current stream is still busy: "
                    "recorded on another stream, or the copy was blocking"
                )
                assert job.result_free is buffers.uploaded  # the previous upload guards result
            assert not any(t.done() for t in pending[p].tickets), "a root ended before its copy"
        planned = opt.plan(show=False).bytes["staging"]
        assert opt.root_stats()["host_buffer_bytes"] == planned > 0
        side.synchronize()
        for p in params:
            for job, ticket, slot in zip(pending[p].jobs, pending[p].tickets, opt._slots[id(p)]):
                ready = job.snapshot_ready
                assert isinstance(ready, torch.cuda.Event) and ready.query()
                assert torch.equal(job.snapshot, slot.factors.cpu())  # unchanged since step 6
                assert all(outcome.ok for outcome in ticket.outcome())

        # Step 8 installs them: uploads queued behind the GPU's work, then the roots arrive.
        train_lagging(model, opt, batches[6:7], LAG)
        train_lagging(model, opt, batches[7:8], lag=0.5)
        assert not side.query(), "step() waited for the GPU while installing roots"
        for p in params:
            assert p not in opt._roots.pending
            for buffers in staging[p]:
                assert isinstance(buffers.uploaded, torch.cuda.Event)
                assert not buffers.uploaded.query(), "the upload's event is on another stream"
        assert opt.root_stats()["host_buffer_bytes"] == 0  # given back, then released
        side.synchronize()
        for p in params:
            for buffers, result, slot in zip(staging[p], results[p], opt._slots[id(p)]):
                uploaded = buffers.uploaded
                assert isinstance(uploaded, torch.cuda.Event) and uploaded.query()
                assert torch.equal(slot.roots.cpu(), result)
                for row, j in enumerate(slot.indices):  # the state's roots are the stack's rows
                    assert torch.equal(opt.state[p]["roots"][j].cpu(), result[row])
        assert opt.root_stats()["roots_computed"] == 2 * sum(
            len(s["factors"]) for s in opt.state.values()
        )
        opt.close()
    assert main_thread_waits, "no worker waited for a copy's event"
    assert not any(main_thread_waits), "the main thread blocked on a CUDA event (async roots)"


# ---------------------------------------------------------------------- (b) a side stream


@pytest.mark.parametrize("compact_state", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("async_roots", [True, False], ids=["async", "sync"])
def test_training_on_a_side_stream_equals_training_on_the_default_stream(
    async_roots: bool, compact_state: bool
) -> None:
    kwargs = dict(
        BASE,
        precondition_frequency=3,
        root_staleness=1,
        async_roots=async_roots,
        compact_state=compact_state,
    )
    batches = cuda_batches(12)
    default = train_fresh(batches, kwargs)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        assert torch.cuda.current_stream() != torch.cuda.default_stream()
        on_side = train_fresh(batches, kwargs, lag=LAG)
    torch.cuda.synchronize()
    assert on_side.stats["roots_computed"] == default.stats["roots_computed"] > 0
    assert_bitwise_equal(on_side.params, default.params)


# ------------------------------------------------------------------- (c) async = sync roots


@pytest.mark.parametrize("compact_state", [False, True], ids=["full", "compact"])
def test_async_roots_equal_sync_roots_with_the_same_staleness_on_cuda(compact_state: bool) -> None:
    kwargs = dict(BASE, precondition_frequency=3, root_staleness=2, compact_state=compact_state)
    batches = cuda_batches(14)  # root steps 3, 6, 9, 12: installed at 3, 8, 11 and 14
    asynchronous = train_fresh(batches, {**kwargs, "async_roots": True}, lag=LAG)
    synchronous = train_fresh(batches, {**kwargs, "async_roots": False}, lag=LAG)
    for run in (asynchronous, synchronous):
        assert run.stats["roots_computed"] == 4 * run.factors
        assert run.stats["max_staleness"] == 2 and run.stats["root_failures"] == 0
    assert_bitwise_equal(asynchronous.params, synchronous.params)
    moved = mixed_model().to(CUDA)
    assert any(not torch.equal(p, q) for p, q in zip(asynchronous.params, moved.parameters()))


# ---------------------------------------------------------------------------- (d) CPU = CUDA


def test_cuda_training_matches_the_same_run_on_cpu() -> None:
    """Roots are float64 on the CPU in both runs; the rest differs by float32 rounding only
    (TF32 is off). ``epsilon`` keeps the roots well conditioned, so that rounding is not
    amplified along the factors' near-null directions."""
    kwargs = dict(BASE, precondition_frequency=2, root_staleness=1, epsilon=1e-4)
    batches = make_batches(8)
    on_cpu = train_fresh(batches, kwargs, device=torch.device("cpu"))
    on_cuda = train_fresh(to_cuda(batches), kwargs)
    assert on_cuda.stats["roots_computed"] == on_cpu.stats["roots_computed"] > 0
    for a, b in zip(on_cuda.params, on_cpu.params):
        assert a.is_cuda and not b.is_cuda
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(on_cuda.losses, on_cpu.losses, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- (e) bf16


def test_bf16_parameters_train_with_float32_state_and_resume_bitwise() -> None:
    kwargs = dict(BASE, precondition_frequency=3, root_staleness=2)
    batches = cuda_batches(4, dtype=torch.bfloat16) * 6  # the same 4 batches: the loss must fall
    full = train_fresh(batches, kwargs, lag=LAG, dtype=torch.bfloat16)
    losses = full.losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    assert full.stats["roots_computed"] > 0
    for p in full.model.parameters():
        assert p.dtype == torch.bfloat16 and p.is_cuda
        state = full.opt.state[p]
        for key in ("exp_avg", "graft_v", "momentum_buffer"):
            assert state[key].dtype == torch.float32 and state[key].is_cuda, key
        for key in ("factors", "roots"):
            assert all(t.dtype == torch.float32 and t.is_cuda for t in state[key]), key

    # Saved at step 10, while the roots of step 9 (due at step 11) are in flight.
    model = mixed_model(dtype=torch.bfloat16).to(CUDA)
    opt = Shampoo(model.parameters(), **kwargs)
    train_lagging(model, opt, batches[:10], LAG)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    opt.close()
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert any(int(s["pending_due"]) >= 0 for s in checkpoint["opt"]["state"].values())
    resumed_model = mixed_model(seed=1, dtype=torch.bfloat16).to(CUDA)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = Shampoo(resumed_model.parameters(), **kwargs)
    resumed.load_state_dict(checkpoint["opt"])
    for p in resumed_model.parameters():
        state = resumed.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].is_cuda
        assert all(f.dtype == torch.float32 and f.is_cuda for f in state["factors"])
        assert state["step"].device.type == "cpu" and state["has_root"].device.type == "cpu"
    assert resumed.root_stats()["pending_parameters"] > 0
    train_lagging(resumed_model, resumed, batches[10:], LAG)
    resumed.close()
    torch.cuda.synchronize()
    assert_bitwise_equal([p.detach() for p in resumed_model.parameters()], full.params)


# ----------------------------------------------------------------- (f) close() mid-flight


@pytest.mark.parametrize("then", ["continue", "state_dict"])
def test_close_with_roots_in_flight_then_continuing_equals_an_uninterrupted_run(
    then: str,
) -> None:
    """close() while the workers wait for a snapshot copy still queued on the GPU cancels their
    roots; the next step (or ``state_dict()``, on the calling thread) computes them again."""
    kwargs = dict(BASE, precondition_frequency=3, root_staleness=2, root_workers=1)
    batches = cuda_batches(12)
    plain = train_fresh(batches, kwargs, lag=LAG)

    model = mixed_model().to(CUDA)
    opt = Shampoo(model.parameters(), **kwargs)
    train_lagging(model, opt, batches[:5], LAG)
    train_lagging(model, opt, batches[5:6], lag=0.5)  # step 6: roots due at step 8
    in_flight = [t for pending in opt._roots.pending.values() for t in pending.tickets]
    assert in_flight and not any(t.done() for t in in_flight)
    opt.close()
    assert all(t.cancelled for t in in_flight)
    if then == "state_dict":
        saved = opt.state_dict()  # computes the cancelled roots here, without new workers
        assert opt._roots.pool is None
        pending = [s for s in saved["state"].values() if int(s["pending_due"]) >= 0]
        assert pending and all(bool(s["pending_ok"].all()) for s in pending)
    train_lagging(model, opt, batches[6:], LAG)
    opt.close()
    torch.cuda.synchronize()
    assert opt.root_stats()["roots_computed"] == plain.stats["roots_computed"]
    assert_bitwise_equal([p.detach() for p in model.parameters()], plain.params)


# ------------------------------------------------------------------------------- (f) SOAP


def test_soap_async_bases_equal_sync_bases_with_the_same_staleness_on_cuda() -> None:
    """Eigenbases from the pool, rotations and the power-iteration refresh (QR on the device)
    in both modes: bitwise the same, with the device lagging behind the host."""
    kwargs = dict(lr=0.01, block_size=16, precondition_frequency=3, root_staleness=2, eigh_every=2)
    batches = cuda_batches(14)
    asynchronous = train_fresh(batches, {**kwargs, "async_roots": True}, lag=LAG, optimizer=SOAP)
    synchronous = train_fresh(batches, {**kwargs, "async_roots": False}, lag=LAG, optimizer=SOAP)
    assert asynchronous.stats["roots_computed"] > 0 and asynchronous.stats["root_failures"] == 0
    assert_bitwise_equal(asynchronous.params, synchronous.params)


def test_soap_on_cuda_matches_the_same_run_on_cpu() -> None:
    """In float64: the first bases come from one gradient, and float32 rounding differences
    in the directions no gradient has reached yet part two correct SOAP runs by O(lr) (1.8e-2
    between 1 and 2 CPU threads in float32, 0 in float64)."""
    kwargs = dict(
        lr=0.01, block_size=16, precondition_frequency=2, root_staleness=1, eps=1e-4, eigh_every=2
    )
    batches = make_batches(8, dtype=torch.float64)
    f64 = torch.float64
    on_cpu = train_fresh(batches, kwargs, dtype=f64, device=torch.device("cpu"), optimizer=SOAP)
    on_cuda = train_fresh(to_cuda(batches), kwargs, dtype=f64, optimizer=SOAP)
    assert on_cuda.stats["roots_computed"] == on_cpu.stats["roots_computed"] > 0
    for a, b in zip(on_cuda.params, on_cpu.params):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-7, atol=1e-9)


def test_stochastic_rounding_on_cuda_is_bitwise_the_cpus() -> None:
    """bfloat16 state's rounding (``rounding.round_``: integer arithmetic on the device, in
    chunks of ``DEVICE_CHUNK`` on a GPU and ``CHUNK`` on the CPU) gives the same bits on both,
    across several chunks and at an offset."""
    from torch_shampoo import rounding

    x = torch.randn(3 * rounding.CHUNK + 77, generator=torch.Generator().manual_seed(5)) * 7
    for offset in (0, 12345):
        on_cpu = rounding.round_(x.clone(), seed=11, offset=offset)
        on_cuda = rounding.round_(x.to(CUDA), seed=11, offset=offset).cpu()
        assert torch.equal(on_cpu.view(torch.int32), on_cuda.view(torch.int32))
