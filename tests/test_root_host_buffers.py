"""Roots after close() and the host buffers of roots in flight: held only from a snapshot to its
install, reused within a step, kept for a failed step's retry; root_stats' state bytes and the
installed factors' indices."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import (
    assert_bitwise_equal,
    make_batches,
    mixed_model,
    per_matrix,
    train,
)
from root_schedule_helpers import BASE, _never, params_after

import torch_shampoo.roots.pool as root_pool
from torch_shampoo import Shampoo
from torch_shampoo.root_cycles import _as_index


def test_state_dict_after_close_computes_the_cancelled_roots_itself() -> None:
    batches = make_batches(10)
    kwargs: dict[str, Any] = dict(BASE, precondition_frequency=2, root_staleness=2)
    model = mixed_model()
    with Shampoo(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:4])
        expected = copy.deepcopy(opt.state_dict()["state"])
    model = mixed_model()
    opt = Shampoo(model.parameters(), **kwargs)
    train(model, opt, batches[:4])
    opt.close()
    saved = opt.state_dict()["state"]
    assert any(int(s["pending_due"]) >= 0 for s in saved.values())
    for i, s in saved.items():
        assert s["pending_roots"].keys() == expected[i]["pending_roots"].keys()
        for j, root in s["pending_roots"].items():
            assert torch.equal(root, expected[i]["pending_roots"][j])
    assert opt._roots.pool is None  # computed here, without restarting the workers


def test_host_buffers_exist_only_for_roots_that_run_off_the_step() -> None:
    """A CPU parameter's roots installed in the step that computes them (synchronous roots,
    first cycles) are computed in place; only roots that outlive their step get host buffers."""
    batches = make_batches(6)
    sync_model, async_model = mixed_model(), mixed_model()
    with (
        Shampoo(sync_model.parameters(), **BASE, precondition_frequency=2, async_roots=False) as s,
        Shampoo(async_model.parameters(), **BASE, precondition_frequency=2, root_staleness=1) as a,
    ):
        train(sync_model, s, batches[:3])
        train(async_model, a, batches[:3])
        assert s.root_stats()["roots_computed"] > 0 and not s._roots.staging
        assert a.root_stats()["roots_computed"] > 0 and not a._roots.staging  # first cycle
        train(sync_model, s, batches[3:])
        train(async_model, a, batches[3:])
        assert not s._roots.staging
        assert set(a._roots.staging) == set(a.state)  # later cycles run off the step


def test_host_buffers_are_held_only_from_a_snapshot_to_its_install() -> None:
    """Staleness 1 at frequency 4: only step 4's cycle is in flight after a step (two buffers
    per factor, the plan's staging); none before its snapshot nor once it is installed."""
    model = mixed_model()
    kwargs: dict[str, Any] = dict(
        BASE, precondition_frequency=4, start_preconditioning_step=1, root_staleness=1
    )
    with Shampoo(model.parameters(), **kwargs) as opt:
        planned = opt.plan(show=False).bytes["staging"]
        held = []
        for batch in make_batches(7):
            train(model, opt, [batch])
            held.append(opt.root_stats()["host_buffer_bytes"])
    factors = sum(f.nbytes for s in opt.state.values() for f in s["factors"])
    assert planned == 2 * factors > 0
    assert held == [0, 0, 0, planned, 0, 0, 0]


def test_a_cycle_installed_and_snapshotted_in_one_step_reuses_the_host_buffers() -> None:
    """Staleness 2 at frequency 2: step 4 installs step 2's roots and snapshots again; the new
    jobs' result buffers are those the installed ones gave back at the end of the step (their
    snapshots' were released once solved), bitwise the run where every step waits for roots."""
    batches = make_batches(8)
    kwargs: dict[str, Any] = dict(
        BASE, precondition_frequency=2, start_preconditioning_step=1, root_staleness=2
    )
    plain = mixed_model()
    with Shampoo(plain.parameters(), **kwargs, async_roots=False) as opt:
        train(plain, opt, batches)
    model = mixed_model()

    def buffers(opt: Shampoo) -> list[int]:
        found = [b for bs in opt._roots.staging.values() for b in bs]
        return sorted(b.result.data_ptr() for b in found)

    with Shampoo(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:2])  # step 2: a later cycle, due at step 4
        before = buffers(opt)
        train(model, opt, batches[2:4])
        assert len(before) > 0 and buffers(opt) == before
        assert opt.root_stats()["host_buffer_bytes"] == opt.plan(show=False).bytes["staging"]
        train(model, opt, batches[4:])
    assert_bitwise_equal(params_after(model), params_after(plain))


def test_a_step_that_fails_after_installing_roots_keeps_their_buffers_for_its_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Step 4 installs group 0's roots of step 2 (staleness 2: host buffers) and snapshots it
    again; then group 1's roots, due now, fail past max_root_failures=1: the step raises and
    puts the installed roots back. Their result buffers come back only once a step ends (not
    to the step's new snapshots): the retry is, bitwise, the run that never failed."""

    def run(fail: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(s)) for s in ((6, 5), (6, 5), (7, 3))]
        b = [torch.nn.Parameter(torch.randn(5, 4))]
        groups = [{"params": a, "root_staleness": 2},
                  {"params": b, "root_staleness": 0, "max_root_failures": 1}]  # fmt: skip
        with Shampoo(groups, lr=0.1, block_size=8, precondition_frequency=2,
                     start_preconditioning_step=1, async_roots=False) as opt:  # fmt: skip
            for t in range(1, 8):
                g = torch.Generator().manual_seed(t)
                for p in a + b:
                    p.grad = torch.randn(p.shape, generator=g)
                if fail and t == 4:
                    with monkeypatch.context() as patch:
                        patch.setattr(root_pool, "inverse_roots", per_matrix(_never))
                        with pytest.raises(RuntimeError, match="max_root_failures=1"):
                            opt.step()
                opt.step()
        return params_after(torch.nn.ParameterList(a + b))

    assert_bitwise_equal(run(True), run(False))


def test_root_stats_report_the_state_bytes() -> None:
    """A (8, 6) parameter at block 8 (one block, two factors): exp_avg and graft_v (48 floats
    each), factors and roots (8² + 6² floats each), step (a float32), root_failures (2 int64),
    has_root (2 bools), skipped_blocks (an int64) and the empty pending slots (schema,
    pending_due and pending_submitted: 3 int64; pending_ok: 2 bools)."""
    param = torch.nn.Parameter(torch.randn(8, 6))
    with Shampoo([param], block_size=8, precondition_frequency=1, async_roots=False) as opt:
        param.grad = torch.randn(8, 6)
        opt.step()
        stats = opt.root_stats()
    expected = 4 * (2 * 48 + 2 * (64 + 36)) + 4 + 2 * 8 + 2 + 8 + 3 * 8 + 2
    assert stats["state_bytes"] == expected
    assert stats["state_bytes_per_element"] == expected / 48
    assert stats["host_buffer_bytes"] == 0  # synchronous roots of a CPU parameter: in place


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12, unique=True))
def test_installed_factor_indices_address_the_same_flags_as_a_slice_or_a_list(
    indices: list[int],
) -> None:
    """An install writes a job's flags at once, through a slice where the factor indices are
    evenly spaced (a job of a many-block parameter: every k-th factor), else the list."""
    indices = sorted(indices)
    flags = torch.arange(41)
    assert flags[_as_index(indices)].tolist() == indices
