"""What the inverse-root property tests (test_matrix_roots*.py) share: test matrices of a chosen
spectrum and condition (``Case``, ``cases``), the rounding floor and the backward error that
judges a root."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from torch_shampoo.roots.matrix_roots import ROOT_METHODS, RootResult

UNIT_ROUNDOFF = 2.0**-53
EXPONENTS = (1, 2, 4, 6, 8)
SPECTRUM_KINDS = ("geometric", "random", "duplicated", "rank_deficient")


@dataclass(frozen=True)
class Case:
    """A = Q diag(eigenvalues) Qᵀ with Q random orthogonal; condition is κ(A + εI) by design."""

    matrix: torch.Tensor
    epsilon: float
    condition: float

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    def regularized(self) -> torch.Tensor:
        """B = (A + Aᵀ)/2 + εI, the matrix whose inverse root is requested."""
        b = 0.5 * self.matrix + 0.5 * self.matrix.mT
        b.diagonal().add_(self.epsilon)
        return b


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-distributed orthogonal Q from the QR factorization of a Gaussian matrix."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def spectrum(kind: str, n: int, log_condition: float, seed: int) -> torch.Tensor:
    """n eigenvalues in [10^-log_condition, 1] with max 1; rank_deficient has exact zeros too."""
    generator = torch.Generator().manual_seed(seed)
    smallest = 10.0**-log_condition
    if kind == "geometric" or kind == "rank_deficient":
        values = torch.logspace(0.0, -log_condition, n, dtype=torch.float64)
    elif kind == "random":
        exponents = torch.rand(n, dtype=torch.float64, generator=generator) * -log_condition
        values = 10.0**exponents
    else:  # duplicated: every eigenvalue is one of three exactly repeated values
        levels = torch.tensor([1.0, math.sqrt(smallest), smallest], dtype=torch.float64)
        values = levels[torch.randint(0, 3, (n,), generator=generator)]
    values[0] = 1.0
    if n > 1 and kind != "rank_deficient":
        values[-1] = smallest
    if kind == "rank_deficient":
        zeros = int(torch.randint(1, n + 1, (1,), generator=generator)) if n > 1 else 1
        values[n - zeros :] = 0.0
    return values


@st.composite
def cases(
    draw: st.DrawFn,
    max_size: int = 64,
    max_log_condition: float = 10.0,
    scales: tuple[float, ...] = (1.0,),
    zero_epsilon: bool = True,
    kinds: tuple[str, ...] = SPECTRUM_KINDS,
) -> Case:
    """SPD (or rank-deficient PSD with ε > 0) test matrices with known κ(A + εI)."""
    n = draw(st.integers(1, max_size))
    kind = draw(st.sampled_from(kinds))
    log_condition = draw(st.floats(0.0, max_log_condition))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from(scales))
    eigenvalues = spectrum(kind, n, log_condition, seed)
    smallest = 10.0**-log_condition
    if kind == "rank_deficient" or not zero_epsilon:
        relative_epsilon = smallest
    else:
        relative_epsilon = draw(st.sampled_from([0.0, 1e-3 * smallest]))
    q = random_orthogonal(n, seed)
    matrix = (q * (scale * eigenvalues)) @ q.mT
    epsilon = scale * relative_epsilon
    condition = float(eigenvalues.max() + relative_epsilon) / float(
        eigenvalues.min() + relative_epsilon
    )
    return Case(matrix=matrix, epsilon=epsilon, condition=condition)


def rounding_floor(n: int) -> float:
    """Observed rounding level of an n x n float64 eigendecomposition and product, with margin."""
    return 4.0 * (4.0 + math.sqrt(n)) * UNIT_ROUNDOFF


def relative_backward_error(root: torch.Tensor, regularized: torch.Tensor, p: int) -> float:
    """‖X^(-p) - B‖_F / ‖B‖_F with X^(-p) = V diag(μ^(-p)) Vᵀ from X = V diag(μ) Vᵀ.

    μ^(-p) is real for negative μ too (integer p), so an indefinite X is judged, not rejected.
    """
    mu, v = torch.linalg.eigh(root)
    if not bool((mu != 0).all()):
        return math.inf
    power = (v * mu.pow(-float(p))) @ v.mT
    return float(
        torch.linalg.matrix_norm(power - regularized) / torch.linalg.matrix_norm(regularized)
    )


def relative_difference(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖X - Y‖_F / ‖Y‖_F."""
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


def methods_for(p: int) -> list[str]:
    """Methods that accept exponent p."""
    return [m for m in ROOT_METHODS if m != "cholesky" or p == 1]


def assert_accurate_or_failed(result: RootResult, case: Case, p: int) -> None:
    """ok=True only if X is the p-th inverse root of B up to the achievable accuracy.

    Backward error: ‖X^(-p) - B‖_F/‖B‖_F <= floor·(1 + p·κ(X)) + 2n·error, where error is the
    method's own estimate (newton's residual max|X^p B - I| bounds the backward error by about
    n·error). Not checkable once p·κ(X)·floor >= 1: X^(-p) is then not computable in float64.
    If B is numerically positive definite (ε > allowance·‖B‖_F), X must also be positive
    semi-definite with λ_max(X) <= (ε - allowance·‖B‖_F)^(-1/p), since B ⪰ εI.
    """
    if not result.ok:
        assert result.reason
        return
    x, n = result.root, case.size
    assert result.reason == ""
    assert bool(torch.isfinite(x).all())
    assert torch.equal(x, x.mT)
    floor = rounding_floor(n)
    mu = torch.linalg.eigvalsh(x)
    b = case.regularized()
    allowance = (floor * (1 + p) + 2 * n * result.error) * float(torch.linalg.matrix_norm(b))
    if case.epsilon > allowance:
        assert float(mu[0]) >= -floor * float(mu[-1]), f"indefinite root: {mu[0]}, {mu[-1]}"
        bound = (case.epsilon - allowance) ** (-1.0 / p) * (1 + floor)
        assert float(mu[-1]) <= bound, f"root {float(mu[-1]):.3g} exceeds ε^(-1/p) ({bound:.3g})"
    condition = float(mu.abs().max() / mu.abs().min())
    if p * floor * condition < 1:
        tolerance = floor * (1 + p * condition) + 2 * n * result.error
        error = relative_backward_error(x, b, p)
        assert error <= tolerance, f"backward error {error:.3g} > {tolerance:.3g} ({result})"
