"""``root_dtype=torch.float32``: roots solved in float32, a failed row solved again in float64
(issue 32, item 2); and a float64 root too large for the float32 state is a failure."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from models import make_batches, mixed_model, train
from torch import nn

from torch_shampoo import SOAP, NGPlus, Shampoo
from torch_shampoo.roots.matrix_roots import eigenbases, inverse_roots

U32 = torch.finfo(torch.float32).eps
F32 = torch.float32


def spd(n: int, condition: float, seed: int) -> torch.Tensor:
    """Q diag(d) Qᵀ, Q Haar-orthogonal, d geometric from 1 down to 1/condition."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    q = q * torch.sign(torch.diagonal(r))
    return (q * torch.logspace(0.0, -math.log10(condition), n, dtype=torch.float64)) @ q.mT


@pytest.mark.parametrize("n", [16, 64, 300])  # 300 > GRAM_BLOCK: the blocked product
@pytest.mark.parametrize("condition", [10.0, 1e3, 1e5])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_float32_roots_are_float64_ones_within_the_first_order_bound(
    n: int, condition: float, p: int
) -> None:
    """float32 eigh is backward stable: its eigenpairs are exact for A + E, ‖E‖ ≈ c(n)·u·‖A‖
    (c(n) ~ √n for rounding errors that do not add up coherently), and X = A^(−1/p) moves by at
    most max|f'| ‖E‖ = (1/p) λ_min^(−1/p−1) ‖E‖ (f monotone: the Fréchet derivative is bounded
    by its largest divided difference), i.e. relatively (κ/p)·c(n)·u; the product W Wᵀ adds
    about c(n)·u. Bound: √n·u·(κ/p + 1) (measured: at most 0.37 of it at n = 300)."""
    a = spd(n, condition, seed=n)
    stack = torch.stack([a, 7.0 * a])
    exact = inverse_roots(stack, p, 1e-12)
    found = inverse_roots(stack, p, 1e-12, dtype=F32)
    bound = math.sqrt(n) * U32 * (condition / p + 1)
    for x, y in zip(exact, found):
        assert y.ok and not y.retried and y.root.dtype == torch.float64
        error = torch.linalg.matrix_norm(y.root - x.root, 2) / torch.linalg.matrix_norm(x.root, 2)
        assert 0 < float(error) <= bound, (float(error), bound)  # (0: it was float32)


def test_an_ill_conditioned_row_is_solved_again_in_float64_alone() -> None:
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(32, 4, dtype=torch.float64, generator=gen)
    rank_deficient = g @ g.mT  # rank 4 of 32: ε = 1e-12 shifts κ to ~1e13
    ill = spd(32, 1e7, seed=1)  # full rank, κ above the float32 limit 0.1/u ≈ 8.4e5
    nan = torch.full((32, 32), math.nan, dtype=torch.float64)
    fine = spd(32, 10.0, seed=2)
    stack = torch.stack([fine, rank_deficient, fine, ill, nan])
    found = inverse_roots(stack, 4, 1e-12, dtype=F32)
    assert [r.retried for r in found] == [False, True, False, True, False]  # NaN: fails anyway
    assert [r.ok for r in found] == [True, True, True, True, False]
    alone = inverse_roots(stack[[1, 3]], 4, 1e-12)  # the failed rows, as one float64 batch
    assert torch.equal(found[1].root, alone[0].root) and torch.equal(found[3].root, alone[1].root)
    one = inverse_roots(stack[1:2], 4, 1e-12, dtype=F32)[0]
    assert one.retried and torch.equal(one.root, inverse_roots(stack[1:2], 4, 1e-12)[0].root)


def test_float32_bases_match_float64_ones_and_an_overflowing_one_is_retried() -> None:
    a = torch.stack([spd(24, 100.0, seed=4), spd(24, 100.0, seed=5) * 1e42])  # float32: inf
    exact, found = eigenbases(a), eigenbases(a, F32)
    assert [r.retried for r in found] == [False, True] and all(r.ok for r in found)
    overlap = (found[0].root.mT @ exact[0].root).abs()  # equal up to the columns' signs
    torch.testing.assert_close(overlap, torch.eye(24, dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.equal(found[1].root, eigenbases(a[1:2])[0].root)


def _weight_run(dtype: torch.dtype, steps: int) -> dict[str, float]:
    w = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(1)
    with Shampoo([w], precondition_frequency=1, root_dtype=dtype, async_roots=False) as opt:
        for _ in range(steps):
            w.grad = torch.randn(6, 4, generator=gen)
            opt.step()
        return opt.root_stats()


def test_root_stats_count_the_retries() -> None:
    """One step: factors G Gᵀ (6 × 6, rank 4: retried) and Gᵀ G (4 × 4, full rank: float32)."""
    assert _weight_run(torch.float64, 1)["root_retries"] == 0
    stats = _weight_run(F32, 1)
    assert (stats["roots_computed"], stats["root_retries"]) == (2, 1)


def test_float32_roots_change_the_trajectory_and_mostly_stay_float32() -> None:
    """The async ≡ sync test's float32 case is not the float64 one under another name."""
    runs = {}
    for dtype in (torch.float64, F32):
        model = mixed_model(0)
        with Shampoo(model.parameters(), lr=0.01, block_size=16, precondition_frequency=5,
                     root_dtype=dtype, async_roots=False) as opt:  # fmt: skip
            train(model, opt, make_batches(20))
            runs[dtype] = ([p.detach().clone() for p in model.parameters()], opt.root_stats())
    assert any(not torch.equal(x, y) for x, y in zip(runs[F32][0], runs[torch.float64][0]))
    stats = runs[F32][1]
    assert stats["root_retries"] < stats["roots_computed"]


@pytest.mark.parametrize("cls", [Shampoo, SOAP, NGPlus])
def test_a_bad_root_dtype_is_refused_by_name(cls: type) -> None:
    p = nn.Parameter(torch.zeros(3, 2))
    for value in (torch.float16, "float32", torch.bfloat16):
        with pytest.raises(ValueError, match=rf"Invalid root_dtype: {value!r} \(valid choices: "
                           r"torch.float64, torch.float32\)"):  # fmt: skip
            cls([p], root_dtype=value)


def test_float32_roots_need_eigh() -> None:
    with pytest.raises(ValueError, match=r"Invalid root_dtype: torch.float32 \(.*eigh"):
        Shampoo([nn.Parameter(torch.zeros(3, 2))], root_dtype=F32, root_method="newton")
    with pytest.raises(ValueError, match="eigh only"):
        inverse_roots(spd(4, 2.0, 0)[None], 1, 0.0, "cholesky", dtype=F32)


@pytest.mark.parametrize("cls", [SOAP, NGPlus])
def test_soap_and_ngplus_train_with_float32_roots(cls: type) -> None:
    model = mixed_model(0)
    with cls(model.parameters(), block_size=16, root_dtype=F32, async_roots=False) as opt:
        train(model, opt, make_batches(12))
        assert opt.root_stats()["roots_computed"] > 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_root_beyond_the_float32_state_fails_instead_of_installing_inf() -> None:
    """A vector's rank-1 factor with ε = 6e-136 (found by the settings fuzz): its root
    ε^(−1/2) ≈ 1e67 is finite in float64 but inf in the float32 state; it made the weights NaN."""
    v = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(0)))
    with Shampoo([v], precondition_frequency=1, epsilon=6.05e-136, async_roots=False) as opt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                v.grad = torch.randn(5)
                opt.step()
        assert opt.root_stats()["root_failures"] == 2
        assert any("keeping the previous root" in str(w.message) for w in caught)
    assert bool(torch.isfinite(v).all())
