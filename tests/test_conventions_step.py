"""Shampoo as a drop-in torch.optim.Optimizer, its step: lr and param groups, the conditions under
which a step changes nothing, and the optimizer hooks (conventions as torch's own optimizer
tests check them; sync and async roots where the two could differ)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conventions_helpers import FAST, MODES, Quadratic, descend, fixed, snapshot
from models import assert_bitwise_equal, mixed_model

from torch_shampoo import Shampoo

# -------------------------------------------------------------------------- lr and groups


@MODES
def test_tensor_lr_follows_the_float_lr_trajectory(async_roots: bool) -> None:
    f = Quadratic()
    start = f.param().detach()
    final = []
    for lr in (0.05, torch.tensor(0.05)):
        w = start.clone().requires_grad_()
        # The two lr forms round differently (1 ulp). With the default ε = 1e-12 the rank-deficient
        # right factor of this 6×20 gradient amplifies any such difference ~1e3× (a float lr of
        # 0.05·(1 + 1e-7) deviates just as much), so a moderate ε keeps "allclose" meaningful.
        with Shampoo([w], lr=lr, momentum=0.5, epsilon=1e-3, **fixed(async_roots), **FAST) as opt:
            descend(opt, [w], lambda w=w: f(w), 10)
            assert isinstance(opt.param_groups[0]["lr"], type(lr))
        final.append(w.detach())
    assert not torch.equal(final[0], start)
    # Even with that ε these 10 steps follow the lr closely: a float lr 2 to 4 ulps off moved
    # them by up to 0.45 of rtol 1e-5 (torch's default kernels; 0.31 with AVX2 or AVX-512),
    # the tensor lr by 0.22, which left a CPU whose roundings fall less kindly little room. An
    # lr 1e-5 off still moves them by 2.7 times the tolerance here.
    torch.testing.assert_close(final[1], final[0], rtol=5e-5, atol=5e-6)


def test_one_cycle_lr_cycles_lr_and_beta1() -> None:
    f = Quadratic()
    w = f.param()
    with Shampoo([w], lr=0.01, betas=(0.9, 0.99), **FAST) as opt:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=20, cycle_momentum=True
        )
        lrs, beta1s, losses = [], [], []
        for _ in range(20):
            lrs.append(opt.param_groups[0]["lr"])
            beta1s.append(opt.param_groups[0]["betas"][0])
            losses += descend(opt, [w], lambda: f(w), 1)
            sched.step()
        assert opt.param_groups[0]["betas"][1] == 0.99
    assert max(lrs) > 10 * min(lrs)
    assert max(beta1s) > min(beta1s)
    assert losses[-1] < losses[0]


def test_cyclic_lr_without_momentum_cycling_changes_lr_only() -> None:
    f = Quadratic()
    w = f.param()
    with Shampoo([w], lr=0.01, betas=(0.9, 0.99), **FAST) as opt:
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=0.001, max_lr=0.05, step_size_up=5, cycle_momentum=False
        )
        lrs = []
        for _ in range(12):
            lrs.append(opt.param_groups[0]["lr"])
            descend(opt, [w], lambda: f(w), 1)
            sched.step()
        assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert lrs[0] == pytest.approx(0.001)
    assert max(lrs) == pytest.approx(0.05)
    assert lrs[10] == pytest.approx(0.001)  # one full cycle later


@MODES
def test_per_group_lr_and_weight_decay_are_honoured(async_roots: bool) -> None:
    f = Quadratic()
    start = f.param().detach()
    frozen, plain, decayed = (start.clone().requires_grad_() for _ in range(3))
    groups = [
        {"params": [frozen], "lr": 0.0, "weight_decay": 0.5},
        {"params": [plain]},
        {"params": [decayed], "weight_decay": 0.5},
    ]
    with Shampoo(groups, lr=0.05, async_roots=async_roots, **FAST) as opt:
        descend(opt, [frozen, plain, decayed], lambda: f(frozen) + f(plain) + f(decayed), 8)
        assert len(opt.state) == 3  # the frozen group did step, with lr 0
    assert torch.equal(frozen, start)
    assert not torch.equal(plain, start)
    assert not torch.equal(decayed, plain)
    assert decayed.norm() < plain.norm()


# ------------------------------------------------------------------------ no-op conditions


@MODES
def test_step_without_gradients_is_a_no_op(async_roots: bool) -> None:
    model = mixed_model()
    before = snapshot(model.parameters())
    with Shampoo(model.parameters(), async_roots=async_roots, **FAST) as opt:
        for _ in range(3):
            opt.step()
        assert len(opt.state) == 0
    assert_bitwise_equal(snapshot(model.parameters()), before)


@MODES
def test_parameters_without_gradient_are_skipped(async_roots: bool) -> None:
    f = Quadratic()
    w, idle = f.param(), f.param()
    idle_before = idle.detach().clone()
    w_before = w.detach().clone()
    with Shampoo([idle, w], lr=0.05, async_roots=async_roots, **FAST) as opt:
        descend(opt, [w], lambda: f(w), 6)
        assert idle.grad is None
        assert idle not in opt.state
        assert w in opt.state
    assert torch.equal(idle, idle_before)
    assert not torch.equal(w, w_before)


@MODES
@pytest.mark.parametrize("grafting", ["adam", "sgd", "none"])
def test_zero_gradients_leave_parameters_unchanged(async_roots: bool, grafting: str) -> None:
    model = mixed_model()
    before = snapshot(model.parameters())
    with Shampoo(
        model.parameters(),
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        grafting=grafting,
        async_roots=async_roots,
        **FAST,
    ) as opt:
        for _ in range(7):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
        assert opt.root_stats()["roots_computed"] > 0
        assert all(int(opt.state[p]["step"]) == 7 for p in model.parameters())
    assert_bitwise_equal(snapshot(model.parameters()), before)


# ---------------------------------------------------------------------------------- hooks


def test_state_dict_pre_and_post_hooks_are_called() -> None:
    p = torch.randn(6, 20, requires_grad=True)
    p.grad = torch.randn(6, 20)
    with Shampoo([p], **FAST) as opt:
        opt.step()
        calls: list[str] = []

        def pre(optimizer: torch.optim.Optimizer) -> None:
            assert optimizer is opt
            calls.append("pre")

        def post(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
            calls.append("post")
            assert 0 in state_dict["state"]
            return {**state_dict, "marker": True}

        opt.register_state_dict_pre_hook(pre)
        opt.register_state_dict_post_hook(post)
        saved = opt.state_dict()
    assert calls == ["pre", "post"]
    assert saved["marker"] is True


def test_load_state_dict_pre_hooks_edit_or_replace_the_param_groups() -> None:
    p = torch.randn(6, 20, requires_grad=True)
    with Shampoo([p], lr=0.001, **FAST) as opt:
        saved = opt.state_dict()

        def edit(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
            state_dict["param_groups"][0]["lr"] = 0.002

        def replace(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict:
            assert state_dict["param_groups"][0]["lr"] == 0.002  # runs after ``edit``
            new = copy.deepcopy(state_dict)
            new["param_groups"][0]["lr"] = 0.003
            return new

        calls: list[float] = []
        opt.register_load_state_dict_pre_hook(edit)
        opt.register_load_state_dict_pre_hook(replace)
        opt.register_load_state_dict_post_hook(
            lambda optimizer: calls.append(optimizer.param_groups[0]["lr"])
        )
        opt.load_state_dict(saved)
        assert opt.param_groups[0]["lr"] == 0.003
    assert calls == [0.003]


def test_a_state_dict_returned_by_a_load_pre_hook_provides_the_state() -> None:
    """torch: "If a state_dict is returned, it will be used to be loaded into the optimizer"
    — the per-parameter state included, not only the param_groups."""
    p = torch.randn(6, 20, requires_grad=True)
    p.grad = torch.randn(6, 20)
    with Shampoo([p], **FAST) as opt:
        opt.step()
        saved = opt.state_dict()
        replacement = copy.deepcopy(saved)
        replacement["state"][0]["exp_avg"].fill_(7.0)
        opt.register_load_state_dict_pre_hook(lambda optimizer, state_dict: replacement)
        opt.load_state_dict(saved)
        assert torch.equal(opt.state[p]["exp_avg"], torch.full((6, 20), 7.0))


def test_load_state_dict_post_hook_sees_the_loaded_state() -> None:
    """A post hook runs after the load is complete: it sees float32 moments of a bf16
    parameter, exactly as the next step() will."""
    p = torch.randn(6, 20, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.randn(6, 20, dtype=torch.bfloat16)
    with Shampoo([p], **FAST) as opt:
        opt.step()
        saved = opt.state_dict()
        seen: list[torch.dtype] = []
        opt.register_load_state_dict_post_hook(
            lambda optimizer: seen.append(optimizer.state[p]["exp_avg"].dtype)
        )
        opt.load_state_dict(saved)
        assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert seen == [torch.float32]


def test_load_state_dict_post_hook_may_record_in_optimizer_state() -> None:
    """torch's test_load_state_dict_pre_hook_and_prepend: the post hook writes non-parameter
    keys into ``optimizer.state``; loading must not trip over them."""
    p = torch.randn(6, 20, requires_grad=True)
    p.grad = torch.randn(6, 20)
    with Shampoo([p], **FAST) as opt:
        opt.step()
        saved = opt.state_dict()

        def post(optimizer: torch.optim.Optimizer) -> None:
            optimizer.state["ran_load_state_dict_post_hook"] = True

        opt.register_load_state_dict_post_hook(post)
        opt.load_state_dict(saved)
        assert opt.state["ran_load_state_dict_post_hook"] is True
        assert torch.equal(opt.state[p]["exp_avg"], saved["state"][0]["exp_avg"])


@MODES
def test_step_hooks_run_once_per_step_and_are_removable(async_roots: bool) -> None:
    f = Quadratic()
    w = f.param()
    calls: list[tuple[str, int]] = []
    with Shampoo([w], lr=0.05, async_roots=async_roots, **FAST) as opt:

        def pre(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            assert optimizer is opt
            calls.append(("pre", int(opt.state[w]["step"]) if w in opt.state else 0))

        def post(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            calls.append(("post", int(opt.state[w]["step"])))

        pre_handle = opt.register_step_pre_hook(pre)
        post_handle = opt.register_step_post_hook(post)
        descend(opt, [w], lambda: f(w), 3)
        assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2), ("pre", 2), ("post", 3)]
        pre_handle.remove()
        post_handle.remove()
        descend(opt, [w], lambda: f(w), 2)
        assert int(opt.state[w]["step"]) == 5
    assert len(calls) == 6
