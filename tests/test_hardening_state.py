"""Hardening: state-dict tampering and mixed precision (AMP, low-precision parameters), for
Shampoo and NG+; each claim checked against a counterpart that shows it is not vacuous."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hardening_helpers import (
    BLOCKWISE,
    FRONTS,
    INF,
    assert_same_state,
    clone_state,
    make_optimizer,
)
from models import (
    assert_bitwise_equal,
    make_batches,
    mixed_model,
    roundtrip,
    train,
)
from torch import nn

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


def _renumber(key: str) -> Callable[[dict[str, Any]], None]:
    """A per-factor dict keyed 1, 2, … instead of 0, 1, … (as many entries, 0 missing)."""

    def edit(s: dict[str, Any]) -> None:
        value = s[key]
        assert isinstance(value, dict), type(value)
        s[key] = {str(int(k) + 1): v for k, v in value.items()}

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
    **{f"renumbered-{k}": _renumber(k) for k in ("factors", "roots", "pending_roots")},
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
