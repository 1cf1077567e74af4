"""NG+ as a torch optimizer: async roots equal sync ones, bad values refused by name, schedulers,
param groups, closures, maximize, state dicts, DDP and checkpoints from before a rule changed."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import assert_bitwise_equal, make_batches, mixed_model, roundtrip, train
from ngplus_reference import (
    F64,
    PAPER,
    SYNC,
    data,
    gradients,
    leaves,
    mean_loss_step,
    mlp,
    random_grads,
    snapshot,
    step_with,
)
from torch import Tensor, nn

from torch_shampoo import NGPlus
from torch_shampoo.ngplus import EARLIER_RULE


def ngplus_run(
    steps: int, make: Callable[[], nn.Module] | None = None, **kwargs: Any
) -> list[Tensor]:
    model = mixed_model() if make is None else make()
    extra = {"model": model} if kwargs.get("statistics") == "per_sample" else {}
    base = dict(lr=0.02, block_size=16, damping=0.01, momentum=0.5)
    with NGPlus(model.parameters(), **{**base, **kwargs}, **extra) as opt:
        train(model, opt, make_batches(steps))
    return snapshot(model.parameters())


def cnn32() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(100, 3))


@pytest.mark.parametrize(
    ("frequency", "staleness", "statistics"),
    [(1, 1, "minibatch"), (4, 3, "minibatch"), (4, 2, "per_sample")],
)
def test_async_roots_equal_sync_roots_with_the_same_staleness(
    frequency: int, staleness: int, statistics: str
) -> None:
    make = cnn32 if statistics == "per_sample" else None
    common = dict(inverse_frequency=frequency, root_staleness=staleness, statistics=statistics,
                  stagger_roots=True)  # (async's default; sync then repeats it)
    asynchronous = ngplus_run(30, make, async_roots=True, **common)
    synchronous = ngplus_run(30, make, async_roots=False, **common)
    assert_bitwise_equal(asynchronous, synchronous)
    # Not vacuous: without the delay the trajectory is different.
    fresh = ngplus_run(30, make, async_roots=False, **{**common, "root_staleness": 0})
    assert any(not torch.equal(a, b) for a, b in zip(fresh, synchronous))


# -------------------------------------------------------------------------- drop-in conventions

BAD_VALUES: list[tuple[str, Any, type[Exception]]] = [
    ("lr", -0.1, ValueError),
    ("lr", "fast", TypeError),
    ("momentum", 1.0, ValueError),
    ("momentum", -0.5, ValueError),
    ("weight_decay", -1e-4, ValueError),
    ("damping", 0.0, ValueError),
    ("damping", -1e-3, ValueError),
    ("damping", float("nan"), ValueError),
    ("curvature_beta", 1.0, ValueError),
    ("curvature_beta", -0.1, ValueError),
    ("inverse_frequency", 0, ValueError),
    ("inverse_frequency", 2.5, TypeError),
    ("block_size", 0, ValueError),
    ("nesterov", "yes", TypeError),
    ("root_staleness", -1, ValueError),
    ("max_root_failures", 0, ValueError),
    ("relative_damping", "yes", TypeError),
    ("bias_correction", 1, TypeError),
    ("grafting", "lamb", ValueError),
    ("grafting_beta2", 1.0, ValueError),
    ("grafting_epsilon", -1e-8, ValueError),
]
GOOD_VALUES: dict[str, Any] = dict(
    lr=0.1,
    momentum=0.0,
    weight_decay=0.0,
    damping=1e-6,
    curvature_beta=0.0,
    inverse_frequency=1,
    block_size=1,
    nesterov=False,
    root_staleness=0,
    max_root_failures=1,
    relative_damping=False,
    bias_correction=False,
    grafting="none",
    grafting_beta2=0.0,
    grafting_epsilon=1e-30,
)


@pytest.mark.parametrize(
    ("name", "value", "error"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES]
)
def test_a_bad_hyperparameter_is_refused_naming_it_and_its_value(
    name: str, value: Any, error: type[Exception]
) -> None:
    p = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(error, match=rf"{name}.*{re.escape(repr(value))}"):
        NGPlus([p], **{name: value})
    q = torch.zeros(3, requires_grad=True)
    with NGPlus([q]) as opt, pytest.raises(error, match=rf"{name}.*{re.escape(repr(value))}"):
        opt.add_param_group({"params": [p], name: value})
    # The same argument with a valid value is accepted.
    NGPlus([p], **{name: GOOD_VALUES[name]}).close()


@pytest.mark.parametrize(
    ("name", "choices"),
    [("statistics", ("minibatch", "per_sample")), ("root_method", ("eigh", "newton", "cholesky"))],
)
def test_an_unknown_choice_lists_the_valid_ones(name: str, choices: tuple[str, ...]) -> None:
    p = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=rf"{name}.*'bogus'") as info:
        NGPlus([p], **{name: "bogus"})
    assert all(choice in str(info.value) for choice in choices)
    for choice in choices:
        NGPlus([p], **{name: choice}).close()


def test_without_momentum_nesterov_changes_nothing() -> None:
    """Nesterov is the default; momentum=0 alone then gives the plain step (no error)."""
    shapes = [(6, 4), (5,)]
    runs = []
    for nesterov in (True, False):
        params = leaves(shapes)
        with NGPlus(params, momentum=0.0, nesterov=nesterov, inverse_frequency=2, **SYNC) as opt:
            for grads in random_grads(shapes, 4):
                step_with(opt, params, grads)
        runs.append(snapshot(params))
    assert_bitwise_equal(runs[0], runs[1])
    assert not torch.equal(runs[0][0], leaves(shapes)[0])


@pytest.mark.parametrize("split", [5, 6])
def test_state_dict_round_trip_continues_bitwise(split: int) -> None:
    """Saved with a root in flight (split 5: the root of step 4 is due at 7) or not."""
    kwargs: dict[str, Any] = dict(
        lr=0.02, block_size=16, inverse_frequency=4, root_staleness=3, damping=0.1
    )
    batches = make_batches(14)
    model = mixed_model()
    with NGPlus(model.parameters(), **kwargs) as opt:
        train(model, opt, batches)
    uninterrupted = snapshot(model.parameters())

    model = mixed_model()
    with NGPlus(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:split])
        checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    with NGPlus(resumed_model.parameters(), **{**kwargs, "damping": 0.5}) as resumed:
        resumed.load_state_dict(checkpoint["opt"])
        assert resumed.param_groups[0]["damping"] == 0.1  # the saved float wins
        train(resumed_model, resumed, batches[split:])
    assert_bitwise_equal(snapshot(resumed_model.parameters()), uninterrupted)


def test_step_lr_is_honoured() -> None:
    model = mixed_model()
    batches = make_batches(6)
    with NGPlus(model.parameters(), lr=0.02, block_size=16, inverse_frequency=2) as opt:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.0)
        start = snapshot(model.parameters())
        train(model, opt, batches[:3], after_step=lambda i: sched.step())
        assert opt.param_groups[0]["lr"] == 0.0
        moved = snapshot(model.parameters())
        train(model, opt, batches[3:], after_step=lambda i: sched.step())
    assert all(not torch.equal(a, b) for a, b in zip(start, moved))
    assert_bitwise_equal(snapshot(model.parameters()), moved)


def test_one_cycle_lr_cycles_lr_and_momentum() -> None:
    model = mixed_model()
    lrs, momenta = [], []
    kwargs: dict[str, Any] = dict(lr=0.002, damping=0.1, block_size=16, inverse_frequency=2)
    with NGPlus(model.parameters(), **kwargs) as opt:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.02, total_steps=12, base_momentum=0.8, max_momentum=0.95
        )

        def record(i: int) -> None:
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
            momenta.append(opt.param_groups[0]["momentum"])

        losses = train(model, opt, make_batches(11), after_step=record)
    assert max(lrs) > 10 * min(lrs)
    assert 0.8 <= min(momenta) < max(momenta) <= 0.95
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(loss == loss for loss in losses)


def test_param_groups_use_their_own_hyperparameters() -> None:
    shapes = [(6, 4), (5,), (3, 2, 2, 2)]
    defaults: dict[str, Any] = dict(lr=0.5, momentum=0.5, damping=1.0, **SYNC)
    settings: list[dict[str, Any]] = [
        dict(lr=0.1, damping=0.01, momentum=0.9, nesterov=True),
        dict(lr=0.03, momentum=0.0, weight_decay=0.1, inverse_frequency=2, block_size=2),
    ]
    together = leaves(shapes)
    apart = [p.detach().clone().requires_grad_() for p in together]
    groups = [
        {"params": together[:2], **settings[0]},
        {"params": together[2:], **settings[1]},
    ]
    combined = NGPlus(groups, **defaults)
    separate = [
        NGPlus(apart[:2], **{**defaults, **settings[0]}),
        NGPlus(apart[2:], **{**defaults, **settings[1]}),
    ]
    for grads in random_grads(shapes, 5):
        step_with(combined, together, grads)
        step_with(separate[0], apart[:2], grads[:2])
        step_with(separate[1], apart[2:], grads[2:])
    for opt in [combined, *separate]:
        opt.close()
    assert_bitwise_equal(snapshot(together), snapshot(apart))
    assert combined.param_groups[1]["block_size"] == 2
    assert len(combined.state[together[2]]["factors"]) == 2  # 3 outputs in blocks of 2


def test_closure_returns_its_loss() -> None:
    model = mixed_model()
    x, y = make_batches(1)[0]
    before = snapshot(model.parameters())
    with NGPlus(model.parameters(), lr=0.02) as opt:
        calls: list[Tensor] = []

        def closure() -> Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            calls.append(loss)
            return loss

        assert opt.step(closure) is calls[0]
        assert len(calls) == 1
        assert opt.step() is None
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "extra",
    [{}, {"maximize": True}, {"weight_decay": 0.1, "nesterov": True}],
    ids=["plain", "maximize", "nesterov-wd"],
)
def test_step_never_modifies_the_gradient(extra: dict[str, Any]) -> None:
    shapes = [(6, 4), (6,), (), (3, 2, 2, 2)]
    params = leaves(shapes, dtype=torch.float32)
    with NGPlus(params, inverse_frequency=1, **extra) as opt:
        for grads in random_grads(shapes, 4):
            for p, g in zip(params, grads):
                p.grad = g.float()
            kept = gradients(params)
            opt.step()
            assert_bitwise_equal(gradients(params), kept)


def test_maximize_equals_minimizing_the_negated_objective() -> None:
    shapes = [(6, 4), (6,)]
    up, down = leaves(shapes), leaves(shapes)
    with (
        NGPlus(up, maximize=True, inverse_frequency=2, **SYNC) as ascend,
        NGPlus(down, inverse_frequency=2, **SYNC) as descend,
    ):
        for grads in random_grads(shapes, 5):
            step_with(ascend, up, grads)
            step_with(descend, down, [-g for g in grads])
    assert_bitwise_equal(snapshot(up), snapshot(down))


@pytest.mark.parametrize("statistics", ["minibatch", "per_sample"])
def test_training_a_small_model_reduces_the_loss(statistics: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
    teacher = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 5, generator=gen) for _ in range(40)]
    extra = {"model": model} if statistics == "per_sample" else {}
    with NGPlus(
        model.parameters(),
        lr=0.02,
        damping=0.1,
        inverse_frequency=5,
        statistics=statistics,
        **extra,
    ) as opt:
        losses = []
        for x in xs:
            with torch.no_grad():
                y = teacher(x)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-5:]) < 0.1 * sum(losses[:5])


# ------------------------------------------------------------------------ multi-process training

DDP_STEPS, DDP_BATCH = 4, 6


def _ddp_batches() -> list[tuple[Tensor, Tensor]]:
    return [data((4,), DDP_BATCH, seed) for seed in range(DDP_STEPS)]


def _ddp_run(rank: int, store: str, out: str, statistics: str) -> None:
    """NG+ on a DDP-wrapped MLP in a 2-process gloo group, each rank on its half of every
    batch; saves the rank's final parameters to ``out``.rank."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = DistributedDataParallel(mlp())
    hooked = model if statistics == "per_sample" else None
    kwargs: dict[str, Any] = dict(lr=0.05, inverse_frequency=2, root_staleness=1,
                                  stagger_roots=False)  # (auto: off under several processes)
    with NGPlus(model.parameters(), statistics=statistics, model=hooked, **kwargs) as opt:
        half = DDP_BATCH // 2
        for x, y in _ddp_batches():
            lo = rank * half
            mean_loss_step(model, opt, x[lo : lo + half], y[lo : lo + half])
    torch.save([p.detach() for p in model.module.parameters()], f"{out}.{rank}")
    dist.destroy_process_group()
    os._exit(0)  # gloo's atexit teardown sometimes aborts spawned processes


@pytest.mark.parametrize("statistics", ["per_sample", "minibatch"])
def test_under_ddp_ranks_agree_and_equal_one_process_on_the_combined_batch(
    statistics: str, tmp_path: Path
) -> None:
    """Each rank's hooks see only its own samples; NG+ sums the per-sample statistics over the
    processes, so both ranks build the global batch's F: they stay bitwise identical and equal
    one process that sees every sample (gradients averaged by DDP, F summed by NG+)."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path / "params")
    mp.spawn(_ddp_run, args=(str(tmp_path / "store"), out, statistics), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    assert_bitwise_equal(ranks[0], ranks[1])
    model = mlp()
    hooked = {"model": model} if statistics == "per_sample" else {}
    kwargs: dict[str, Any] = dict(lr=0.05, inverse_frequency=2, root_staleness=1,
                                  stagger_roots=False)  # (auto: off under several processes)
    with NGPlus(model.parameters(), statistics=statistics, **hooked, **kwargs) as opt:
        for x, y in _ddp_batches():
            mean_loss_step(model, opt, x, y)
    for a, b in zip(ranks[0], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-12)
    # Not vacuous: the ranks' own halves give different statistics than the whole batch.
    assert not torch.equal(ranks[0][0], mlp().get_parameter("0.weight").detach())


def test_a_checkpoint_from_before_the_step_size_settings_continues_with_its_own_rule() -> None:
    """A checkpoint of the release before relative damping and the graft has no such keys in
    its groups (and an exp_avg per parameter): it loads into today's defaults and continues
    bitwise as the paper's rule it was trained with, not as the new defaults."""
    batches = make_batches(8)
    kwargs: dict[str, Any] = dict(lr=0.02, block_size=16, inverse_frequency=2, **SYNC)
    model = mixed_model()
    with NGPlus(model.parameters(), **kwargs, **PAPER) as opt:
        train(model, opt, batches)
    uninterrupted = snapshot(model.parameters())

    model = mixed_model()
    with NGPlus(model.parameters(), **kwargs, **PAPER) as opt:
        train(model, opt, batches[:4])
        old = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    for group in old["opt"]["param_groups"]:
        for key in EARLIER_RULE:
            del group[key]
    for i, p in enumerate(model.parameters()):
        old["opt"]["state"][i]["exp_avg"] = torch.zeros_like(p)
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(old["model"])
    with NGPlus(resumed_model.parameters(), **kwargs) as resumed:  # today's defaults
        resumed.load_state_dict(old["opt"])
        assert {k: resumed.param_groups[0][k] for k in EARLIER_RULE} == EARLIER_RULE
        train(resumed_model, resumed, batches[4:])
    assert_bitwise_equal(snapshot(resumed_model.parameters()), uninterrupted)


def test_with_per_sample_statistics_only_a_hooked_layers_bias_gets_a_factor() -> None:
    """A hooked layer's bias is W̃'s last column and shares its F; a vector the hooks do not
    see (a LayerNorm's scale and shift) has no Fisher estimate and takes the grafted gradient,
    exactly as with minibatch statistics."""

    def net(frozen: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
        for layer in (model[0], model[3]):
            layer.requires_grad_(not frozen)
        return model.to(F64)

    for frozen in (False, True):
        model, twin = net(frozen), net(frozen)
        params = [p for p in model.parameters() if p.requires_grad]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the LayerNorm has no per-sample statistics
            per_sample = NGPlus(params, statistics="per_sample", model=model, **SYNC)
        minibatch = NGPlus([p for p in twin.parameters() if p.requires_grad], **SYNC)
        with per_sample, minibatch:
            for seed in range(4):
                x, y = data((4,), 5, seed)
                mean_loss_step(model, per_sample, x, y)
                mean_loss_step(twin, minibatch, x, y)
            norm = model[1]
            assert all(per_sample.state[p]["factors"] == [] for p in norm.parameters())
            if not frozen:
                assert per_sample.state[model[0].bias]["factors"]  # shares the layer's F
            else:  # only the LayerNorm trains: its steps are the minibatch optimizer's
                for p, q in zip(norm.parameters(), twin[1].parameters()):
                    assert torch.equal(p, q)
                assert not torch.equal(norm.weight, torch.ones(6, dtype=F64))
