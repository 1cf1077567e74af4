"""Checkpoint schema 2: a fixed set of tensor (or string-keyed dict) entries per parameter, so
torch.distributed.checkpoint can save, flatten and load it into a fresh optimizer; the earlier
list layout still loads."""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from models import make_batches, mixed_model, saved_and_loaded, train
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from torch_shampoo import SOAP, NGPlus, Shampoo
from torch_shampoo.checkpoint import SCHEMA

# dcp.save / dcp.load without a process group say once that they run in a single process.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

KWARGS: dict[str, Any] = dict(
    lr=0.01, block_size=16, momentum=0.5, precondition_frequency=4, root_staleness=3
)


def params_after(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def keys_and_shapes(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (keys_and_shapes(v) if isinstance(v, dict) else tuple(v.shape)) for k, v in state.items()
    }


def test_every_entry_exists_from_the_first_step_with_a_fixed_shape() -> None:
    """The keys and shapes of a parameter's saved state are the same with and without roots in
    flight, and hold only tensors and string-keyed dicts of tensors."""
    model = mixed_model()
    with Shampoo(model.parameters(), **KWARGS) as opt:
        train(model, opt, make_batches(1))
        early = opt.state_dict()["state"]
        train(model, opt, make_batches(8))  # step 8: roots in flight until step 11
        late = opt.state_dict()["state"]
    assert all(int(s["pending_due"]) == -1 for s in early.values())
    assert any(int(s["pending_due"]) == 11 for s in late.values())
    for i in early:
        assert keys_and_shapes(early[i]) == keys_and_shapes(late[i])
        assert int(late[i]["schema"]) == SCHEMA
        for value in late[i].values():
            assert isinstance(value, (torch.Tensor, dict)), type(value)


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("front", ["shampoo", "shampoo compact", "ngplus", "soap"])
def test_dcp_save_and_load_into_a_fresh_optimizer_continues_bitwise(
    front: str, flatten: bool
) -> None:
    """get_optimizer_state_dict + dcp.save with roots in flight; a fresh optimizer that has not
    stepped loads it with dcp.load + set_optimizer_state_dict and continues exactly as the
    uninterrupted run."""
    fronts = {
        "shampoo": lambda ps: Shampoo(ps, **KWARGS),
        "shampoo compact": lambda ps: Shampoo(ps, **KWARGS, compact_state=True),
        "ngplus": lambda ps: NGPlus(
            ps, lr=0.02, damping=0.1, inverse_frequency=4, root_staleness=3
        ),
        "soap": lambda ps: SOAP(
            ps, lr=0.01, block_size=16, precondition_frequency=4, root_staleness=3, eigh_every=2
        ),
    }
    make = fronts[front]
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    batches = make_batches(16)
    whole = mixed_model()
    with make(whole.parameters()) as opt:
        train(whole, opt, batches)

    model = mixed_model()
    opt = make(model.parameters())
    train(model, opt, batches[:9])  # roots of step 8 in flight until step 11
    with tempfile.TemporaryDirectory() as folder:
        saved = get_optimizer_state_dict(model, opt, options=options)
        dcp.save({"model": model.state_dict(), "optim": saved}, checkpoint_id=folder)
        opt.close()
        resumed_model = mixed_model(seed=1)
        resumed = make(resumed_model.parameters())
        template = {
            "model": resumed_model.state_dict(),
            "optim": get_optimizer_state_dict(resumed_model, resumed, options=options),
        }
        dcp.load(template, checkpoint_id=folder)
    resumed_model.load_state_dict(template["model"])
    set_optimizer_state_dict(resumed_model, resumed, template["optim"], options=options)
    assert resumed.root_stats()["pending_parameters"] > 0
    train(resumed_model, resumed, batches[9:])
    resumed.close()
    for a, b in zip(params_after(resumed_model), params_after(whole)):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_dcp_keeps_the_step_counts_of_equal_shape_parameters_that_share_one_tensor(
    flatten: bool,
) -> None:
    """Three Linear(4, 4) layers: their weights' (and biases') step counts are rows of one
    tensor; DCP saves and loads them (roots in flight) and training continues bitwise."""

    def three_layers(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))

    def run(model: torch.nn.Module, opt: Shampoo, inputs: list[torch.Tensor]) -> None:
        for x in inputs:
            model.zero_grad()
            model(x).square().sum().backward()
            opt.step()

    kwargs: dict[str, Any] = dict(lr=0.02, block_size=4, precondition_frequency=4, root_staleness=3)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(8, 4, generator=gen) for _ in range(14)]
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    whole = three_layers(0)
    with Shampoo(whole.parameters(), **kwargs) as opt:
        run(whole, opt, inputs)
    model = three_layers(0)
    with Shampoo(model.parameters(), **kwargs) as opt, tempfile.TemporaryDirectory() as folder:
        run(model, opt, inputs[:9])
        steps = [opt.state[p]["step"] for p in model.parameters()]
        assert steps[0].untyped_storage().data_ptr() == steps[2].untyped_storage().data_ptr()
        saved = get_optimizer_state_dict(model, opt, options=options)
        dcp.save({"optim": saved}, checkpoint_id=folder)
        resumed_model = three_layers(1)
        resumed_model.load_state_dict(model.state_dict())
        resumed = Shampoo(resumed_model.parameters(), **kwargs)
        template = {"optim": get_optimizer_state_dict(resumed_model, resumed, options=options)}
        dcp.load(template, checkpoint_id=folder)
    set_optimizer_state_dict(resumed_model, resumed, template["optim"], options=options)
    assert [int(resumed.state[p]["step"]) for p in resumed_model.parameters()] == [9] * 6
    assert resumed.root_stats()["pending_parameters"] > 0
    run(resumed_model, resumed, inputs[9:])
    resumed.close()
    for a, b in zip(params_after(resumed_model), params_after(whole)):
        assert torch.equal(a, b), (a - b).abs().max()


def _as_earlier_layout(saved: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 rewritten in the layout of the previous release: lists, no schema, pending
    entries only while in flight, reasons as strings."""
    out = {}
    for i, s in saved["state"].items():
        s = dict(s)
        s.pop("schema")
        for key in ("factors", "roots", "pending_roots"):
            s[key] = [s[key][str(j)] for j in range(len(s[key]))]
        if int(s["pending_due"]) < 0:
            for key in ("pending_due", "pending_submitted", "pending_ok", "pending_roots"):
                s.pop(key)
        else:
            s["pending_reasons"] = ["" for _ in s["pending_roots"]]
        out[i] = s
    return {"state": out, "param_groups": saved["param_groups"]}


def test_a_checkpoint_of_the_earlier_layout_loads_and_continues_bitwise() -> None:
    batches = make_batches(16)
    whole = mixed_model()
    with Shampoo(whole.parameters(), **KWARGS) as opt:
        train(whole, opt, batches)
    model = mixed_model()
    with Shampoo(model.parameters(), **KWARGS) as opt:
        train(model, opt, batches[:9])
        checkpoint = saved_and_loaded(model, opt)
    earlier = _as_earlier_layout(checkpoint["opt"])
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    with Shampoo(resumed_model.parameters(), **KWARGS) as resumed:
        resumed.load_state_dict(earlier)
        train(resumed_model, resumed, batches[9:])
    for a, b in zip(params_after(resumed_model), params_after(whole)):
        assert torch.equal(a, b)


def test_an_unknown_schema_is_refused_naming_it() -> None:
    model = mixed_model()
    with Shampoo(model.parameters(), **KWARGS) as opt:
        train(model, opt, make_batches(2))
        saved = opt.state_dict()
        saved["state"][0] = {**saved["state"][0], "schema": torch.tensor(SCHEMA + 1)}
        with pytest.raises(ValueError, match=f"schema {SCHEMA + 1}"):
            opt.load_state_dict(saved)


@pytest.mark.parametrize("kind", [Shampoo, SOAP, NGPlus])
def test_a_param_group_without_a_setting_is_refused_naming_it(kind: type) -> None:
    """A saved group that lacks a setting (or Adam's groups) would replace this optimizer's
    groups and fail at a later step with a KeyError: it is refused on loading, naming what is
    missing, and the optimizer goes on as it was."""
    batches = make_batches(4)
    kwargs = dict(lr=0.01, block_size=16, root_staleness=1)  # (not "auto": timed)
    model, twin = mixed_model(), mixed_model()
    with kind(model.parameters(), **kwargs) as opt, kind(twin.parameters(), **kwargs) as other:
        train(model, opt, batches[:2])
        train(twin, other, batches[:2])
        saved = opt.state_dict()
        del saved["param_groups"][0]["block_size"]
        with pytest.raises(ValueError, match=r"param group 0 lacks \['block_size'\]"):
            opt.load_state_dict(saved)
        adam = torch.optim.Adam(mixed_model().parameters())
        with pytest.raises(ValueError, match=r"lacks .*'max_root_failures'"):
            opt.load_state_dict(adam.state_dict())
        train(model, opt, batches[2:])
        train(twin, other, batches[2:])
    for a, b in zip(params_after(model), params_after(twin)):
        assert torch.equal(a, b)


def test_a_checkpoint_saved_before_merge_dims_keeps_its_merged_layout_and_continues_bitwise() -> (
    None
):
    """Before ``merge_dims`` (2026-12-06) a tensor of ≤ block_size elements merged into one dim
    (a 4×4 weight at block 16: one 16² factor). A state dict without the setting loads into a
    default optimizer (which would give that weight two 4² factors) as ``merge_dims="all"`` and
    continues bitwise as the run it was saved from."""
    batches = make_batches(10)
    kwargs: dict[str, Any] = dict(
        lr=0.01, block_size=16, precondition_frequency=3, root_staleness=2
    )

    def small() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))

    def train_small(model: torch.nn.Module, opt: torch.optim.Optimizer, part: list[Any]) -> None:
        for x, _ in part:
            opt.zero_grad()
            model(x.flatten(1)[:, :4]).square().mean().backward()
            opt.step()

    whole = small()
    with Shampoo(whole.parameters(), **kwargs, merge_dims="all") as opt:
        train_small(whole, opt, batches)
        assert [tuple(f.shape) for f in opt.state[whole[0].weight]["factors"]] == [(16, 16)]
    model = small()
    with Shampoo(model.parameters(), **kwargs, merge_dims="all") as opt:
        train_small(model, opt, batches[:5])
        saved = saved_and_loaded(model, opt)
    for group in saved["opt"]["param_groups"]:
        del group["merge_dims"], group["precondition_1d"]  # as saved before they existed
    resumed_model = small()
    resumed_model.load_state_dict(saved["model"])
    with Shampoo(resumed_model.parameters(), **kwargs, precondition_1d=False) as resumed:
        assert resumed.param_groups[0]["merge_dims"] is True  # the default: (4, 4)
        resumed.load_state_dict(saved["opt"])
        assert resumed.param_groups[0]["merge_dims"] == "all"
        assert resumed.param_groups[0]["precondition_1d"] is True  # the biases' factors
        train_small(resumed_model, resumed, batches[5:])
    for a, b in zip(params_after(resumed_model), params_after(whole)):
        assert torch.equal(a, b)
