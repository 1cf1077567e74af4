"""Hardening: the non-finite guard, adversarial soaks, bad input, state-dict tampering, mixed
precision, torch.compile and resource hygiene, for Shampoo and NG+.

Each test states one claim about behaviour under conditions a training job meets in the wild
(NaN bursts, frozen layers, hostile kwargs, truncated checkpoints, AMP, compiled models, long
runs) and checks it against a counterpart that shows the claim is not vacuous.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from models import (
    assert_bitwise_equal,
    make_batches,
    mixed_model,
    settled,
    threads_settle_at,
    train,
    without_recompiles,
)
from torch import nn

import torch_shampoo.device
from torch_shampoo import SOAP, NGPlus, Shampoo

NAN = float("nan")
INF = float("inf")
MODES = pytest.mark.parametrize("async_roots", [False, True], ids=["sync", "async"])
FRONTS = pytest.mark.parametrize("front", ["shampoo", "ngplus"])


# ----------------------------------------------------------------------------------- helpers


def make_optimizer(front: str, params: Any, **kwargs: Any) -> Shampoo | NGPlus:
    """A front end with small blocks and frequent roots, so the preconditioner is used early."""
    if kwargs.get("async_roots", True) and "root_staleness" not in kwargs:
        kwargs["root_staleness"] = 1  # not "auto", whose fitted value depends on timing
    if front == "shampoo":
        base: dict[str, Any] = dict(
            lr=0.02, block_size=16, precondition_frequency=2, momentum=0.5, root_workers=1
        )
        return Shampoo(params, **{**base, **kwargs})
    base = dict(
        lr=0.02, damping=0.1, block_size=16, inverse_frequency=2, momentum=0.5, root_workers=1
    )
    return NGPlus(params, **{**base, **kwargs})


def clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: [t.clone() for t in v] if isinstance(v, list) else v.clone()
        for k, v in state.items()
        if isinstance(v, (torch.Tensor, list))
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for key in a:
        xs, ys = (a[key], b[key]) if isinstance(a[key], list) else ([a[key]], [b[key]])
        assert len(xs) == len(ys), key
        for x, y in zip(xs, ys):
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x, y), key


def roundtrip(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


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
BLOCKWISE = ("exp_avg", "graft_v", "momentum_buffer")


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


# ------------------------------------------------------------------------------ bad input


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def _anything() -> st.SearchStrategy[Any]:
    """Values of every kind a caller might pass by mistake (or on purpose)."""
    floats = st.floats(allow_nan=True, allow_infinity=True)
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 40),
        st.integers(-(2**70), 2**70),
        floats,
        st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e-12, 0.5, 0.9, 0.999, 1.0, 1.5, 1e300]),
        st.text(max_size=6),
        st.sampled_from(
            [
                "adam",
                "adagrad",
                "rmsprop",
                "sgd",
                "none",
                "eigh",
                "newton",
                "cholesky",
                "minibatch",
                "per_sample",
                "ADAM",
                "",
            ]
        ),
        st.tuples(floats, floats),
        st.tuples(st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.sampled_from([0.0, 0.5, 0.99, 1.0])),
        st.lists(st.floats(0, 1), max_size=3),
        st.builds(torch.tensor, floats),
        st.builds(lambda x: torch.tensor([x]), st.floats(0, 1)),
        st.sampled_from(
            [
                torch.tensor(0.1, dtype=torch.float64),
                torch.tensor(1),
                torch.tensor([0.1, 0.2]),
                torch.tensor(1 + 1j),
                torch.tensor(True),
                torch.zeros(0),
            ]
        ),
        st.sampled_from([lambda t: 1e-3, lambda t: -1.0, lambda t: NAN]),
        st.sampled_from([1 + 1j, b"adam", {}, _Opaque(), {"lr": 0.1}, nn.Linear(2, 2)]),
    )


# (The constructor fuzz of every front end, drawn from the settings spec: tests/test_settings.py.)
# No shrinking: a failing draw is reported as found (the minimal cases found so far are pinned
# in FOUND_BY_FUZZ below), which keeps a failing run as short as a passing one.
FUZZ_SETTINGS: dict[str, Any] = dict(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


@settings(**{**FUZZ_SETTINGS, "max_examples": 40})
@given(model=_anything())
def test_fuzz_ngplus_model_kwarg(model: Any) -> None:
    """``model=`` with per-sample statistics: a TypeError/ValueError naming ``model``, or hooks
    that feed the statistics of a real forward/backward."""
    layer = nn.Linear(4, 3)
    if model is None:  # the documented way to attach later; stepping before that is refused
        with NGPlus(layer.parameters(), statistics="per_sample") as opt:
            layer(torch.randn(5, 4)).square().sum().backward()
            with pytest.raises(RuntimeError, match=r"attach\(model\)"):
                opt.step()
        return
    try:
        opt = NGPlus(layer.parameters(), statistics="per_sample", model=model, inverse_frequency=1)
    except (ValueError, TypeError) as error:
        assert "model" in str(error), str(error)
        return
    with opt:
        layer(torch.randn(5, 4)).square().sum().backward()
        opt.step()


BAD_SETTINGS = {
    "shampoo": [("precondition_frequency", 0), ("betas", (0.9, 1.5)), ("grafting", "bogus")],
    "ngplus": [("damping", -1.0), ("inverse_frequency", 0), ("momentum", 2.0)],
    "soap": [("betas", (1.0, 0.95)), ("eigh_every", 0), ("merge_dims", "x")],
}


@pytest.mark.parametrize(
    ("front", "key", "value"),
    [(front, key, value) for front, bad in BAD_SETTINGS.items() for key, value in bad],
    ids=repr,
)
def test_a_bad_setting_written_during_training_is_refused_at_the_next_step(
    front: str, key: str, value: Any
) -> None:
    """A value written into ``param_groups`` after construction is checked like a constructor
    kwarg at the next step: the error names the group, the setting and the value, the weights
    and the state stay as they were, and with the setting put back training goes on."""
    model = mixed_model()
    batches = make_batches(6)
    if front == "soap":
        opt: Any = SOAP(model.parameters(), lr=0.01, block_size=16, precondition_frequency=2)
    else:
        opt = make_optimizer(front, model.parameters(), async_roots=False)
    with opt:
        train(model, opt, batches[:3])
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.state_dict()["state"])
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises((ValueError, TypeError), match=rf"param_groups\[0\].*{key}"):
            train(model, opt, batches[3:4])
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
        assert int(opt.state_dict()["state"][0]["step"]) == int(state[0]["step"]) == 3
        opt.param_groups[0][key] = good
        train(model, opt, batches[3:])
        assert int(opt.state_dict()["state"][0]["step"]) == 6


def test_a_parameter_resized_during_training_is_refused_naming_its_new_shape() -> None:
    """``p.data = bigger`` after some steps (a resized embedding): the next step raises naming
    the parameter, its new shape and the likely cause, and changes nothing."""
    layer = nn.Linear(6, 5)
    with Shampoo(layer.parameters(), block_size=4, async_roots=False) as opt:
        for _ in range(2):
            layer.weight.grad, layer.bias.grad = torch.randn(5, 6), torch.randn(5)
            opt.step()
        layer.weight.data = torch.randn(7, 6)
        layer.weight.grad, layer.bias.grad = torch.randn(7, 6), torch.randn(5)
        bias = layer.bias.detach().clone()
        with pytest.raises(ValueError, match=r"parameter 0 \(shape \(7, 6\)\).*parameter's shape"):
            opt.step()
        assert torch.equal(layer.bias, bias)
        assert int(opt.state[layer.bias]["step"]) == 2


@pytest.mark.parametrize("model", [False, 3, "net", [nn.Linear(4, 3)]], ids=repr)
def test_a_model_that_is_not_a_module_is_a_type_error_naming_model(model: Any) -> None:
    layer = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="model"):
        NGPlus(layer.parameters(), statistics="per_sample", model=model)


SHAPES = [(), (7,), (5, 9), (3, 4, 5), (2, 3, 4, 5), (2, 2, 3, 2, 3), (1, 1, 6), (40, 3)]


def _quadratic_descent(
    opt: Any, params: list[torch.Tensor], targets: list[torch.Tensor], steps: int
) -> None:
    for _ in range(steps):
        for p, target in zip(params, targets):
            p.grad = (p.detach() - target).to(p.dtype)
        opt.step()


@FRONTS
@MODES
def test_parameters_of_every_rank_step_towards_the_minimum(front: str, async_roots: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    targets = [torch.randn(s, generator=gen) for s in SHAPES]
    start = [(p.detach() - t).norm() for p, t in zip(params, targets)]
    with make_optimizer(front, params, lr=0.05, block_size=4, async_roots=async_roots) as opt:
        _quadratic_descent(opt, params, targets, 12)
        assert opt.root_stats()["roots_computed"] > 0
    for p, t, d0, shape in zip(params, targets, start, SHAPES):
        assert p.shape == shape and torch.isfinite(p).all()
        assert (p.detach() - t).norm() < d0, shape


@FRONTS
@MODES
def test_zero_size_parameters_step_without_error(front: str, async_roots: bool) -> None:
    params = [nn.Parameter(torch.randn(s)) for s in [(0,), (3, 0), (0, 4, 2), (2, 0, 3, 3)]]
    other = nn.Parameter(torch.randn(3, 3))
    with make_optimizer(front, [*params, other], async_roots=async_roots) as opt:
        for _ in range(5):
            for p in [*params, other]:
                p.grad = torch.randn(p.shape)
            opt.step()
        assert all(int(opt.state[p]["step"]) == 5 for p in params)
        assert opt.state[other]["roots"]
    assert [tuple(p.shape) for p in params] == [(0,), (3, 0), (0, 4, 2), (2, 0, 3, 3)]


def _layouts() -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    return [
        ("transposed", lambda t: t.t().contiguous().t() if t.dim() == 2 else t),
        ("strided-slice", lambda t: torch.stack([t, -t], dim=-1)[..., 0]),
        ("channels_last", lambda t: t.to(memory_format=torch.channels_last)),
    ]


@FRONTS
@MODES
@pytest.mark.parametrize("layout", [name for name, _ in _layouts()])
def test_non_contiguous_parameters_follow_the_contiguous_trajectory(
    front: str, async_roots: bool, layout: str
) -> None:
    """Memory layout is not math: a strided parameter ends bitwise where its contiguous twin
    does, and keeps its strides."""
    make = dict(_layouts())[layout]
    shape = (6, 3, 4, 5) if layout == "channels_last" else (12, 20)
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(shape, generator=gen)
    target = torch.randn(shape, generator=gen)
    strided = nn.Parameter(make(values.clone()))
    plain = nn.Parameter(values.clone())
    assert torch.equal(strided, plain)
    assert not strided.is_contiguous() and strided.stride() != plain.stride()
    strides = strided.stride()
    for p in (strided, plain):
        with make_optimizer(front, [p], block_size=8, async_roots=async_roots) as opt:
            _quadratic_descent(opt, [p], [target], 8)
    assert strided.stride() == strides
    assert torch.isfinite(strided).all() and not torch.equal(strided, values)
    assert torch.equal(strided.detach(), plain.detach())


@FRONTS
def test_the_same_tensor_twice_gives_pytorchs_own_diagnostics(front: str) -> None:
    p = nn.Parameter(torch.randn(3, 3))

    def outcome(build: Callable[[], Any]) -> tuple[str, str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt = build()
            except Exception as error:
                return type(error).__name__, str(error)
        if hasattr(opt, "close"):
            opt.close()
        return "ok", " | ".join(str(w.message) for w in caught)

    cls = Shampoo if front == "shampoo" else NGPlus
    same_group = outcome(lambda: cls([p, p]))
    assert same_group == outcome(lambda: torch.optim.Adam([p, p]))
    assert "duplicate" in same_group[1]
    two_groups = outcome(lambda: cls([{"params": [p]}, {"params": [p]}]))
    assert two_groups == outcome(lambda: torch.optim.Adam([{"params": [p]}, {"params": [p]}]))
    assert two_groups[0] == "ValueError"


@FRONTS
@MODES
def test_float32_float64_bfloat16_in_one_group_step_each_in_its_own_dtype(
    front: str, async_roots: bool
) -> None:
    """Sharing a group changes nothing: each parameter ends bitwise where it ends alone, in its
    own dtype, with float32 state for bf16/fp32 and float64 state for fp64. (Unstaggered:
    staggered, a parameter's phase depends on the others of its group, tests/test_stagger.py.)"""
    gen = torch.Generator().manual_seed(4)
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    values = [torch.randn(6, 20, generator=gen).to(d) for d in dtypes]
    grads = [[torch.randn(6, 20, generator=gen).to(d) for d in dtypes] for _ in range(6)]

    def run(params: list[nn.Parameter], index: list[int]) -> Any:
        opt = make_optimizer(front, params, async_roots=async_roots, stagger_roots=False)
        for step_grads in grads:
            for p, i in zip(params, index):
                p.grad = step_grads[i]
            opt.step()
        opt.close()
        return opt

    together = [nn.Parameter(v.clone()) for v in values]
    opt = run(together, [0, 1, 2])
    for p, v, d in zip(together, values, dtypes):
        assert p.dtype == d and not torch.equal(p, v) and torch.isfinite(p).all()
        expected = torch.float64 if d == torch.float64 else torch.float32
        state = opt.state[p]
        for key in (k for k in (*BLOCKWISE, "factors", "roots") if k in state):
            tensors = state[key] if isinstance(state[key], list) else [state[key]]
            assert {t.dtype for t in tensors} == {expected}, (d, key)
    for i, v in enumerate(values):
        alone = nn.Parameter(v.clone())
        run([alone], [i])
        assert_bitwise_equal([alone.detach()], [together[i].detach()])


# ------------------------------------------------------------------------------ state dicts


class Trained:
    """A model and optimizer after 9 steps (the first roots, of step 4, installed at once; those
    of step 8 in flight until step 11), its checkpoint, and where 4 more steps take it when
    nothing interferes."""

    def __init__(self, front: str) -> None:
        batches = make_batches(13, seed=7)
        self.rest = batches[9:]
        self.model = mixed_model(seed=2)
        kwargs: dict[str, Any] = dict(async_roots=True, root_staleness=3)
        frequency = "precondition_frequency" if front == "shampoo" else "inverse_frequency"
        self.opt = make_optimizer(front, self.model.parameters(), **{frequency: 4}, **kwargs)
        train(self.model, self.opt, batches[:9])
        self.checkpoint = roundtrip(self.opt.state_dict())
        model, opt = copy.deepcopy((self.model, self.opt))
        train(model, opt, self.rest)
        opt.close()
        self.expected = [p.detach().clone() for p in model.parameters()]

    def copy(self) -> tuple[nn.Module, Any]:
        return copy.deepcopy((self.model, self.opt))


@pytest.fixture(scope="module")
def trained() -> Iterator[dict[str, Trained]]:
    runs = {front: Trained(front) for front in ("shampoo", "ngplus")}
    yield runs
    for run in runs.values():
        run.opt.close()


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(s: dict[str, Any]) -> None:
        del s[key]

    return edit


def _shorten(key: str) -> Callable[[dict[str, Any]], None]:
    """One entry fewer (the last key of a per-factor dict)."""

    def edit(s: dict[str, Any]) -> None:
        value = s[key]
        if isinstance(value, dict):
            s[key] = {k: v for k, v in value.items() if k != str(len(value) - 1)}
        else:
            s[key] = value[:-1]

    return edit


def _reshape_first(key: str) -> Callable[[dict[str, Any]], None]:
    """Replace the first tensor of ``key`` by one of another shape (same number of dims)."""

    def edit(s: dict[str, Any]) -> None:
        value = s[key]
        first = value["0"] if isinstance(value, dict) else value
        wrong = torch.zeros(*(d + 1 for d in first.shape), dtype=first.dtype)
        s[key] = {**value, "0": wrong} if isinstance(value, dict) else wrong

    return edit


# Edits of the state of parameter 2 (``fc.weight``, two blocks, roots in flight at step 5).
TAMPERING: dict[str, Callable[[dict[str, Any]], None]] = {
    **{f"missing-{k}": _drop(k) for k in ("step", "exp_avg", "factors", "roots")},
    **{f"missing-{k}": _drop(k) for k in ("root_failures", "skipped_blocks")},
    **{f"missing-{k}": _drop(k) for k in ("graft_v", "momentum_buffer")},
    "fewer-factors": _shorten("factors"),
    "fewer-roots": _shorten("roots"),
    "fewer-root_failures": _shorten("root_failures"),
    "fewer-pending_roots": _shorten("pending_roots"),
    **{f"reshaped-{k}": _reshape_first(k) for k in ("factors", "roots", "exp_avg")},
    **{f"reshaped-{k}": _reshape_first(k) for k in ("graft_v", "momentum_buffer")},
    "reshaped-pending_roots": _reshape_first("pending_roots"),
}
# NG+ keeps no first moment (β₁ = 0: it is the gradient).
TAMPER_CASES = [
    (front, name)
    for front in ("shampoo", "ngplus")
    for name in sorted(TAMPERING)
    if not (front == "ngplus" and "exp_avg" in name)
]


def _assert_refused_and_intact(run: Trained, bad: dict[str, Any]) -> None:
    model, opt = run.copy()
    before = {i: clone_state(s) for i, s in enumerate(opt.state.values())}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    groups = copy.deepcopy(groups)
    with pytest.raises(ValueError) as refused:
        opt.load_state_dict(bad)
    assert "state" in str(refused.value) or "parameter" in str(refused.value), refused.value
    # Nothing changed: the same state, the same groups, and the future of an untouched copy.
    after = {i: clone_state(s) for i, s in enumerate(opt.state.values())}
    assert before.keys() == after.keys()
    for i in before:
        assert_same_state(before[i], after[i])
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    train(model, opt, run.rest)
    opt.close()
    assert_bitwise_equal([p.detach() for p in model.parameters()], run.expected)


@pytest.mark.parametrize(("front", "tampering"), TAMPER_CASES)
def test_a_truncated_or_tampered_state_dict_is_refused_at_load_and_changes_nothing(
    front: str, tampering: str, trained: dict[str, Trained]
) -> None:
    saved = copy.deepcopy(trained[front].checkpoint)
    target = saved["state"][2]
    assert int(target["pending_due"]) >= 0  # the checkpoint is taken with roots in flight
    TAMPERING[tampering](target)
    _assert_refused_and_intact(trained[front], saved)


@FRONTS
def test_a_state_dict_of_another_parameter_layout_is_refused_and_changes_nothing(
    front: str, trained: dict[str, Trained]
) -> None:
    """The same number of parameters, other shapes: (24, 100) and (3, 24) are swapped."""
    saved = copy.deepcopy(trained[front].checkpoint)
    states = saved["state"]
    states[2], states[4] = states[4], states[2]
    _assert_refused_and_intact(trained[front], saved)


def test_the_untampered_checkpoint_loads_and_resumes_bitwise(trained: dict[str, Trained]) -> None:
    """The counterpart: the checkpoint the tests above tamper with is good as it is."""
    for run in trained.values():
        model, opt = run.copy()
        opt.load_state_dict(copy.deepcopy(run.checkpoint))
        train(model, opt, run.rest)
        opt.close()
        assert_bitwise_equal([p.detach() for p in model.parameters()], run.expected)


# ------------------------------------------------------------------------- mixed precision


class Regression(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, 16, dtype=dtype), nn.Tanh(), nn.Linear(16, 2, dtype=dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _regression_data(n: int, dtype: torch.dtype = torch.float32) -> list[Any]:
    gen = torch.Generator().manual_seed(9)
    true = torch.randn(6, 2, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(32, 6, generator=gen)
        out.append((x.to(dtype), torch.tanh(x @ true).to(dtype)))
    return out


@FRONTS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_parameters_train_with_float32_state(front: str, dtype: torch.dtype) -> None:
    model = Regression(dtype)
    data = _regression_data(60, dtype)
    losses = []
    with make_optimizer(front, model.parameters(), lr=0.02, block_size=8) as opt:
        for x, y in data:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert opt.root_stats()["roots_computed"] > 0
        for p in model.parameters():
            assert p.dtype == dtype and torch.isfinite(p).all()
            state = opt.state[p]
            for key in (k for k in (*BLOCKWISE, "factors", "roots") if k in state):
                tensors = state[key] if isinstance(state[key], list) else [state[key]]
                assert all(t.dtype == torch.float32 for t in tensors), key
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), (losses[:10], losses[-10:])


def _autocast_losses(
    front: str, scaler: torch.amp.GradScaler | None, data: list[Any]
) -> tuple[nn.Module, Any]:
    model = Regression(torch.float32)
    opt = make_optimizer(front, model.parameters(), lr=0.02, block_size=8, async_roots=False)
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model, opt


@FRONTS
def test_autocast_with_a_grad_scaler_equals_unscaled_training(front: str) -> None:
    """Scaling by a power of two is exact: the scaler's run is bitwise the unscaled run."""
    data = _regression_data(12)
    plain, _ = _autocast_losses(front, None, data)
    scaled, opt = _autocast_losses(front, torch.amp.GradScaler("cpu", init_scale=2.0**12), data)
    assert opt.root_stats()["roots_computed"] > 0
    assert_bitwise_equal(
        [p.detach() for p in scaled.parameters()], [p.detach() for p in plain.parameters()]
    )


@FRONTS
def test_a_step_with_inf_gradients_is_skipped_by_the_grad_scaler(front: str) -> None:
    data = _regression_data(8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model, opt = _autocast_losses(front, scaler, data[:6])
    params = list(model.parameters())
    states = [clone_state(opt.state[p]) for p in params]
    weights = [p.detach().clone() for p in params]
    scale = scaler.get_scale()

    x, y = data[6]
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    params[0].grad[0, 0] = INF  # an overflow in one gradient entry
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    for p, state, w in zip(params, states, weights):
        assert_same_state(clone_state(opt.state[p]), state)
        assert torch.equal(p, w)

    x, y = data[7]  # and the next finite step is taken
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(params[0], weights[0])
    assert int(opt.state[params[0]]["step"]) == int(states[0]["step"]) + 1
    opt.close()


# -------------------------------------------------------------------------- torch.compile


def _compile_data(n: int) -> list[Any]:
    gen = torch.Generator().manual_seed(8)
    return [
        (torch.randn(16, 8, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(n)
    ]


def _small_net() -> nn.Module:
    """Three parameters of three shapes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3, bias=False))


def _compiled_training(
    backend: str | None,
    compile_step: str | None,
    steps: int,
    after: Callable[[int], None],
    compact_state: bool = False,
    schedule: bool = False,
) -> list[torch.Tensor]:
    model = _small_net()
    forward = model if backend is None else torch.compile(model, backend=backend)
    # ε well above the float32 noise floor: Shampoo's roots amplify rounding differences by
    # up to ε^(-1/4), and inductor's kernels round differently from eager's.
    opt = Shampoo(
        model.parameters(),
        lr=0.02,
        block_size=8,
        precondition_frequency=2,
        epsilon=1e-4,
        async_roots=True,
        root_staleness=1,
        root_workers=1,
        compact_state=compact_state,
    )
    # (the scheduler first: it wraps opt.step, which is then what gets compiled)
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s) if schedule else None
    step = opt.step if compile_step is None else torch.compile(opt.step, backend=compile_step)
    for i, (x, y) in enumerate(_compile_data(steps)):
        opt.zero_grad()
        nn.functional.mse_loss(forward(x), y).backward()
        step()
        if lrs is not None:
            lrs.step()
        after(i)
    opt.close()
    return [p.detach().clone() for p in model.parameters()]


def test_a_compiled_model_trains_like_the_eager_model() -> None:
    """Forward and backward through ``torch.compile`` (AOTAutograd graphs), Shampoo eager.

    "aot_eager" exercises the same AOTAutograd forward/backward graphs as inductor without its
    C++ compile (seconds cold; inductor itself runs once, in the test below)."""
    torch._dynamo.reset()
    eager = _compiled_training(None, None, 6, lambda i: None)
    compiled = _compiled_training("aot_eager", None, 6, lambda i: None)
    torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compact_state", [False, True], ids=["full", "compact"])
def test_a_compiled_step_matches_eager_and_stops_recompiling(compact_state: bool) -> None:
    """``torch.compile(opt.step)`` on a 3-parameter model: after a warm-up of one root cycle
    (the first step, a root step, an install step, a plain step) no step recompiles, the
    recompile limit is never hit (hitting it silently falls back to eager), and the result
    matches eager.

    The compiled update takes the float lr as a 0-d tensor, one rounding more per step: an lr
    1 or 2 ulps off moves these 6 steps by up to 0.037 of the tolerance below (measured with
    torch's AVX-512, AVX2 and default kernels), the compiled step itself by 0.025 (0.25 of a
    tolerance ten times tighter, which left too little room); an lr 1e-4 off, by 6.3."""
    eager = _compiled_training(None, None, 6, lambda i: None, compact_state)
    compiled = without_recompiles(
        lambda after: _compiled_training(None, "eager", 6, after, compact_state)
    )
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_compiled_ngplus_step_stops_recompiling_and_matches_eager() -> None:
    """``torch.compile(opt.step)`` of NG+ (whose statistics make the preconditioning a frame
    of its own): after a warm-up cycle no step recompiles (the step's per-unit results are
    matched by parameter, not by ``id`` of a unit made anew at every step, which dynamo would
    guard on), and the result matches eager."""

    def run(after: Callable[[int], None] | None) -> list[torch.Tensor]:
        model = _small_net()
        opt = make_optimizer("ngplus", model.parameters())
        step = opt.step if after is None else torch.compile(opt.step, backend="eager")
        for i, (x, y) in enumerate(_compile_data(8)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            step()
            if after is not None:
                after(i)
        opt.close()
        return [p.detach().clone() for p in model.parameters()]

    compiled = without_recompiles(run)
    # (the compiled update takes the float lr as a 0-d tensor: one rounding more per step)
    for a, b in zip(compiled, run(None)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_compiled_step_traces_the_math_and_breaks_only_at_the_bookkeeping() -> None:
    """Under ``torch.compile(opt.step)`` the statistics and the parameter updates are traced
    into graphs; the only graph breaks are the eager host bookkeeping (counters, root schedules,
    thread hand-offs, behind ``torch.compiler.disable``); after a warm-up cycle nothing new is
    compiled, although a scheduler changes the float lr at every step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    model = _small_net()
    opt = Shampoo(model.parameters(), lr=0.02, block_size=8, precondition_frequency=2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    step = torch.compile(opt.step, backend=counting_backend)
    compiled = []
    try:
        for x, y in _compile_data(8):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            step()
            schedule.step()
            compiled.append(len(graphs))
    finally:
        opt.close()
        torch._dynamo.reset()
    assert compiled[3:] == [compiled[3]] * 5, compiled
    traced = {str(n.target) for g in graphs for n in g.graph.nodes if n.op.startswith("call_")}
    assert any("baddbmm" in op for op in traced) and any("lerp" in op for op in traced), traced
    # (torch's LR scheduler wraps opt.step in a function dynamo skips: one break of its own)
    breaks = [reason for reason in counters["graph_break"] if "lr_scheduler.py" not in reason]
    assert breaks and all("torch.compiler.disable" in reason for reason in breaks), breaks


def test_a_full_training_step_under_inductor_matches_eager_and_stops_recompiling() -> None:
    """CPU inductor compiles the model and ``opt.step`` (statistics and updates become its
    kernels; roots stay on the pool); after the warm-up cycle nothing recompiles although an
    lr scheduler changes the float lr at every step (inductor specializes the floats traced
    code reads: the bias corrections and the lr come as 0-d tensors made in the eager
    bookkeeping), and the result agrees with eager to float32 tolerance."""
    eager = _compiled_training(None, None, 6, lambda i: None, schedule=True)
    compiled = without_recompiles(
        lambda after: _compiled_training("inductor", "inductor", 6, after, schedule=True)
    )
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ resource hygiene


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@FRONTS
def test_dropping_optimizers_with_roots_in_flight_returns_to_the_baseline_thread_count(
    front: str,
) -> None:
    baseline = settled(threading.active_count)
    for _ in range(100):
        p = nn.Parameter(torch.randn(6, 6))
        opt = make_optimizer(front, [p], root_workers=2, root_staleness=5, async_roots=True)
        for _ in range(4):  # step 4 is a later root step: pending when dropped
            p.grad = torch.randn(6, 6)
            opt.step()
        assert opt.root_stats()["pending_parameters"] == 1
        del opt
    gc.collect()  # (every thread counted: inductor's, from the tests before, may exit meanwhile)
    assert threads_settle_at(baseline, threading.active_count, at_most=True)


def test_thousands_of_tiny_steps_do_not_grow_resident_memory() -> None:
    """5,000 steps, half with inline roots and half with async roots, of one tiny parameter,
    roots every 4 steps (NG+ runs the same engine)."""
    params = [nn.Parameter(torch.randn(3, 4)) for _ in range(2)]
    grad = torch.randn(3, 4)
    opts = [
        Shampoo([p], block_size=4, precondition_frequency=4, async_roots=mode, root_workers=1)
        for p, mode in zip(params, (False, True))
    ]

    def steps(n: int) -> None:
        for _ in range(n):
            for p, opt in zip(params, opts):
                p.grad = grad
                opt.step()

    steps(200)  # warm-up: buffers, caches, allocator arenas
    gc.collect()
    before = _rss_bytes()
    steps(2500)
    gc.collect()
    grown = _rss_bytes() - before
    for opt in opts:
        assert opt.root_stats()["roots_computed"] >= 2 * 2500 // 4  # two factors per root step
        opt.close()
    assert grown < 4 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 5000 steps"


@FRONTS
def test_close_is_idempotent_and_a_later_step_restarts_the_workers(front: str) -> None:
    def workers() -> int:
        return sum(t.name.startswith("torch_shampoo-root") for t in threading.enumerate())

    baseline = settled(workers)
    p = nn.Parameter(torch.randn(5, 5))
    opt = make_optimizer(front, [p], root_workers=2, async_roots=True)
    opt.close()  # before any thread exists
    for _ in range(4):  # (a first cycle's one batch is solved on this thread: a later one's not)
        p.grad = torch.randn(5, 5)
        opt.step()
    assert workers() == baseline + 2
    opt.close()
    opt.close()
    assert threads_settle_at(baseline)
    for _ in range(2):
        p.grad = torch.randn(5, 5)
        opt.step()
    assert workers() == baseline + 2 and opt.root_stats()["roots_computed"] > 0
    with opt:
        pass
    assert threads_settle_at(baseline)
    opt.close()
