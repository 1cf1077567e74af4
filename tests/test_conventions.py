"""Shampoo as a drop-in torch.optim.Optimizer: the conventions torch's own optimizer tests check.
Here the constructor, the direction and the object protocol; lr, param groups, no-op
conditions and hooks: test_conventions_step.py; state dicts: test_conventions_state.py.

Every behavioural test runs with roots computed inside ``step()`` (``async_roots=False``) and on
CPU worker threads (``async_roots=True``) when the two paths could differ. Small blocks and short
precondition frequencies make sure the preconditioner is really in use within a few steps.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

import pytest
import torch
from conventions_helpers import FAST, INF, MODES, NAN, Quadratic, descend, fixed, snapshot
from models import assert_bitwise_equal
from torch import nn

from torch_shampoo import NGPlus, Shampoo

# --------------------------------------------------------------------------- constructor


BAD_VALUES: list[tuple[str, Any]] = [
    ("lr", -0.1),
    ("lr", NAN),
    ("lr", INF),
    ("lr", "0.1"),
    ("lr", torch.tensor(-1.0)),
    ("betas", (1.0, 0.99)),
    ("betas", (0.9, 1.5)),
    ("betas", (-0.1, 0.99)),
    ("betas", (0.9, 0.0)),
    ("betas", (0.9,)),
    ("betas", (0.9, 0.99, 0.999)),
    ("betas", (NAN, 0.99)),
    ("betas", 0.9),
    ("epsilon", -1e-8),
    ("epsilon", NAN),
    ("weight_decay", -0.01),
    ("weight_decay", NAN),
    ("momentum", 1.0),
    ("momentum", 1.5),
    ("momentum", -0.1),
    ("momentum", NAN),
    ("block_size", 0),
    ("block_size", -16),
    ("block_size", 16.0),
    ("max_factor_dim", 0),
    ("precondition_frequency", 2.5),
    ("precondition_frequency", 0),
    ("precondition_frequency", "2"),
    ("start_preconditioning_step", 0),
    ("start_preconditioning_step", 1.5),
    ("grafting_beta2", 1.0),
    ("grafting_beta2", NAN),
    ("grafting_epsilon", 0.0),
    ("grafting_epsilon", NAN),
    ("root_exponent", 0.0),
    ("root_exponent", -2),
    ("root_exponent", NAN),
    ("root_staleness", -1),
    ("max_root_failures", 0),
    ("decoupled_weight_decay", "False"),
    ("nesterov", "True"),
    ("bias_correction", "yes"),
    ("maximize", "no"),
    ("maximize", 1),
]
"""Hyperparameters that may differ per group, each with a value that must be refused."""

CONSTRUCTOR_ONLY: list[tuple[str, Any]] = [
    ("async_roots", "True"),
    ("async_roots", 1),
    ("root_workers", 0),
    ("root_workers", -1),
    ("root_workers", 1.5),
]


def _ids(cases: list[tuple[str, Any]]) -> list[str]:
    return [f"{name}={value!r}" for name, value in cases]


def assert_names(error: BaseException, name: str, value: Any) -> None:
    message = str(error)
    assert name in message, message
    assert repr(value) in message, message


@pytest.mark.parametrize(
    ("name", "value"), BAD_VALUES + CONSTRUCTOR_ONLY, ids=_ids(BAD_VALUES + CONSTRUCTOR_ONLY)
)
def test_bad_constructor_argument_is_refused_with_its_name_and_value(name: str, value: Any) -> None:
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises((ValueError, TypeError)) as info:
        Shampoo([p], **{name: value})
    assert_names(info.value, name, value)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=_ids(BAD_VALUES))
def test_bad_value_in_a_param_group_is_refused_with_its_name_and_value(
    name: str, value: Any
) -> None:
    p = torch.zeros(4, 4, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    with pytest.raises((ValueError, TypeError)) as info:
        Shampoo([{"params": [q]}, {"params": [p], name: value}], lr=0.01)
    assert_names(info.value, name, value)

    with Shampoo([q], lr=0.01) as opt, pytest.raises((ValueError, TypeError)) as info:
        opt.add_param_group({"params": [p], name: value})
    assert_names(info.value, name, value)


@pytest.mark.parametrize(
    ("extra", "dtype"),
    [
        ({"lr": -1.0}, torch.float32),
        ({"momentum": 2.0}, torch.float32),
        ({}, torch.complex64),
    ],
    ids=["negative-lr", "momentum-2", "complex"],
)
def test_a_rejected_param_group_is_not_added(extra: dict[str, Any], dtype: torch.dtype) -> None:
    """After add_param_group raises, the optimizer is as before: a later step() must not use
    the group that was refused (e.g. ascend with a negative lr)."""
    p = torch.zeros(4, 4, requires_grad=True)
    q = torch.zeros(3, dtype=dtype, requires_grad=True)
    with Shampoo([p], lr=0.01) as opt:
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [q], **extra})
        assert len(opt.param_groups) == 1
        assert all(r is not q for g in opt.param_groups for r in g["params"])


def test_nesterov_needs_momentum() -> None:
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="nesterov") as info:
        Shampoo([p], nesterov=True, momentum=0.0)
    assert "momentum" in str(info.value)
    Shampoo([p], nesterov=True, momentum=0.9).close()


@pytest.mark.parametrize(
    ("name", "value", "choices"),
    [
        ("grafting", "adamw", ("adam", "adagrad", "rmsprop", "sgd", "none")),
        ("root_method", "svd", ("eigh", "newton", "cholesky")),
    ],
)
def test_unknown_choice_lists_the_valid_choices(
    name: str, value: str, choices: tuple[str, ...]
) -> None:
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError) as info:
        Shampoo([p], **{name: value})
    assert_names(info.value, name, value)
    listed = str(info.value).replace(repr(value), "")
    for choice in choices:
        assert re.search(rf"\b{choice}\b", listed), listed
    for choice in choices:  # every listed choice is indeed accepted
        kwargs = {"root_exponent": 1} if choice == "cholesky" else {}
        Shampoo([p], **{name: choice}, **kwargs).close()


@pytest.mark.parametrize("exponent", [None, 2, 0.5])
def test_cholesky_needs_root_exponent_one(exponent: float | None) -> None:
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError) as info:
        Shampoo([p], root_method="cholesky", root_exponent=exponent)
    assert "cholesky" in str(info.value) and "root_exponent" in str(info.value)


def test_cholesky_with_root_exponent_one_steps() -> None:
    f = Quadratic()
    w = f.param()
    with Shampoo([w], lr=0.05, root_method="cholesky", root_exponent=1, **FAST) as opt:
        losses = descend(opt, [w], lambda: f(w), 6)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameters_are_refused(dtype: torch.dtype) -> None:
    p = torch.zeros(4, 4, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError, match="complex"):
        Shampoo([p])
    with Shampoo([torch.zeros(3, requires_grad=True)]) as opt, pytest.raises(ValueError):
        opt.add_param_group({"params": [p]})


def test_integer_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="int64"):
        Shampoo([torch.zeros(4, dtype=torch.int64)])


def test_unknown_keyword_arguments_are_a_type_error() -> None:
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(TypeError, match="learning_rate"):
        Shampoo([p], learning_rate=0.1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="beta1"):
        Shampoo([p], beta1=0.9)  # type: ignore[call-arg]


def test_an_unknown_keyword_argument_names_what_was_probably_meant() -> None:
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(TypeError, match=r"'eps'.*'epsilon'.*'grafting_epsilon'"):
        Shampoo([p], eps=1e-8)
    with pytest.raises(TypeError, match=r"'momentun'.*did you mean 'momentum'"):
        Shampoo([p], momentun=0.9)
    with pytest.raises(TypeError, match=r"'max_preconditioner_dim'.*'block_size'"):
        Shampoo([p], max_preconditioner_dim=512)
    with pytest.raises(TypeError, match=r"'eps'.*'damping'"):
        NGPlus([p], eps=1e-3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'$"):
        Shampoo([p], zzz=1)


# ------------------------------------------------------------------------------- direction


@MODES
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("scheduler", ["StepLR", "ReduceLROnPlateau"])
def test_goes_downhill_on_a_convex_quadratic_with_a_scheduler(
    async_roots: bool, transposed: bool, scheduler: str
) -> None:
    f = Quadratic()
    w = f.param(transposed)
    bias = torch.zeros(20, requires_grad=True)
    assert w.is_contiguous() != transposed

    def loss() -> torch.Tensor:
        return f(w) + 0.5 * ((bias - 1.0) ** 2).sum()

    with Shampoo([w, bias], lr=0.1, **fixed(async_roots), **FAST) as opt:
        if scheduler == "StepLR":
            sched: Any = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        else:
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            value = loss()
            value.backward()
            opt.step()
            losses.append(value.item())
            sched.step(value.item()) if scheduler == "ReduceLROnPlateau" else sched.step()
        assert opt.root_stats()["roots_computed"] > 0
    assert w.is_contiguous() != transposed  # still the same (non-)contiguous leaf
    assert loss().item() < 0.25 * losses[0]
    assert sum(b < a for a, b in itertools.pairwise(losses)) > 20  # mostly monotone
    if scheduler == "StepLR":
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


@MODES
def test_maximize_f_equals_minimizing_minus_f(async_roots: bool) -> None:
    kwargs = dict(
        lr=0.05,
        momentum=0.5,
        nesterov=True,
        weight_decay=0.01,
        decoupled_weight_decay=False,
        **fixed(async_roots),
        **FAST,
    )
    f = Quadratic()
    start = f.param().detach()

    w_max = start.clone().requires_grad_()
    with Shampoo([w_max], maximize=True, **kwargs) as opt:
        descend(opt, [w_max], lambda: -f(w_max), 10)  # −(½‖XW − Y‖²) is maximized

    w_min = start.clone().requires_grad_()
    with Shampoo([w_min], **kwargs) as opt:
        descend(opt, [w_min], lambda: f(w_min), 10)

    assert not torch.equal(w_min, start)
    assert torch.equal(w_max, w_min)
    assert f(w_min) < f(start)


# ------------------------------------------------------------------------- object protocol


@MODES
def test_deepcopy_keeps_public_attributes_and_continues_identically(async_roots: bool) -> None:
    f = Quadratic()
    w = f.param()
    kwargs = dict(betas=(0.8, 0.95), precondition_frequency=3, block_size=16, root_workers=1)
    with Shampoo([w], lr=0.05, **fixed(async_roots), **kwargs) as opt:
        descend(opt, [w], lambda: f(w), 4)  # with async roots, those of step 3 are in flight
        twin = copy.deepcopy(opt)
        try:
            public = {k for k in vars(opt) if not k.startswith("_")}
            assert public == {k for k in vars(twin) if not k.startswith("_")}
            assert all(twin.defaults[k] == v for k, v in opt.defaults.items())
            for group, twin_group in zip(opt.param_groups, twin.param_groups):
                assert {k: v for k, v in group.items() if k != "params"} == {
                    k: v for k, v in twin_group.items() if k != "params"
                }
            (w2,) = twin.param_groups[0]["params"]
            assert w2 is not w and torch.equal(w2, w)
            descend(opt, [w], lambda: f(w), 6)
            descend(twin, [w2], lambda: f(w2), 6)
        finally:
            twin.close()
    assert torch.equal(w2, w)


def test_repr_names_the_optimizer_and_its_hyperparameters() -> None:
    p = torch.zeros(4, 4, requires_grad=True)
    with Shampoo([p], lr=0.0123, block_size=16, precondition_frequency=3) as opt:
        text = repr(opt)
    assert text.startswith("Shampoo")
    for fragment in ("lr: 0.0123", "block_size: 16", "precondition_frequency: 3", "betas"):
        assert fragment in text, text


def test_betas_are_in_the_defaults_and_every_group() -> None:
    p, q = torch.zeros(4, 4, requires_grad=True), torch.zeros(3, requires_grad=True)
    with Shampoo([{"params": [p]}, {"params": [q], "betas": (0.5, 0.9)}], betas=(0.8, 0.99)) as o:
        assert o.defaults["betas"] == (0.8, 0.99)
        assert [g["betas"] for g in o.param_groups] == [(0.8, 0.99), (0.5, 0.9)]


@MODES
def test_step_with_closure_returns_its_loss_and_steps(async_roots: bool) -> None:
    f = Quadratic()
    w = f.param()
    before = w.detach().clone()
    calls = []
    with Shampoo([w], lr=0.05, async_roots=async_roots, **FAST) as opt:

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = f(w)
            loss.backward()
            calls.append(loss)
            return loss

        returned = opt.step(closure)
        assert returned is calls[0]
        assert len(calls) == 1
        assert not torch.equal(w, before)
        assert opt.step() is None


@MODES
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"maximize": True},
        {"weight_decay": 0.1, "decoupled_weight_decay": False},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ],
    ids=["plain", "maximize", "coupled-wd", "nesterov-decoupled-wd"],
)
def test_step_never_modifies_the_gradient(async_roots: bool, extra: dict[str, Any]) -> None:
    params = [
        torch.randn(6, 20, requires_grad=True),
        torch.randn(20, dtype=torch.float64, requires_grad=True),
        torch.randn(4, 5, dtype=torch.bfloat16, requires_grad=True),
    ]
    with Shampoo(params, lr=0.05, async_roots=async_roots, **FAST, **extra) as opt:
        for _ in range(5):
            for p in params:
                p.grad = torch.randn_like(p)
            grads = snapshot(p.grad for p in params)
            opt.step()
            assert_bitwise_equal(snapshot(p.grad for p in params), grads)


def test_sparse_gradients_are_refused() -> None:
    embedding = nn.Embedding(10, 4, sparse=True)
    before = embedding.weight.detach().clone()
    with Shampoo(embedding.parameters(), **FAST) as opt:
        embedding(torch.tensor([1, 2, 3])).sum().backward()
        assert embedding.weight.grad.is_sparse
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
    assert torch.equal(embedding.weight, before)
