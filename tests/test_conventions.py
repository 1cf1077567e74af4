"""Shampoo as a drop-in torch.optim.Optimizer: the conventions torch's own optimizer tests check.

Every behavioural test runs with roots computed inside ``step()`` (``async_roots=False``) and on
CPU worker threads (``async_roots=True``) when the two paths could differ. Small blocks and short
precondition frequencies make sure the preconditioner is really in use within a few steps.
"""

from __future__ import annotations

import copy
import io
import itertools
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from models import assert_bitwise_equal, make_batches, mixed_model, train
from torch import nn

from torch_shampoo import SOAP, NGPlus, Shampoo

FAST: dict[str, Any] = dict(block_size=16, precondition_frequency=2, root_workers=1)
MODES = pytest.mark.parametrize("async_roots", [False, True], ids=["sync", "async"])

NAN = float("nan")
INF = float("inf")


def fixed(async_roots: bool) -> dict[str, Any]:
    """``async_roots`` with a fixed staleness: "auto" fits itself to this machine's timings
    (and grows after a stall), so two runs compared with each other, or a run and its clone,
    could install their roots at different steps on a slower or busier machine."""
    return dict(async_roots=async_roots, root_staleness=1 if async_roots else 0)


# ----------------------------------------------------------------------------------- helpers


class Quadratic:
    """f(W) = ½·mean((X W − Y)²): convex in W, with W of shape (6, 20) cut into two blocks."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 6, generator=gen).to(dtype)
        self.y = self.x @ torch.randn(6, 20, generator=gen).to(dtype)
        self.gen = gen
        self.dtype = dtype

    def param(self, transposed: bool = False) -> torch.Tensor:
        """A fresh leaf W; ``transposed`` gives a non-contiguous (transposed view) leaf."""
        if transposed:
            return torch.randn(20, 6, generator=self.gen).to(self.dtype).t().requires_grad_()
        return torch.randn(6, 20, generator=self.gen).to(self.dtype).requires_grad_()

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.x @ w - self.y) ** 2).mean()


def descend(
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
) -> list[float]:
    """``steps`` optimizer steps on ``loss_fn``; returns the loss before each step."""
    losses = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def roundtrip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def snapshot(params: Iterator[torch.Tensor] | list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def assert_same_structure(a: Any, b: Any, where: str = "") -> None:
    """Recursively equal: tensors bitwise (same dtype), everything else with ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_structure(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_structure(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


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
