"""Hardening: the non-finite guard and adversarial soaks, for Shampoo and NG+ (bad input:
test_hardening_input.py; state dicts and mixed precision: test_hardening_state.py;
torch.compile and resource hygiene: test_hardening_runtime.py).

Each test states one claim about behaviour under conditions a training job meets in the wild
(NaN bursts, frozen layers, hostile kwargs, truncated checkpoints, AMP, compiled models, long
runs) and checks it against a counterpart that shows the claim is not vacuous.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hardening_helpers import (
    BLOCKWISE,
    FRONTS,
    INF,
    MODES,
    NAN,
    all_finite,
    clone_state,
    make_optimizer,
)
from models import (
    assert_bitwise_equal,
    make_batches,
    mixed_model,
    train,
)
from torch import nn

import torch_shampoo.device
from torch_shampoo import Shampoo

# ------------------------------------------------------------------------ non-finite guard

# Per front end: the shape of the guarded weight W, W's blocks as index tuples, and the indices
# of W's factors that belong to each block. Shampoo cuts (6, 20) by columns at 16 (factors
# [6, 16 | 6, 4]); NG+ cuts the output side of (20, 6) at row 16 (factors [16 | 4]).
GUARD_LAYOUT: dict[str, Any] = {
    "shampoo": dict(
        shape=(6, 20),
        blocks=[(slice(None), slice(0, 16)), (slice(None), slice(16, 20))],
        factors=[[0, 1], [2, 3]],
        poison=(2, 18),
    ),
    "ngplus": dict(
        shape=(20, 6),
        blocks=[(slice(0, 16),), (slice(16, 20),)],
        factors=[[0], [1]],
        poison=(18, 2),
    ),
}


def _guard_setup(
    front: str, async_roots: bool, **kwargs: Any
) -> tuple[Any, nn.Parameter, nn.Parameter, torch.Generator]:
    gen = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(GUARD_LAYOUT[front]["shape"], generator=gen))
    v = nn.Parameter(torch.randn(7, generator=gen))
    opt = make_optimizer(front, [w, v], async_roots=async_roots, **kwargs)
    for _ in range(5):  # past the first roots: the preconditioner is in use
        w.grad = torch.randn(w.shape, generator=gen)
        v.grad = torch.randn(v.shape, generator=gen)
        opt.step()
    return opt, w, v, gen


@FRONTS
@MODES
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_a_non_finite_block_is_skipped_and_every_other_block_steps(
    front: str, async_roots: bool, bad: float
) -> None:
    spec = GUARD_LAYOUT[front]
    opt, w, v, gen = _guard_setup(front, async_roots)
    before_w, before_v = clone_state(opt.state[w]), clone_state(opt.state[v])
    w0, v0 = w.detach().clone(), v.detach().clone()
    skipped = opt.root_stats()["skipped_blocks"]
    assert skipped == 0
    w.grad = torch.randn(w.shape, generator=gen)
    w.grad[spec["poison"]] = bad  # in the second block of w
    v.grad = torch.randn(v.shape, generator=gen)
    opt.step()  # step 6: a root step, too

    state = opt.state[w]
    kept, hit = spec["blocks"]
    kept_factors, hit_factors = spec["factors"]
    for j in hit_factors:
        assert torch.equal(state["factors"][j], before_w["factors"][j]), j
    for j in kept_factors:
        assert not torch.equal(state["factors"][j], before_w["factors"][j]), j
    for key in (k for k in BLOCKWISE if k in state):
        assert torch.equal(state[key][hit], before_w[key][hit]), key
        assert not torch.equal(state[key][kept], before_w[key][kept]), key
    assert torch.equal(w[hit], w0[hit])
    assert not torch.equal(w[kept], w0[kept])
    assert torch.isfinite(w).all()
    # The other parameter stepped, and so did its whole state.
    assert not torch.equal(v, v0)
    moments = [k for k in BLOCKWISE if k in opt.state[v]]
    assert moments and all(not torch.equal(opt.state[v][k], before_v[k]) for k in moments)
    assert opt.root_stats()["skipped_blocks"] == 1
    assert all_finite(state["roots"]) and all_finite(state["factors"])

    for _ in range(4):  # training goes on, the block steps again
        w.grad = torch.randn(w.shape, generator=gen)
        v.grad = torch.randn(v.shape, generator=gen)
        opt.step()
    assert not torch.equal(w[hit], w0[hit])
    assert torch.isfinite(w).all() and all_finite(opt.state[w]["roots"])
    assert opt.root_stats()["skipped_blocks"] == 1
    opt.close()


@pytest.mark.parametrize("poisoned", [0, 1], ids=["first", "second"])
def test_a_non_finite_block_beside_a_finite_parameter_of_its_bucket_is_skipped(
    poisoned: int,
) -> None:
    """Two 32×32 parameters of 16×16 blocks share one bucket; on the CPU the finite one's flags
    are known all True and left out (``cells`` None). The statistics must still mask the other
    one's bad block: it raised AttributeError when the bad parameter came first, and decayed the
    bad block's factors by β₂ when it came second."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(32, 32, generator=gen).requires_grad_() for _ in range(2)]
    with Shampoo(params, lr=0.01, block_size=16, precondition_frequency=2,
                 async_roots=False) as opt:  # fmt: skip
        for step in range(3):
            for p in params:
                p.grad = torch.randn(32, 32, generator=gen)
            if step == 2:
                before = [clone_state(opt.state[p]) for p in params]
                params[poisoned].grad[0, 0] = NAN  # type: ignore[index]  # block 0 (rows, cols 0-15)
            opt.step()
        for i, p in enumerate(params):
            factors, old = opt.state[p]["factors"], before[i]["factors"]
            assert len(factors) == 8  # 4 blocks x (rows, cols)
            for j in range(8):
                hit = i == poisoned and j < 2
                assert torch.equal(factors[j], old[j]) == hit, (i, j)
            assert torch.isfinite(p).all() and all_finite(opt.state[p]["factors"])
        assert opt.root_stats()["skipped_blocks"] == 1


@pytest.mark.parametrize("case", ["finite", "norm overflows", "nan"])
def test_the_all_finite_shortcut_equals_the_per_block_guard_bitwise(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One norm per gradient decides on the CPU whether the per-block guard can be skipped; it
    must never change a result: with it and without it (monkeypatched away) the runs are
    bitwise equal, including a finite gradient whose norm overflows (the per-block check then
    runs and steps it) and a NaN (that block skipped either way)."""
    import torch_shampoo.update.per_unit as step_module

    def run() -> tuple[list[torch.Tensor], int]:
        model = mixed_model()
        with Shampoo(model.parameters(), lr=0.01, block_size=16, precondition_frequency=4,
                     async_roots=False) as opt:  # fmt: skip
            for i, (x, y) in enumerate(make_batches(6)):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                if i == 4 and case != "finite":
                    grad = model.fc.weight.grad
                    assert grad is not None
                    grad[0, 0] = NAN if case == "nan" else 1e30  # its norm overflows to inf
                opt.step()
            return [p.detach().clone() for p in model.parameters()], opt.root_stats()[
                "skipped_blocks"
            ]

    checks = []
    per_block = step_module.kernels.finite_blocks
    monkeypatch.setattr(
        step_module.kernels, "finite_blocks", lambda *a: checks.append(1) or per_block(*a)
    )
    with_shortcut, skipped = run()
    assert (len(checks) == 0) == (case == "finite")  # the shortcut was taken, or not
    monkeypatch.setattr(step_module, "mark_finite", lambda units: None)
    without, skipped_without = run()
    assert skipped == skipped_without == (1 if case == "nan" else 0)
    for a, b in zip(with_shortcut, without):
        assert torch.equal(a, b)


@FRONTS
def test_without_the_guard_a_nan_gradient_propagates(front: str) -> None:
    """The counterpart of the test above: the guard is what keeps the NaN out."""
    spec = GUARD_LAYOUT[front]
    opt, w, v, gen = _guard_setup(front, False, skip_nonfinite=False)
    w.grad = torch.randn(w.shape, generator=gen)
    w.grad[spec["poison"]] = NAN
    v.grad = torch.randn(v.shape, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the NaN factor's root fails
        opt.step()
    _, hit = spec["blocks"]
    assert torch.isnan(w[hit]).any()
    assert not all_finite([opt.state[w]["factors"][j] for j in spec["factors"][1]])
    assert opt.root_stats()["skipped_blocks"] == 0
    opt.close()


@FRONTS
@MODES
@pytest.mark.parametrize("masks", ["read", "always"])
def test_the_guard_is_bitwise_neutral_on_finite_gradients(
    front: str, async_roots: bool, masks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the flags are read and all-finite steps skip the masks; "always" forces the
    masked arithmetic CUDA uses (flags never read), which must give the same bits."""
    if masks == "always":
        monkeypatch.setattr(torch_shampoo.device, "known_all_true", lambda flags: False)

    def run(skip: bool) -> list[torch.Tensor]:
        model = mixed_model()
        opt = make_optimizer(
            front,
            model.parameters(),
            async_roots=async_roots,
            skip_nonfinite=skip,
            root_staleness=2,  # not "auto": its fitted value depends on timing
        )
        train(model, opt, make_batches(20))
        assert opt.root_stats()["roots_computed"] > 0
        opt.close()
        return [p.detach().clone() for p in model.parameters()]

    assert_bitwise_equal(run(True), run(False))


# ------------------------------------------------------------------------------ soak tests


def _rank1(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    rows = shape[0] if len(shape) else 1
    u = torch.randn(rows, 1, generator=gen)
    v = torch.randn(1, max(1, math.prod(shape) // rows), generator=gen)
    return (u @ v).reshape(shape)


STREAMS: dict[str, Callable[[int, torch.Tensor, torch.Generator], torch.Tensor]] = {
    "zeros": lambda t, p, gen: torch.zeros_like(p),
    "rank1": lambda t, p, gen: _rank1(p.shape, gen),
    # t = 1 … 61 in the segment: 10^-15 … 10^15 and back down to 10^-15, one decade per step.
    "scales": lambda t, p, gen: torch.randn(p.shape, generator=gen) * 10.0 ** (15 - abs(t - 31)),
    "alternating": lambda t, p, gen: (
        (-1.0) ** t * torch.linspace(-1, 2, p.numel()).reshape(p.shape)
    ),
    "gaussian": lambda t, p, gen: torch.randn(p.shape, generator=gen),
}
# The stream changes character every 30 steps (the scale sweep takes 61 steps and is played
# right after the zeros, so the statistics go from nothing to 10^30 and back).
SEGMENTS = ["gaussian", "zeros", "scales", "rank1", "alternating", "gaussian", "rank1"]


def _stream_at(t: int) -> tuple[str, int]:
    """The segment of step t (1-based) and the step within it: 30 steps each, the sweep 61."""
    for name in SEGMENTS:
        length = 61 if name == "scales" else 30
        if t <= length:
            return name, t
        t -= length
    raise IndexError(t)


SOAK_STEPS = sum(61 if name == "scales" else 30 for name in SEGMENTS)


class SoakModel(nn.Module):
    """Parameters of every rank, one frozen, one that stops receiving gradients mid-run."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.w = nn.Parameter(torch.randn(20, 18, generator=gen) * 0.3)
        self.b = nn.Parameter(torch.zeros(20))
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.conv = nn.Parameter(torch.randn(6, 3, 3, 3, generator=gen) * 0.3)
        self.frozen = nn.Parameter(torch.randn(5, 5, generator=gen), requires_grad=False)
        self.late = nn.Parameter(torch.randn(9, 4, generator=gen))


@FRONTS
def test_soak_under_adversarial_gradient_streams(front: str) -> None:
    """241 async steps (roots every 3 steps, in flight for 2) through every stream of
    ``SEGMENTS``; one NaN and one Inf every 25 steps; ``late`` gets no gradient after step 120,
    ``frozen`` never does. No root installed is ever non-finite, the parameters stay finite,
    every poisoned block is counted, training never stops and no root fails."""
    steps, stop_late = SOAK_STEPS, 120
    model = SoakModel()
    params = list(model.parameters())
    kwargs: dict[str, Any] = dict(root_staleness=2, root_workers=2, async_roots=True)
    if front == "shampoo":
        opt = make_optimizer(front, params, precondition_frequency=3, block_size=8, **kwargs)
    else:
        opt = make_optimizer(front, params, inverse_frequency=3, block_size=8, **kwargs)
    gen = torch.Generator().manual_seed(11)
    poisoned = 0
    frozen0 = model.frozen.detach().clone()
    late_at_stop: torch.Tensor | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed root would be a finding
        for t in range(1, steps + 1):
            name, local = _stream_at(t)
            for p in params:
                p.grad = STREAMS[name](local, p, gen) if p.requires_grad else None
            if t > stop_late:
                model.late.grad = None
            if t % 25 == 0:  # one non-finite entry in two parameters: one block each
                model.w.grad[t % 20, t % 18] = NAN
                model.conv.grad[t % 6, 1, 2, 0] = INF
                poisoned += 2
            opt.step()
            for p in params:
                state = opt.state.get(p)
                if state:
                    assert all_finite(state["roots"]), (t, p.shape)
                    assert all_finite(state["factors"]), (t, p.shape)
                assert torch.isfinite(p).all(), (t, p.shape)
            if t == stop_late:
                late_at_stop = model.late.detach().clone()

    stats = opt.root_stats()
    opt.close()
    assert late_at_stop is not None and torch.equal(model.late, late_at_stop)
    assert torch.equal(model.frozen, frozen0) and model.frozen not in opt.state
    assert stats["skipped_blocks"] == poisoned
    assert stats["root_failures"] == 0
    root_steps = steps // 3
    factors = sum(len(s["factors"]) for s in opt.state.values())
    assert factors > 0
    assert 0 < stats["roots_computed"] <= root_steps * factors
    assert stats["max_staleness"] == 2 and 0 < stats["mean_staleness"] <= 2
    assert stats["pending_parameters"] <= len(opt.state)
    assert all(math.isfinite(v) for k, v in stats.items() if k != "last_error")
