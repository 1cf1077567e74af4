"""Warm-started Shampoo roots (``eigh_every`` > 1): roots from each factor's kept eigenbasis,
refreshed by one power iteration between the pool's exact eigendecompositions."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from models import make_batches, mixed_model, saved_and_loaded, train
from torch import nn

from torch_shampoo import Shampoo
from torch_shampoo.layout import compact
from torch_shampoo.roots.staging import Slot
from torch_shampoo.update import kernels, warm


def _psd(d: int, seed: int, decay: float = 0.7, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random SPD matrix with eigenvalues decay**i (well separated: power iteration converges)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    values = decay ** torch.arange(d, dtype=torch.float64)
    return (q * values) @ q.T


def _exact_root(f: torch.Tensor, scale: float, exponent: float, epsilon: float) -> torch.Tensor:
    """(F/scale + εI)^(−1/r) by torch.linalg.eigh in float64 (the independent side)."""
    values, vectors = torch.linalg.eigh(f.double() / scale)
    return (vectors * (values + epsilon).pow(-1.0 / exponent)) @ vectors.T


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double() - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_roots_in_an_exact_basis_equal_the_eigh_roots(dtype: torch.dtype) -> None:
    """Tolerance: float64 1e-10, float32 1e-5 (rounding of Q and of QᵀFQ, κ = 0.7⁻¹⁵ ≈ 210)."""
    f = torch.stack([_psd(16, seed) for seed in range(3)])
    bases = torch.linalg.eigh(f).eigenvectors.to(dtype)
    roots, ok, drift = kernels.eigen_roots(bases, f.to(dtype), 0.3, 4.0, 1e-6, relative=False)
    assert ok.all()
    assert float(drift.max()) < (1e-6 if dtype == torch.float64 else 3e-3)  # √u: ‖·‖² − Σλ²
    for root, matrix in zip(roots, f):
        error = _relative_error(root, _exact_root(matrix, 0.3, 4.0, 1e-6))
        assert error < (1e-10 if dtype == torch.float64 else 1e-5)


def test_the_drift_is_the_relative_off_diagonal_norm_in_the_basis() -> None:
    f = _psd(8, 3)
    eye = torch.eye(8, dtype=torch.float64)[None]
    *_, drift = kernels.eigen_roots(eye, f[None], 1.0, 2.0, 0.0, relative=False)
    off = torch.linalg.matrix_norm(f - torch.diag(torch.diagonal(f))) / torch.linalg.matrix_norm(f)
    assert abs(float(drift[0]) - float(off)) < 1e-12


def test_relative_epsilon_matches_the_pools_convention() -> None:
    """Relative ε (NG+'s convention, as the pool solves it): ε·tr(F/scale)/d."""
    f = _psd(12, 1) * 50.0
    bases = torch.linalg.eigh(f).eigenvectors[None]
    roots, ok, _ = kernels.eigen_roots(bases, f[None], 2.0, 1.0, 0.1, relative=True)
    tau = float(torch.trace(f / 2.0)) / 12
    assert ok.all() and _relative_error(roots[0], _exact_root(f, 2.0, 1.0, 0.1 * tau)) < 1e-10


def test_a_spectrum_below_zero_is_shifted_to_epsilon_as_the_pool_does() -> None:
    values = torch.tensor([-1e-3, 0.5, 1.0, 2.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))  # fmt: skip
    f = (q * values) @ q.T
    roots, ok, _ = kernels.eigen_roots(q[None], f[None], 1.0, 2.0, 1e-4, relative=False)
    shifted = values - values[0] + 1e-4  # λ − λ_min + ε
    expected = (q * shifted.pow(-0.5)) @ q.T
    assert ok.all() and _relative_error(roots[0], expected) < 1e-10


def test_one_power_step_from_the_last_basis_tracks_a_moving_factor() -> None:
    """F moves by an EMA step of weight 0.02 of a rank-8 update (the default β₂ = 0.999 over 20
    steps); one power step from the old exact basis gives a root within 4% (Frobenius) of the
    exact root of the new F (measured 3.1%), at most 0.6x the stale root's error (6.9%)."""
    d = 32
    old = _psd(d, 0, decay=0.9)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(d, 8, generator=gen, dtype=torch.float64) * 0.3
    new = 0.98 * old + 0.02 * (g @ g.T)
    basis = torch.linalg.eigh(old).eigenvectors[None]
    exact = _exact_root(new, 1.0, 4.0, 1e-6)
    stale, *_ = kernels.eigen_roots(basis, old[None], 1.0, 4.0, 1e-6, relative=False)
    moved = kernels.power_step(basis, new[None])
    warm_root, ok, _ = kernels.eigen_roots(moved, new[None], 1.0, 4.0, 1e-6, relative=False)
    assert ok.all()
    error = _relative_error(warm_root[0], exact)
    assert error < 0.04 and error < 0.6 * _relative_error(stale[0], exact)


def test_a_non_finite_warm_step_keeps_the_old_root_and_basis() -> None:
    f = torch.stack([_psd(6, 0), _psd(6, 1)]).float()
    f[1, 2, 3] = math.nan
    bases = torch.linalg.eigh(f[:1].double()).eigenvectors.float().repeat(2, 1, 1)
    roots = torch.stack([torch.eye(6), 2 * torch.eye(6)])
    slot = Slot([0, 1], f, roots.clone(), bases=bases.clone())
    ok = warm.roots_from_bases(slot, warm.Scalars(1.0, 2.0, 1e-6, False), [True, True], True)
    assert ok.tolist() == [True, False]
    assert torch.equal(slot.roots[1], roots[1]) and torch.equal(slot.bases[1], bases[1])
    assert not torch.equal(slot.roots[0], roots[0])


def test_rows_not_asked_for_keep_their_root_and_basis() -> None:
    f = torch.stack([_psd(6, 0), _psd(6, 1)]).float()
    bases = torch.eye(6).repeat(2, 1, 1)
    slot = Slot([0, 1], f, torch.eye(6).repeat(2, 1, 1), bases=bases.clone())
    ok = warm.roots_from_bases(slot, warm.Scalars(1.0, 2.0, 1e-6, False), [False, True], True)
    assert ok.tolist() == [False, True]
    assert torch.equal(slot.roots[0], torch.eye(6)) and torch.equal(slot.bases[0], torch.eye(6))


def _train(steps: int, **kwargs: Any) -> tuple[list[torch.Tensor], Shampoo]:
    model = mixed_model()
    opt = Shampoo(model.parameters(), **{"lr": 0.01, "block_size": 16, **kwargs})
    train(model, opt, make_batches(steps))
    opt.close()
    return [p.detach().clone() for p in model.parameters()], opt


def test_eigh_every_1_is_bitwise_the_default_and_keeps_no_bases() -> None:
    kwargs = dict(precondition_frequency=2, async_roots=False)
    default, opt = _train(12, **kwargs)
    explicit, _ = _train(12, eigh_every=1, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))
    assert all("bases" not in s for s in opt.state.values())
    warm_run, warm_opt = _train(12, eigh_every=3, **kwargs)
    assert any(not torch.equal(a, b) for a, b in zip(default, warm_run))  # not vacuous
    assert any("bases" in s for s in warm_opt.state.values())


def test_the_roots_after_a_warm_step_are_close_to_the_exact_roots_of_the_factors() -> None:
    """Sync roots, frequency 1, eigh_every 4: after step 3 (a warm root step) each installed root
    is within 5% (Frobenius) of the exact (F_3/(1 − β₂³) + εI)^(−1/r) of its saved factor."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5, bias=False, dtype=torch.float64)
    opt = Shampoo(layer.parameters(), lr=0.01, precondition_frequency=1,
                  start_preconditioning_step=1, eigh_every=4, async_roots=False,
                  root_staleness=0, epsilon=1e-3)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(16, 6, generator=gen, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
    state = opt.state[layer.weight]
    scale = 1.0 - 0.999**3
    for factor, root in zip(state["factors"], state["roots"]):
        exact = _exact_root(factor, scale, 4.0, 1e-3)
        assert _relative_error(root, exact) < 0.05
    assert opt.root_stats()["roots_computed"] == 2  # the first (exact) cycle only
    opt.close()


@pytest.mark.parametrize("frequency", [1, 3])
def test_async_warm_roots_equal_sync_ones_delayed_by_the_same_staleness(frequency: int) -> None:
    common = dict(precondition_frequency=frequency, root_staleness=frequency, eigh_every=2,
                  momentum=0.5, start_preconditioning_step=1, stagger_roots=False)  # fmt: skip
    asynchronous, _ = _train(20, async_roots=True, **common)
    synchronous, _ = _train(20, async_roots=False, **common)
    for a, b in zip(asynchronous, synchronous):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("async_roots", [True, False])
def test_resume_with_bases_in_flight_is_bitwise_identical(async_roots: bool) -> None:
    kwargs: dict[str, Any] = dict(lr=0.01, block_size=16, precondition_frequency=5,
                                  root_staleness=4, eigh_every=2, stagger_roots=False,
                                  async_roots=async_roots)  # fmt: skip
    batches = make_batches(24)
    whole = mixed_model()
    with Shampoo(whole.parameters(), **kwargs) as opt:
        train(whole, opt, batches)
    model = mixed_model()
    opt = Shampoo(model.parameters(), **kwargs)
    train(model, opt, batches[:12])  # the exact bases of step 10 are due at 14
    saved = opt.state_dict()
    assert int(saved["state"][0]["pending_due"]) == 14 and "bases" in saved["state"][0]
    checkpoint = saved_and_loaded(model, opt)
    opt.close()
    resumed_model = mixed_model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    with Shampoo(resumed_model.parameters(), **kwargs) as resumed:
        resumed.load_state_dict(checkpoint["opt"])
        train(resumed_model, resumed, batches[12:])
    for a, b in zip(resumed_model.parameters(), whole.parameters()):
        assert torch.equal(a.detach(), b.detach()), (a - b).abs().max()


@pytest.mark.parametrize("power", [True, False])
def test_a_compact_slot_gets_the_roots_of_a_full_one(power: bool) -> None:
    """Compact state: the factors read from, and the roots written into, the triangles of one
    stack give the roots of full matrices (to the last bit: the same arithmetic)."""
    f = torch.stack([_psd(5, 0), _psd(5, 1)]).float()
    bases = torch.linalg.eigh(f.double()).eigenvectors.float()
    old_roots = torch.stack([torch.eye(5), 3 * torch.eye(5)])
    triangles = compact.Triangles(5, torch.device("cpu"))
    lower, upper = compact.pack(list(f), list(old_roots), triangles)
    packed = Slot([0, 1], lower, upper, triangles=triangles, bases=bases.clone())
    plain = Slot([0, 1], f.clone(), old_roots.clone(), bases=bases.clone())
    scalars = warm.Scalars(0.5, 4.0, 1e-6, False)
    for slot in (packed, plain):
        warm.roots_from_bases(slot, scalars, [True, True], power)
    assert torch.equal(packed.full_roots(), plain.roots) and not torch.equal(plain.roots, old_roots)
    assert torch.equal(packed.bases, plain.bases)


def test_warm_roots_need_eigh() -> None:
    with pytest.raises(ValueError, match="eigh_every"):
        Shampoo([torch.zeros(3, 3, requires_grad=True)], eigh_every=2, root_method="newton")


def test_a_state_saved_before_eigh_every_resumes_with_exact_roots_bitwise() -> None:
    """A Shampoo state dict without the group key loads with eigh_every=1, as it was trained."""
    kwargs: dict[str, Any] = dict(lr=0.01, block_size=16, precondition_frequency=2,
                                  async_roots=False)  # fmt: skip
    batches = make_batches(10)
    whole = mixed_model()
    with Shampoo(whole.parameters(), **kwargs) as opt:
        train(whole, opt, batches)
    model = mixed_model()
    with Shampoo(model.parameters(), **kwargs) as opt:
        train(model, opt, batches[:5])
        saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["eigh_every"]
    with Shampoo(model.parameters(), eigh_every=5, **kwargs) as resumed:
        resumed.load_state_dict(saved)
        assert resumed.param_groups[0]["eigh_every"] == 1
        train(model, resumed, batches[5:])
    for a, b in zip(model.parameters(), whole.parameters()):
        assert torch.equal(a.detach(), b.detach())


def _linear_run(steps: int, **kwargs: Any) -> tuple[torch.Tensor, int]:
    torch.manual_seed(0)
    layer = nn.Linear(6, 5, bias=False)
    gen = torch.Generator().manual_seed(0)
    with Shampoo(layer.parameters(), lr=0.01, precondition_frequency=2, async_roots=False,
                 **kwargs) as opt:  # fmt: skip
        for _ in range(steps):
            opt.zero_grad()
            layer(torch.randn(16, 6, generator=gen)).pow(2).mean().backward()
            opt.step()
        return layer.weight.detach().clone(), opt.root_stats()["roots_computed"]


def test_a_drifted_basis_takes_the_exact_eigh_and_a_large_tolerance_changes_nothing() -> None:
    """basis_tolerance: below any drift (an exact basis's is at rounding size) every root step
    runs the exact eigh (as many as eigh_every=1); far above any drift, bitwise τ = 0."""
    _, every_step = _linear_run(20, eigh_every=1)
    _, tight = _linear_run(20, eigh_every=4, basis_tolerance=1e-30)
    off, warm_count = _linear_run(20, eigh_every=4)
    loose, _ = _linear_run(20, eigh_every=4, basis_tolerance=10.0)
    assert tight == every_step == 2 * 10 and warm_count == 2 * 3  # (steps 2, 8, 16)
    assert torch.equal(off, loose)


def test_the_basis_drift_of_a_rotated_eigenbasis_grows_with_the_angle() -> None:
    f = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))[None]
    drifts = []
    for angle in (0.0, 0.01, 0.1):
        c, s = math.cos(angle), math.sin(angle)
        q = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)[None]
        drifts.append(float(kernels.basis_drift(q, f)[0]))
    # QᵀFQ's off-diagonal entry is (λ₁ − λ₂) sin θ cos θ: ‖offdiag‖/‖F‖ = √2·2·sc/√10
    expected = [
        math.sqrt(2) * 2 * math.sin(a) * math.cos(a) / math.sqrt(10) for a in (0, 0.01, 0.1)
    ]
    assert drifts == pytest.approx(expected, abs=1e-7)


def test_warm_roots_with_bfloat16_state_track_the_float32_run() -> None:
    """eigh_every > 1 with ``state_dtype=torch.bfloat16``: bases stored in bfloat16, the power
    step and the roots computed in float32; the loss stays within 5% of the float32 run's."""
    losses = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        opt = Shampoo(net.parameters(), lr=1e-2, precondition_frequency=2, async_roots=False,
                      eigh_every=3, state_dtype=dtype)  # fmt: skip
        x, y = torch.randn(64, 16), torch.randn(64, 4)
        for _ in range(40):
            opt.zero_grad()
            loss = (net(x) - y).square().mean()
            loss.backward()
            opt.step()
        assert all(b.dtype == (dtype or torch.float32) for b in opt.state[net[0].weight]["bases"])
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
