"""The step's pure tensor functions (``torch_shampoo.update.kernels``) against closed forms.

Claims:

* the statistics of a stack of vector blocks are β₂F + w·g gᵀ per block (w = 1 − β₂, or 1 for
  β₂ = 1), on both ways of computing them (a batched matmul below ``OUTER_PRODUCT_MIN``, a scale
  and an ``addcmul`` from it on);
* a block whose flag is False keeps its factor bit for bit, and a flagged one gets exactly the
  bits of the unflagged update; with a triangle mask (compact state) only that triangle is
  written.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_shampoo.layout.compact import Triangles
from torch_shampoo.update.kernels import GRAM_SPLIT_MIN, OUTER_PRODUCT_MIN, accumulate_statistics


def _stack(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randn(n, d, generator=gen)
    a = torch.randn(n, d, d, generator=gen)
    return blocks, a @ a.mT / d  # symmetric, like a factor


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    d=st.sampled_from([OUTER_PRODUCT_MIN - 1, OUTER_PRODUCT_MIN, 100]),
    beta2=st.sampled_from([0.9, 0.999, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_vector_statistics_are_beta_f_plus_w_g_gt(n: int, d: int, beta2: float, seed: int) -> None:
    blocks, factor = _stack(n, d, seed)
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    g = blocks.double()
    expected = beta2 * factor.double() + weight * g.unsqueeze(2) * g.unsqueeze(1)
    out = factor.clone()
    accumulate_statistics([out], blocks, (True,), beta2, None)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [OUTER_PRODUCT_MIN - 1, OUTER_PRODUCT_MIN])
@pytest.mark.parametrize("beta2", [0.999, 1.0])
def test_flags_and_triangles_keep_the_other_entries_bitwise(d: int, beta2: float) -> None:
    blocks, factor = _stack(3, d, 7)
    plain = factor.clone()
    accumulate_statistics([plain], blocks, (True,), beta2, None)
    flags = torch.tensor([True, False, True])
    flagged = factor.clone()
    accumulate_statistics([flagged], blocks, (True,), beta2, flags)
    assert torch.equal(flagged[1], factor[1])
    assert torch.equal(flagged[[0, 2]], plain[[0, 2]])
    for upper in (False, True):  # (a paired dim keeps its upper triangle)
        triangles = Triangles(d, factor.device, factor_upper=upper)
        kept, ones = triangles.factor_mask, torch.ones(d, d, dtype=torch.bool)
        assert torch.equal(kept, ones.triu() if upper else ones.tril())
        masked = factor.clone()
        accumulate_statistics([masked], blocks, (True,), beta2, flags, [triangles])
        assert torch.equal(masked[1], factor[1])
        assert torch.equal(masked[[0, 2]][:, kept], plain[[0, 2]][:, kept])
        assert torch.equal(masked[[0, 2]][:, ~kept], factor[[0, 2]][:, ~kept])


@pytest.mark.parametrize("d", [GRAM_SPLIT_MIN - 1, GRAM_SPLIT_MIN, GRAM_SPLIT_MIN + 3])
@pytest.mark.parametrize("beta2", [0.999, 1.0])
def test_matrix_statistics_by_halves_are_beta_f_plus_w_g_gt_and_agree_bitwise(
    d: int, beta2: float
) -> None:
    """From GRAM_SPLIT_MIN, U Uᵀ is added by halves (the lower off-diagonal block the upper's
    transpose): β₂F + w·UUᵀ to float32 rounding (float64 reference), and flagged rows and
    compact triangles bitwise the plain stack's."""
    gen = torch.Generator().manual_seed(d)
    blocks = torch.randn(2, d, -(-d // 4), generator=gen)  # (U ≥ d/4 wide: by halves)
    a = torch.randn(2, d, d, generator=gen)
    factor = a @ a.mT / d
    factor = (factor + factor.mT) / 2  # (exactly symmetric, as the stored factors are)
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    g = blocks.double()
    expected = beta2 * factor.double() + weight * g @ g.mT
    plain = factor.clone()
    accumulate_statistics([plain], blocks, (True, False), beta2, None)
    torch.testing.assert_close(plain.double(), expected, rtol=1e-5, atol=1e-5)
    if d >= GRAM_SPLIT_MIN:  # (the lower off-diagonal block: the upper's transpose)
        h = d // 2
        assert torch.equal(plain[:, h:, :h], plain[:, :h, h:].mT)
    flags = torch.tensor([False, True])
    flagged = factor.clone()
    accumulate_statistics([flagged], blocks, (True, False), beta2, flags)
    assert torch.equal(flagged[0], factor[0]) and torch.equal(flagged[1], plain[1])
    triangles = Triangles(d, factor.device)
    kept = triangles.factor_mask
    masked = factor.clone()
    accumulate_statistics([masked], blocks, (True, False), beta2, None, [triangles])
    assert torch.equal(masked[:, kept], plain[:, kept])
    assert torch.equal(masked[:, ~kept], factor[:, ~kept])
