"""Subnormal numbers in the step (``torch_shampoo.device.subnormals_flushed``).

Claims:

* within the context, this thread's CPU arithmetic flushes subnormals to zero; after it, the
  thread's mode is what it was (flushing or not), also after an error;
* a step of every front end leaves the caller's mode as it was, and the statistics of tiny
  gradients hold no subnormal numbers (plain torch computes subnormal ones from the same
  gradient);
* every root solve runs in that mode too, in whichever thread it runs;
* intra-op threads that start during a step (the first parallel region, or more threads after
  ``torch.set_num_threads``) do not inherit the flushing: they start before it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import torch_shampoo.roots.pool as root_pool
from torch_shampoo import SOAP, NGPlus, Shampoo
from torch_shampoo.device import subnormals_flushed

TINY = 2.0**-126  # float32's smallest normal number
SUBNORMAL = 1e-40  # a float32 subnormal

pytestmark = pytest.mark.skipif(
    not torch.set_flush_denormal(False), reason="this CPU cannot flush subnormals"
)


def flushing() -> bool:
    """Does this thread's CPU flush subnormals now? (1e-40 is stored as 0 when it does.)"""
    return torch.tensor(SUBNORMAL).item() == 0.0


def subnormal_count(x: torch.Tensor) -> int:
    return int(((x != 0) & (x.abs() < TINY)).sum())


@pytest.fixture(params=[False, True], ids=["caller keeps subnormals", "caller flushes"])
def caller_mode(request: pytest.FixtureRequest) -> Iterator[bool]:
    torch.set_flush_denormal(request.param)
    yield request.param
    torch.set_flush_denormal(False)


def test_the_context_flushes_within_and_restores_the_callers_mode(caller_mode: bool) -> None:
    assert flushing() == caller_mode
    with subnormals_flushed():
        assert flushing()
        assert (torch.tensor([1e-30]) * torch.tensor([1e-10])).item() == 0.0
    assert flushing() == caller_mode
    with pytest.raises(RuntimeError, match="inside"), subnormals_flushed():
        raise RuntimeError("inside")
    assert flushing() == caller_mode


def _optimizer(front: str, params: list[nn.Parameter], **kwargs: object) -> torch.optim.Optimizer:
    if front == "shampoo":
        return Shampoo(params, lr=0.01, precondition_frequency=2, **kwargs)  # type: ignore[arg-type]
    if front == "soap":
        return SOAP(params, lr=0.01, precondition_frequency=2, **kwargs)  # type: ignore[arg-type]
    return NGPlus(params, lr=0.01, inverse_frequency=2, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("front", ["shampoo", "soap", "ngplus"])
def test_a_step_keeps_the_callers_mode_and_no_subnormal_statistics(
    front: str, caller_mode: bool
) -> None:
    w = nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))
    opt = _optimizer(front, [w], async_roots=False)
    grad = torch.full((6, 5), 1e-21)
    torch.set_flush_denormal(False)
    assert subnormal_count(grad @ grad.T * 1e-3) > 0  # what the statistics would hold
    torch.set_flush_denormal(caller_mode)
    for _ in range(4):
        w.grad = grad.clone()
        opt.step()
        assert flushing() == caller_mode
    factors = [f for key, v in opt.state[w].items() if key in ("factors", "fisher") for f in v]
    assert factors and all(subnormal_count(f) == 0 for f in factors)
    assert torch.isfinite(w).all()
    opt.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("front", ["shampoo", "soap"])
def test_every_root_solve_runs_flushed_in_whichever_thread_solves_it(
    front: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's mode in the solves too, so that a root's bits do not depend on the thread
    that solved it: the pool's workers (started within a step, whose mode a new thread
    inherits), and the caller's thread when ``state_dict()`` solves the roots a ``close()``
    left in flight (outside any step). The worker that takes step 4's roots is held until
    ``close()`` has cancelled them: otherwise whether they are still in flight then is a race
    (a 6 x 5 block's roots take microseconds), which a worker that finishes first loses."""
    seen: list[bool] = []
    name = "eigenbases" if front == "soap" else "inverse_roots"
    solver = getattr(root_pool, name)
    hold, entered, release = threading.Event(), threading.Event(), threading.Event()

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(flushing())
        if hold.is_set() and threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(30)
        return solver(*args, **kwargs)

    monkeypatch.setattr(root_pool, name, recording)
    gen = torch.Generator().manual_seed(1)
    w = nn.Parameter(torch.randn(6, 5, generator=gen))
    exact = {"eigh_every": 1} if front == "soap" else {}  # every basis from the pool
    opt = _optimizer(front, [w], root_staleness=1, **exact)
    for step in range(1, 5):  # step 4 sends roots due at step 5
        if step == 4:
            hold.set()
        w.grad = torch.randn(6, 5, generator=gen)
        opt.step()
    assert entered.wait(30)  # a worker has step 4's roots
    opt.close()  # type: ignore[attr-defined]
    hold.clear()
    release.set()
    solved = len(seen)
    opt.state_dict()  # solves the roots in flight, here
    assert len(seen) > solved and all(seen)
    assert not flushing()


LATE_THREADS = """
import torch
from torch import nn
from torch_shampoo import Shampoo

torch.set_num_threads(1)
layer = nn.Linear(512, 512, bias=False)
opt = Shampoo(layer.parameters(), lr=0.01, block_size=128, async_roots=False)
layer(torch.randn(1, 512)).sum().backward()
torch.set_num_threads(2)  # the second intra-op thread would start within the step
opt.step()
opt.close()
print(int((torch.full((1 << 22,), 1e-40) * 1.0 == 0).sum()))  # half of it on that thread
"""


def test_intra_op_threads_started_by_a_step_do_not_flush_the_callers_later_work() -> None:
    # A fresh process: the suite's own intra-op threads exist already.
    done = subprocess.run(
        [sys.executable, "-c", LATE_THREADS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
