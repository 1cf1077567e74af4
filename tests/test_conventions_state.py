"""Shampoo as a drop-in torch.optim.Optimizer, its state dict: round trips, loading into another
optimizer, refusals that name what is wrong (conventions as torch's own optimizer tests check
them; sync and async roots where the two could differ)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conventions_helpers import (
    FAST,
    MODES,
    Quadratic,
    assert_same_structure,
    descend,
    fixed,
    snapshot,
)
from models import assert_bitwise_equal, make_batches, mixed_model, roundtrip, train
from torch import nn

from torch_shampoo import SOAP, NGPlus, Shampoo

# ----------------------------------------------------------------------------- state dicts


STATE_CASES = pytest.mark.parametrize(
    ("async_roots", "staleness"),
    [(False, None), (False, 2), (True, 2)],  # async: fixed, see fixed()
    ids=["sync", "sync-stale", "async"],
)


def _mixed_opt(model: nn.Module, async_roots: bool, staleness: int | None, **extra: Any):
    return Shampoo(
        model.parameters() if not extra.pop("named", False) else model.named_parameters(),
        lr=0.01,
        betas=(0.9, 0.99),
        momentum=0.5,
        weight_decay=0.01,
        precondition_frequency=3,
        root_staleness=staleness,
        async_roots=async_roots,
        block_size=16,
        root_workers=1,
        **extra,
    )


@STATE_CASES
def test_a_loaded_clone_continues_bitwise_identically(
    async_roots: bool, staleness: int | None
) -> None:
    batches = make_batches(17)
    model = mixed_model()
    with _mixed_opt(model, async_roots, staleness) as opt:
        train(model, opt, batches[:7])  # roots of step 6 are still pending at step 7
        saved = opt.state_dict()
        loaded = roundtrip(saved)
        clone_model = copy.deepcopy(model)
        with _mixed_opt(clone_model, async_roots, staleness) as clone:
            clone.load_state_dict(loaded)
            assert_same_structure(clone.state_dict(), saved)  # deterministic state dict
            train(model, opt, batches[7:])
            train(clone_model, clone, batches[7:])
        assert opt.root_stats()["roots_computed"] > 0
    assert_bitwise_equal(snapshot(clone_model.parameters()), snapshot(model.parameters()))
    assert not torch.equal(model.fc.weight, mixed_model().fc.weight)


@STATE_CASES
def test_a_state_dict_with_python_number_steps_loads(
    async_roots: bool, staleness: int | None
) -> None:
    """Older checkpoints store ``step`` as a Python number (torch's test_load_nontensor_step)."""
    batches = make_batches(12)
    model = mixed_model()
    with _mixed_opt(model, async_roots, staleness) as opt:
        train(model, opt, batches[:5])
        saved = roundtrip(opt.state_dict())
        for entry in saved["state"].values():
            entry["step"] = float(entry["step"])
        clone_model = copy.deepcopy(model)
        with _mixed_opt(clone_model, async_roots, staleness) as clone:
            clone.load_state_dict(saved)
            train(model, opt, batches[5:])
            train(clone_model, clone, batches[5:])
    assert_bitwise_equal(snapshot(clone_model.parameters()), snapshot(model.parameters()))


def test_python_number_steps_shared_by_every_parameter_each_count_their_own_steps() -> None:
    """A hand-made state dict whose parameters all hold the same Python number as ``step``:
    every parameter still advances by one per step (the counts are per state, not per
    object)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    batches = [(torch.randn(8, 4), torch.randn(8, 4)) for _ in range(4)]

    def run(opt: Shampoo, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for x, y in steps:
            model.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()

    with Shampoo(model.parameters(), block_size=4, async_roots=False) as opt:
        run(opt, batches[:2])
        saved = roundtrip(opt.state_dict())
    shared = float(2)
    for entry in saved["state"].values():
        entry["step"] = shared
    with Shampoo(model.parameters(), block_size=4, async_roots=False) as opt:
        opt.load_state_dict(saved)
        run(opt, batches[2:])
        assert [float(s["step"]) for s in opt.state.values()] == [4.0] * 4


@pytest.mark.parametrize("compact_state", [False, True])
@pytest.mark.parametrize(
    "saved, loaded", [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_a_checkpoint_loads_into_a_model_of_another_float_dtype(
    saved: torch.dtype, loaded: torch.dtype, compact_state: bool
) -> None:
    """As torch.optim casts state to the parameters' dtype on loading, the moments, factors and
    roots take the new model's state dtype (values cast; the step counts unchanged) and training
    goes on, instead of failing at the next step on mixed dtypes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(saved)
    kwargs = dict(block_size=4, precondition_frequency=2, async_roots=False)
    with Shampoo(model.parameters(), compact_state=compact_state, **kwargs) as opt:
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(8, 6, dtype=saved)).square().sum().backward()
            opt.step()
        state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model).to(loaded)
    with Shampoo(twin.parameters(), compact_state=compact_state, **kwargs) as clone:
        clone.load_state_dict(state)
        mine = clone.state_dict()["state"]
        assert mine.keys() == state["state"].keys()
        for index, entry in state["state"].items():
            got = mine[index]
            for key in ("exp_avg", "graft_v"):
                assert got[key].dtype == loaded and torch.equal(got[key], entry[key].to(loaded))
            for key in ("factors", "roots"):
                for j, x in entry[key].items():
                    assert torch.equal(got[key][j], x.to(loaded)), (key, j)
            assert float(got["step"]) == float(entry["step"]) == 3
        twin.zero_grad()
        twin(torch.randn(8, 6, dtype=loaded)).square().sum().backward()
        clone.step()
    assert all(torch.isfinite(p).all() for p in twin.parameters())


@pytest.mark.parametrize(
    ("front", "kwargs"),
    [
        ("shampoo", {"async_roots": False}),
        ("shampoo", {"async_roots": True, "root_staleness": 2}),
        ("shampoo", {"async_roots": False, "compact_state": True}),
        ("shampoo", {"async_roots": True, "root_staleness": 1, "precondition_frequency": 2}),
        ("soap", {"async_roots": True, "root_staleness": 2}),
        ("ngplus", {"async_roots": False}),
        ("ngplus", {"async_roots": True, "root_staleness": 2}),
    ],
    ids=repr,
)
def test_a_model_whose_dtype_changes_during_training_steps_as_if_its_state_were_reloaded(
    front: str, kwargs: dict[str, Any]
) -> None:
    """``model.double()`` after some steps: the optimizer's state follows the parameters'
    dtype (roots in flight included, and the host buffers of later roots) exactly as saving its
    state dict and loading it into a fresh optimizer for the float64 model would, bitwise,
    instead of failing on mixed dtypes."""
    if front != "ngplus":
        kwargs = {"precondition_frequency": 3, **kwargs}
    makers: dict[str, Callable[..., Any]] = {
        "shampoo": lambda ps: Shampoo(ps, lr=0.01, block_size=4, **kwargs),
        "soap": lambda ps: SOAP(ps, lr=0.01, block_size=4, **kwargs),
        "ngplus": lambda ps: NGPlus(ps, lr=0.01, inverse_frequency=3, **kwargs),
    }
    batches = make_batches(10)
    later = [(x.double(), y.double()) for x, y in batches[4:]]
    results = []
    for reloaded in (False, True):
        model = mixed_model()
        opt = makers[front](model.parameters())
        train(model, opt, batches[:4])
        if reloaded:
            saved = copy.deepcopy(opt.state_dict())
            opt.close()
            opt = makers[front](model.double().parameters())
            opt.load_state_dict(saved)
        else:
            model.double()
        train(model, opt, later)
        assert all(
            t.dtype == torch.float64
            for s in opt.state.values()
            for t in (*s.get("factors", []), s.get("exp_avg", torch.zeros((), dtype=torch.float64)))
        )
        opt.close()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b), (a - b).abs().max()


@MODES
def test_named_state_dicts_load_into_named_and_unnamed_optimizers(async_roots: bool) -> None:
    batches = make_batches(10)
    model = mixed_model()
    names = [name for name, _ in model.named_parameters()]
    staleness = 2 if async_roots else None  # (async: fixed, see fixed())
    with _mixed_opt(model, async_roots, staleness, named=True) as opt:
        train(model, opt, batches[:4])
        saved = roundtrip(opt.state_dict())
        assert saved["param_groups"][0]["param_names"] == names
        named_model, plain_model = copy.deepcopy(model), copy.deepcopy(model)
        with (
            _mixed_opt(named_model, async_roots, staleness, named=True) as named,
            _mixed_opt(plain_model, async_roots, staleness) as plain,
        ):
            named.load_state_dict(saved)
            plain.load_state_dict(saved)
            for m, o in ((model, opt), (named_model, named), (plain_model, plain)):
                train(m, o, batches[4:])
            unnamed_saved = roundtrip(plain.state_dict())
            named.load_state_dict(unnamed_saved)  # and an unnamed one into a named optimizer
            assert named.param_groups[0]["param_names"] == names
    expected = snapshot(model.parameters())
    assert_bitwise_equal(snapshot(named_model.parameters()), expected)
    assert_bitwise_equal(snapshot(plain_model.parameters()), expected)


def _float_state_dtypes(state: dict[str, Any]) -> dict[str, set[torch.dtype]]:
    out: dict[str, set[torch.dtype]] = {}
    for key, value in state.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, torch.Tensor) and v.is_floating_point() and key != "step":
                out.setdefault(key, set()).add(v.dtype)
    return out


@MODES
@pytest.mark.parametrize(
    ("dtype", "state_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
    ids=["bf16", "fp16", "fp64"],
)
def test_state_keeps_its_dtype_through_save_and_load(
    async_roots: bool, dtype: torch.dtype, state_dtype: torch.dtype
) -> None:
    f = Quadratic(dtype=dtype)
    w = f.param()
    bias = torch.zeros(20, dtype=dtype, requires_grad=True)
    start = [w.detach().clone(), bias.detach().clone()]

    def loss(w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return f(w) + ((bias - 1) ** 2).mean()

    kwargs = dict(lr=0.02, momentum=0.5, **fixed(async_roots), **FAST)
    with Shampoo([w, bias], **kwargs) as opt:
        descend(opt, [w, bias], lambda: loss(w, bias), 5)
        saved = roundtrip(opt.state_dict())
        w2, b2 = (p.detach().clone().requires_grad_() for p in (w, bias))
        with Shampoo([w2, b2], **kwargs) as clone:
            clone.load_state_dict(saved)
            for p in (w2, b2):
                dtypes = _float_state_dtypes(clone.state[p])
                assert {"exp_avg", "factors", "roots"} <= dtypes.keys()
                assert all(d == {state_dtype} for d in dtypes.values()), dtypes
                assert p.dtype == dtype
            descend(opt, [w, bias], lambda: loss(w, bias), 5)
            descend(clone, [w2, b2], lambda: loss(w2, b2), 5)
        assert opt.root_stats()["roots_computed"] > 0
    assert not torch.equal(w, start[0])
    assert_bitwise_equal([w2.detach(), b2.detach()], [w.detach(), bias.detach()])


def test_mixed_dtypes_in_one_optimizer_keep_their_own_state_dtype() -> None:
    params = [
        torch.randn(6, 20, dtype=dtype, requires_grad=True)
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    ]
    with Shampoo(params, lr=0.01, **FAST) as opt:
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        for p, expected in zip(
            params, (torch.float32, torch.float32, torch.float32, torch.float64)
        ):
            assert all(d == {expected} for d in _float_state_dtypes(opt.state[p]).values())


@MODES
def test_a_parameter_without_gradient_before_saving_can_resume(async_roots: bool) -> None:
    f = Quadratic()
    w, late = f.param(), f.param()
    kwargs = dict(lr=0.05, **fixed(async_roots), **FAST)
    with Shampoo([w, late], **kwargs) as opt:
        descend(opt, [w], lambda: f(w), 5)  # ``late`` never gets a gradient
        saved = roundtrip(opt.state_dict())
        assert len(saved["state"]) == 1
        w2, late2 = (p.detach().clone().requires_grad_() for p in (w, late))
        with Shampoo([w2, late2], **kwargs) as clone:
            clone.load_state_dict(saved)
            descend(opt, [w, late], lambda: f(w) + f(late), 5)
            descend(clone, [w2, late2], lambda: f(w2) + f(late2), 5)
            assert late2 in clone.state
    assert_bitwise_equal([w2.detach(), late2.detach()], [w.detach(), late.detach()])


def _trained_linear(shape: tuple[int, int], block_size: int = 4) -> dict[str, Any]:
    layer = nn.Linear(*shape)
    with Shampoo(layer.parameters(), lr=0.01, block_size=block_size, async_roots=False) as opt:
        layer(torch.randn(5, shape[0])).square().sum().backward()
        opt.step()
        return roundtrip(opt.state_dict())


def test_loading_state_of_another_layout_is_refused() -> None:
    saved = _trained_linear((10, 6))
    layer = nn.Linear(6, 10)
    with (
        Shampoo(layer.parameters(), lr=0.01, block_size=4) as opt,
        pytest.raises(ValueError, match=r"(?i)layout|shape"),
    ):
        opt.load_state_dict(saved)


def test_loading_state_saved_with_another_block_size_is_refused() -> None:
    saved = _trained_linear((10, 6), block_size=4)
    saved["param_groups"][0]["block_size"] = 8  # the factors were blocked with 4
    layer = nn.Linear(10, 6)
    with (
        Shampoo(layer.parameters(), lr=0.01, block_size=8) as opt,
        pytest.raises(ValueError, match="block_size"),
    ):
        opt.load_state_dict(saved)


@MODES
def test_changing_block_size_after_training_started_is_refused(async_roots: bool) -> None:
    f = Quadratic()
    w = f.param()
    with Shampoo([w], lr=0.05, async_roots=async_roots, **FAST) as opt:
        descend(opt, [w], lambda: f(w), 3)
        opt.param_groups[0]["block_size"] = 4
        before = w.detach().clone()
        with pytest.raises(ValueError, match="block_size"):
            descend(opt, [w], lambda: f(w), 1)
    assert torch.equal(w, before)
