"""``optimizer.plan()``: what it says the state will hold is what the first step makes (bytes by
kind, buckets, factor sizes, measured independently over ``opt.state``), its host staging is the
most ``root_stats()`` reports while later roots run, calling it changes no run, its root work
and staleness follow the constants and a hand computation, and its table names every parameter."""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from models import MixedShapes, assert_bitwise_equal, make_batches, mixed_model, train
from torch import nn

from torch_shampoo import SOAP, NGPlus, Shampoo
from torch_shampoo.roots import costs
from torch_shampoo.telemetry import held_bytes

KEYS = {"factors": ("factors",), "roots": ("roots",), "graft": ("graft_v",),
        "moments": ("exp_avg", "momentum_buffer")}  # fmt: skip


@pytest.fixture(autouse=True)
def fake_eigh(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """No timing in these tests (one that needs it asks for ``real_eigh``): d µs per factor."""
    calls: dict[str, Any] = {"threads": []}

    def seconds(sizes: Iterable[int], threads: int) -> dict[int, float]:
        calls["threads"].append(threads)
        return {d: d * 1e-6 for d in sizes}

    monkeypatch.setattr(costs, "eigh_seconds", seconds)
    return calls


Make = Callable[[nn.Module], torch.optim.Optimizer]


def per_sample(model: nn.Module, **kwargs: Any) -> NGPlus:
    with warnings.catch_warnings():  # (MixedShapes' own parameter takes minibatch statistics)
        warnings.filterwarnings("ignore", "NGPlus: no per-sample statistics")
        return NGPlus(model.parameters(), statistics="per_sample", model=model, **kwargs)


def two_groups(model: nn.Module) -> Shampoo:
    convs = [p for n, p in model.named_parameters() if n.startswith("conv")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("conv")]
    return Shampoo([{"params": convs, "block_size": 4}, {"params": rest}], block_size=16)


CASES: dict[str, Make] = {
    "shampoo sync, block 16 (edge blocks)": lambda m: Shampoo(
        m.parameters(), block_size=16, async_roots=False
    ),
    "shampoo async, block 8, momentum, no first moment": lambda m: Shampoo(
        m.parameters(), block_size=8, momentum=0.9, betas=(0.0, 0.999)
    ),
    "shampoo compact state, block 16": lambda m: Shampoo(
        m.parameters(), block_size=16, compact_state=True
    ),
    "shampoo one-sided, no 1-D factors, sgd graft": lambda m: Shampoo(
        m.parameters(), block_size=64, max_factor_dim=20, precondition_1d=False, grafting="sgd"
    ),
    "shampoo bfloat16 state, block 16": lambda m: Shampoo(
        m.parameters(), block_size=16, state_dtype=torch.bfloat16
    ),
    "shampoo bfloat16 compact state, momentum": lambda m: Shampoo(
        m.parameters(), block_size=16, state_dtype=torch.bfloat16, compact_state=True, momentum=0.9
    ),
    "soap bfloat16 state": lambda m: SOAP(
        m.parameters(), block_size=16, state_dtype=torch.bfloat16
    ),
    "shampoo two groups": two_groups,
    "shampoo warm roots (bases kept), block 16": lambda m: Shampoo(
        m.parameters(), block_size=16, eigh_every=5, async_roots=False
    ),
    "soap": lambda m: SOAP(m.parameters(), block_size=16),
    "ngplus minibatch": lambda m: NGPlus(m.parameters(), block_size=16),
    "ngplus per-sample (biases follow)": per_sample,
}


def measured(opt: torch.optim.Optimizer, compact: bool) -> dict[str, int]:
    """Bytes by kind of ``opt.state``: each kind's tensors (storages once), ``other`` the rest;
    compact state's factors and roots share storage, so they are measured together."""
    states = list(opt.state.values())
    found = {kind: held_bytes([s[k] for s in states for k in keys if k in s])
             for kind, keys in KEYS.items()}  # fmt: skip
    if compact:
        found["factors"] = found["roots"] = 0
        found["factors+roots"] = held_bytes([[s["factors"], s["roots"]] for s in states])
    found["other"] = held_bytes(opt.state) - sum(found.values())
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_the_planned_bytes_buckets_and_factors_are_those_of_the_first_step(
    case: str, dtype: torch.dtype
) -> None:
    model = mixed_model(dtype=dtype)
    with CASES[case](model) as opt:
        plan = opt.plan(model=model, show=False)  # type: ignore[attr-defined]
        assert not opt.state
        train(model, opt, make_batches(1, dtype=dtype))
        compact = bool(getattr(opt, "_compact_state", False))
        held = measured(opt, compact)
        planned = {k: v for k, v in plan.bytes.items() if k != "staging"}
        if compact:
            planned["factors+roots"] = planned.pop("factors") + planned.pop("roots")
            planned["factors"] = planned["roots"] = 0
        assert planned == held
        assert plan.state_bytes == held_bytes(opt.state) == opt.root_stats()["state_bytes"]
        params = [p for g in opt.param_groups for p in g["params"]]
        buckets = {id(b): i for i, b in enumerate(opt._buckets)}  # type: ignore[attr-defined]
        assert len(plan.buckets) == len(buckets)
        for row, p in zip(plan.rows, params, strict=True):
            placed = [buckets[id(b)] for b in opt._buckets for m in b.members if m.p is p]
            assert row.buckets == placed, row.name
            assert row.factor_sizes == [f.shape[0] for f in opt.state[p]["factors"]], row.name
        for planned_bucket, bucket in zip(plan.buckets, opt._buckets):
            assert (planned_bucket.block_shape, planned_bucket.blocks) == (
                bucket.block_shape, bucket.size)  # fmt: skip


STAGED: dict[str, tuple[Make, bool]] = {
    "shampoo async": (lambda m: Shampoo(m.parameters(), block_size=16, precondition_frequency=2,
                                        start_preconditioning_step=1, stagger_roots=False), True),
    "shampoo sync, staleness 1": (lambda m: Shampoo(
        m.parameters(), block_size=16, precondition_frequency=2, start_preconditioning_step=1,
        async_roots=False, root_staleness=1), True),
    "shampoo sync (roots in place)": (lambda m: Shampoo(
        m.parameters(), block_size=16, precondition_frequency=2, start_preconditioning_step=1,
        async_roots=False), False),
    "shampoo async, compact": (lambda m: Shampoo(
        m.parameters(), block_size=16, precondition_frequency=2, start_preconditioning_step=1,
        compact_state=True, stagger_roots=False), True),
    "shampoo async, bfloat16 state": (lambda m: Shampoo(
        m.parameters(), block_size=16, precondition_frequency=2, start_preconditioning_step=1,
        state_dtype=torch.bfloat16, stagger_roots=False), True),
    "soap async, eigh every root step": (lambda m: SOAP(
        m.parameters(), block_size=16, precondition_frequency=2, eigh_every=1,
        stagger_roots=False), True),
    "ngplus per-sample async": (lambda m: per_sample(m, inverse_frequency=2,
                                                     stagger_roots=False), True),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STAGED))
def test_the_planned_staging_is_the_most_host_memory_a_later_root_cycle_holds(case: str) -> None:
    """Right after a later cycle's snapshots (step 6: frequency 2) every factor holds two host
    buffers (snapshot and result): the plan's staging; at no step more (a snapshot is given
    back once solved, both buffers after the install: test_root_schedule.py)."""
    make, staged = STAGED[case]
    model = mixed_model()
    with make(model) as opt:
        plan = opt.plan(show=False)  # type: ignore[attr-defined]
        train(model, opt, make_batches(1))
        assert opt.root_stats()["host_buffer_bytes"] == 0  # first roots: in place on the CPU
        held = []
        for batch in make_batches(6, seed=1):  # steps 2 to 7
            train(model, opt, [batch])
            held.append(opt.root_stats()["host_buffer_bytes"])
        assert opt.root_stats()["roots_computed"] > 0
        assert held[4] == max(held) == plan.bytes["staging"]
        assert (plan.bytes["staging"] > 0) == staged


def weights_and_state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    found = [p.detach() for p in model.parameters()]
    for state in opt.state.values():
        for value in state.values():
            values = value if isinstance(value, list) else [value]
            found += [v for v in values if isinstance(v, torch.Tensor)]
    return found


@pytest.mark.parametrize("make", [  # (staleness fixed: "auto" fits it from timings, not bitwise)
    lambda m: Shampoo(m.parameters(), block_size=16, precondition_frequency=2,
                      start_preconditioning_step=1, root_staleness=1),
    lambda m: SOAP(m.parameters(), block_size=16, precondition_frequency=2, root_staleness=1),
    lambda m: per_sample(m, root_staleness=1),
], ids=["shampoo", "soap", "ngplus"])  # fmt: skip
def test_a_plan_before_training_leaves_the_run_bitwise_unchanged(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the real timing: at a worker's thread count (1), then 2 again
    monkeypatch.setattr(costs, "_MEASURED", {})
    runs = []
    for planned in (False, True):
        torch.set_num_threads(2)
        model = mixed_model(seed=3)
        with make(model) as opt:
            if planned:
                threads = torch.get_num_threads()
                opt.plan(show=False)  # type: ignore[attr-defined]
                assert torch.get_num_threads() == threads
                assert not opt.state and opt._buckets is None  # type: ignore[attr-defined]
                assert opt._roots.pool is None  # type: ignore[attr-defined]  (no thread)
            noise = torch.randn(3)  # (plan() drew no random number: the next draw is the same)
            losses = train(model, opt, make_batches(6, seed=2))
            runs.append((losses, noise, weights_and_state(model, opt)))
    assert runs[0][0] == runs[1][0]
    assert_bitwise_equal([runs[0][1], *runs[0][2]], [runs[1][1], *runs[1][2]])


def test_the_table_names_every_parameter_and_the_dict_is_json() -> None:
    model = mixed_model()
    names = [n for n, _ in model.named_parameters()]
    with Shampoo(model.parameters(), block_size=16) as opt:
        out = io.StringIO()
        text = str(opt.plan(model=model, file=out))
        assert out.getvalue() == text + "\n"
        for name in names:
            assert sum(line.split()[1] == name for line in text.splitlines()[2:]) == 1, name
        assert "24=16+8 × 100=6×16+4" in text  # fc.weight: edge blocks on both dims
        unnamed = str(opt.plan(show=False)).splitlines()
        assert [line.split()[:2] for line in unnamed[2:10]] == [[str(i)] * 2 for i in range(8)]
        plain = json.loads(json.dumps(opt.plan(model=model, show=False).as_dict()))
        assert [row["name"] for row in plain["rows"]] == names
        assert plain["totals"]["state_bytes"] == sum(plain["totals"]["bytes"].values()) - (
            plain["totals"]["bytes"]["staging"])  # fmt: skip


def test_named_groups_and_parameters_left_out() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # never a gradient: no state, not planned
    with Shampoo(model.named_parameters()) as opt:
        rows = opt.plan(show=False).rows
    assert [(r.index, r.name) for r in rows] == [(0, "0.weight"), (1, "0.bias"), (2, "1.weight")]


def test_state_and_adam_ratio_by_hand() -> None:
    """Linear(4, 3) at the defaults: weight 3 × 4 (factors 3² and 4²), bias 3 (factor 3²)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    adam.step()
    adam_moments = sum(s[k].nbytes for s in adam.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert adam_moments == 2 * 15 * 4 == 120
    with Shampoo(model.parameters()) as opt:
        plan = opt.plan(show=False)
    factors = (9 + 16 + 9) * 4
    # step 4; per factor root_failures 8, has_root 1, pending_ok 1; skipped_blocks, schema,
    # pending_due, pending_submitted 8 each
    other = (4 + 2 * 8 + 2 + 8 * 4 + 2) + (4 + 8 + 1 + 8 * 4 + 1)
    assert plan.bytes == {"factors": factors, "roots": factors, "graft": 60, "moments": 60,
                          "other": other, "staging": 2 * factors}  # fmt: skip
    assert plan.adam_bytes == adam_moments
    assert plan.adam_ratio == (2 * factors + 120 + other) / 120
    assert f"= {plan.adam_ratio:.2f}× Adam's 120 B" in str(plan)


def test_root_work_and_the_staleness_it_implies(fake_eigh: dict[str, Any]) -> None:
    """eigh roots of 3², 4², 3² factors: 11d³ flops each; seconds: the fake's d µs times 11/9;
    two workers share a cycle; auto staleness: ⌈2 × cycle / step⌉, at most the frequency."""
    model = nn.Linear(4, 3)
    with Shampoo(model.parameters(), root_workers=2, precondition_frequency=10,
                 stagger_roots=False, async_roots=True) as opt:  # fmt: skip
        plan = opt.plan(show=False)
        assert fake_eigh["threads"] == [opt._roots.threads()]  # type: ignore[attr-defined]
        assert plan.root_flops == 11 * (27 + 64 + 27)
        one_worker = (3 + 4 + 3) * 1e-6 * 11 / 9
        assert plan.cycle_seconds == pytest.approx(one_worker / 2)
        assert plan.staleness == [None] and plan.cycle_steps is None
        assert "no step time" in str(plan)
        step = one_worker / 2 / 3.5  # a cycle lasts 3.5 steps: 7 with the margin
        plan = opt.plan(step_seconds=step, show=False)
        assert plan.cycle_steps == pytest.approx(3.5)
        assert (plan.staleness, plan.step_source) == ([7], "given")
        assert "later roots used 7 steps late" in str(plan)
        assert opt.plan(step_seconds=step / 10, show=False).staleness == [10]  # the frequency
        wait = "steps will wait"
        assert wait in str(opt.plan(step_seconds=step / 10, show=False))
        assert wait not in str(plan)
        train(model, opt, [(torch.randn(5, 4), torch.randn(5, 3))] * 4)
        plan = opt.plan(show=False)
        assert plan.step_source == "measured"
        assert plan.step_seconds == opt._roots.fit.step_seconds()  # type: ignore[attr-defined]
    with Shampoo(model.parameters(), async_roots=False) as opt:
        assert opt.plan(step_seconds=1.0, show=False).staleness == [0]
    with Shampoo(model.parameters(), root_staleness=3) as opt:
        assert opt.plan(step_seconds=1.0, show=False).staleness == [3]


def test_flops_per_method() -> None:
    assert costs.root_flops(10, "eigh", 4) == 11_000
    assert costs.root_flops(10, "eigh", 4, eigenbasis=True) == 9_000
    assert costs.root_flops(10, "cholesky", 1) == 1_000
    # T^4 by squaring: 2 products, then M and H: 4 per iteration, of 2d³ each
    assert costs.root_flops(10, "newton", 4) == costs.NEWTON_ITERATIONS * 4 * 2_000
    assert costs.root_flops(10, "newton", 3) == costs.NEWTON_ITERATIONS * 4 * 2_000  # T²·T


def test_ngplus_followers_take_no_root_work() -> None:
    model = mixed_model()
    with per_sample(model) as opt:
        plan = opt.plan(model=model, show=False)
    rows = {r.name: r for r in plan.rows}
    assert rows["fc.bias"].leader == rows["fc.weight"].index
    assert rows["fc.bias"].root_flops == rows["fc.bias"].bytes["staging"] == 0
    assert rows["fc.bias"].bytes["factors"] > 0  # its own copy of the weight's roots' factors
    assert f"#{rows['fc.weight'].index}'s" in str(plan)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "0.1", True])
def test_a_bad_step_time_is_refused_by_name(bad: Any) -> None:
    opt = Shampoo(nn.Linear(2, 2).parameters())
    with opt, pytest.raises(ValueError, match=re.escape(f"Invalid step_seconds: {bad!r} (")):
        opt.plan(step_seconds=bad, show=False)


def test_eigh_is_timed_once_per_size_and_scaled_past_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.undo()
    timed: list[tuple[int, int]] = []

    def fake(d: int, threads: int) -> float:
        timed.append((d, threads))
        return d * 1e-6

    monkeypatch.setattr(costs, "_time_eigh", fake)
    monkeypatch.setattr(costs, "_MEASURED", {})
    assert costs.eigh_seconds([4, 8], 1) == {4: 4e-6, 8: 8e-6}
    assert costs.eigh_seconds([8, 4], 1) == {4: 4e-6, 8: 8e-6} and timed == [(4, 1), (8, 1)]
    big = costs.MEASURED_UP_TO * 2
    assert costs.eigh_seconds([big], 1)[big] == pytest.approx(costs.MEASURED_UP_TO * 1e-6 * 8)
    monkeypatch.setattr(costs, "BUDGET_SECONDS", 0.0)  # the first size only, the rest scaled
    assert costs.eigh_seconds([16, 32], 2) == {16: 16e-6, 32: 16e-6 * 8}
    assert timed[-1] == (16, 2)


def test_a_real_timing_of_small_sizes_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    monkeypatch.setattr(costs, "_MEASURED", {})
    found = costs.eigh_seconds([8, 64], 1)
    assert 0 < found[8] < found[64] < 0.1
    model = MixedShapes()
    with Shampoo(model.parameters(), block_size=16) as opt:
        assert opt.plan(show=False).cycle_seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_planned_staging_is_held_from_the_first_root_cycle() -> None:
    """(Not run on the CPU-only machine this was written on.) CUDA factors go through host
    buffers from their first root, synchronous or not."""
    model = mixed_model().cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(1)]
    with Shampoo(model.parameters(), block_size=16, start_preconditioning_step=1,
                 async_roots=False) as opt:  # fmt: skip
        plan = opt.plan(show=False)
        train(model, opt, batches)
        assert opt.root_stats()["host_buffer_bytes"] == plan.bytes["staging"] > 0
        assert held_bytes(opt.state) == plan.state_bytes
