"""Property tests for torch_shampoo.roots.matrix_roots.inverse_root: accuracy on well-posed inputs
and bad values (never raised, never a silently wrong root); arguments, dtypes, symmetry and
determinism: test_matrix_roots_arguments.py.

Accuracy is judged against the regularized matrix B = (A + Aᵀ)/2 + εI through the backward
error ‖X^(-p) - B‖_F / ‖B‖_F, with X^(-p) evaluated from the eigendecomposition of X. A root X
stored in float64 carries absolute rounding errors of order u‖X‖, which X -> X^(-p) amplifies
by p·κ(X), so no method (and no evaluation of the check itself) can do better than about
u·(1 + p·κ(X)); the tolerances below are that bound times a small size-dependent constant.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix_roots_helpers import (
    EXPONENTS,
    Case,
    assert_accurate_or_failed,
    cases,
    methods_for,
    random_orthogonal,
    relative_backward_error,
    relative_difference,
    rounding_floor,
)

from torch_shampoo.roots.matrix_roots import ROOT_METHODS, inverse_root

# ---------------------------------------------------------------------------------------------
# Accuracy on well-posed inputs


@settings(max_examples=60, deadline=None)
@given(case=cases(), p=st.sampled_from(EXPONENTS))
def test_root_power_reproduces_regularized_matrix(case: Case, p: int) -> None:
    """eigh (and cholesky for p = 1): ‖X^(-p) - B‖_F/‖B‖_F <= floor·(1 + p·κ(B)^(1/p))."""
    tolerance = rounding_floor(case.size) * (1 + p * case.condition ** (1.0 / p))
    for method in methods_for(p):
        if method == "newton":
            continue
        result = inverse_root(case.matrix, p, case.epsilon, method)
        assert result.ok, result.reason
        assert result.method == method
        assert result.error == 0.0
        error = relative_backward_error(result.root, case.regularized(), p)
        assert error <= tolerance, f"{method}: {error:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize(("n", "p"), [(300, 1), (520, 2), (601, 4)])
def test_large_roots_are_accurate_and_exactly_symmetric(n: int, p: int) -> None:
    """Sizes past the blocked W Wᵀ threshold (256), odd and even splits, κ(B) = 1e8."""
    d = torch.logspace(0, -8, n, dtype=torch.float64)
    q = random_orthogonal(n, seed=n)
    case = Case((q * d) @ q.mT, 0.0, 1e8)
    result = inverse_root(case.matrix, p, case.epsilon)
    assert result.ok
    assert torch.equal(result.root, result.root.mT)
    error = relative_backward_error(result.root, case.regularized(), p)
    assert error <= rounding_floor(n) * (1 + p * case.condition ** (1.0 / p))


@settings(max_examples=40, deadline=None)
@given(case=cases(), p=st.sampled_from(EXPONENTS))
def test_newton_root_is_as_accurate_as_its_reported_error(case: Case, p: int) -> None:
    """newton converges to 1e-6 for κ(B) <= 1e6; if ok, backward error <= 2n·error + rounding."""
    result = inverse_root(case.matrix, p, case.epsilon, "newton")
    if case.condition <= 1e6:
        assert result.ok, result.reason
        assert result.error <= 1.1e-6, "newton stopped before its 1e-6 tolerance"
    if result.ok:
        assert result.method == "newton"
        assert 0.0 <= result.error < 0.1
        tolerance = rounding_floor(case.size) * (1 + p * case.condition ** (1.0 / p))
        tolerance += 2 * case.size * result.error
        error = relative_backward_error(result.root, case.regularized(), p)
        assert error <= tolerance, f"{error:.3g} > {tolerance:.3g} (error {result.error:.3g})"


@settings(max_examples=40, deadline=None)
@given(case=cases(max_log_condition=6.0), p=st.sampled_from(EXPONENTS))
def test_eigh_and_newton_agree_where_newton_converges(case: Case, p: int) -> None:
    """‖X_newton - X_eigh‖_F/‖X_eigh‖_F <= 2n·newton error + floor·κ(B) (forward error)."""
    eigh = inverse_root(case.matrix, p, case.epsilon, "eigh")
    newton = inverse_root(case.matrix, p, case.epsilon, "newton")
    assert eigh.ok and newton.ok, newton.reason
    tolerance = 2 * case.size * newton.error + 2 * rounding_floor(case.size) * case.condition
    difference = relative_difference(newton.root, eigh.root)
    assert difference <= tolerance, f"{difference:.3g} > {tolerance:.3g}"


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_cholesky_equals_eigh_for_exponent_one(case: Case) -> None:
    """(A + εI)^(-1) by Cholesky matches eigh within the forward error floor·κ(B)."""
    cholesky = inverse_root(case.matrix, 1, case.epsilon, "cholesky")
    eigh = inverse_root(case.matrix, 1, case.epsilon, "eigh")
    assert cholesky.ok and eigh.ok
    difference = relative_difference(cholesky.root, eigh.root)
    tolerance = 2 * rounding_floor(case.size) * case.condition
    assert difference <= tolerance, f"{difference:.3g} > {tolerance:.3g}"


@settings(max_examples=30, deadline=None)
@given(
    case=cases(max_log_condition=16.0, scales=(1e-30, 1.0, 1e30), zero_epsilon=False),
    p=st.sampled_from(EXPONENTS),
)
def test_eigh_root_never_exceeds_regularization_bound(case: Case, p: int) -> None:
    """The spectrum shift keeps every used eigenvalue >= ε, so λ_max(X) <= ε^(-1/p).

    To rounding: λ_max(X) is read through a second eigendecomposition, of X (built from the
    first one's not exactly orthogonal eigenvectors), so two rounding floors, one per
    decomposition: LAPACK's last bits differ between CPUs (measured: up to 0.39 of one floor
    on MKL's AVX2 code path, 0.26 on its default one)."""
    result = inverse_root(case.matrix, p, case.epsilon, "eigh")
    assert result.ok, result.reason
    largest = float(torch.linalg.eigvalsh(result.root)[-1])
    assert largest <= case.epsilon ** (-1.0 / p) * (1 + 2 * rounding_floor(case.size))


@pytest.mark.parametrize("epsilon", [1e-6, 1e-10, 1e-14])
@pytest.mark.parametrize("p", [1, 4])
def test_null_space_maps_to_epsilon_root_despite_round_off(epsilon: float, p: int) -> None:
    """A with exact zeros: round-off puts λ_min(A + εI) on either side of ε; after the shift the
    largest eigenvalue of X is ε^(-1/p) to working accuracy (a second eigendecomposition reads
    it, hence two rounding floors as above; measured: up to 0.56 of one floor, 9 ulps, on
    three of MKL's code paths, which round this 8-fold eigenvalue differently)."""
    d = torch.cat([torch.logspace(0, -3, 8), torch.zeros(8)]).double()
    for seed in range(5):
        q = random_orthogonal(16, seed)
        result = inverse_root((q * d) @ q.mT, p, epsilon, "eigh")
        largest = float(torch.linalg.eigvalsh(result.root)[-1]) * epsilon ** (1.0 / p)
        assert abs(largest - 1) <= 2 * rounding_floor(16), largest


@pytest.mark.parametrize("p", EXPONENTS)
def test_negative_eigenvalues_are_shifted_to_epsilon(p: int) -> None:
    """eigh on a non-PSD A uses λ - λ_min + ε: X has eigenvalues (d - d_min + ε)^(-1/p).

    To rounding: reading X's eigenvalues (a second eigendecomposition, of X built by a
    product) errs by about u‖X‖ absolutely, not relatively: X's smallest eigenvalue, 5^(-1/p),
    is 500^(-1/p) times ‖X‖ (0.2 against 100 at p = 1). A's eigenvalues err by about u‖A‖,
    which the shift turns into relative errors of at most u‖A‖/2 of the others (λ - λ_min is
    exactly 0 for the smallest), so two rounding floors of ‖X‖ bound both. (A relative 1e-13,
    1.8 u‖X‖ at p = 1, was at the edge of what LAPACK guarantees: MKL used 0.33 of it.)"""
    d = torch.tensor([-2.0, -1e-3, 0.0, 0.5, 3.0], dtype=torch.float64)
    epsilon = 1e-2
    q = random_orthogonal(d.numel(), seed=p)
    result = inverse_root((q * d) @ q.mT, p, epsilon, "eigh")
    assert result.ok
    expected = (d - d.min() + epsilon).pow(-1.0 / p).sort().values
    actual = torch.linalg.eigvalsh(result.root)
    tolerance = 2 * rounding_floor(d.numel()) * float(expected.max())
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tolerance)


# ---------------------------------------------------------------------------------------------
# Bad values: never raise, never a silently wrong root


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 16),
    position=st.tuples(st.integers(0, 15), st.integers(0, 15)),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    method=st.sampled_from(ROOT_METHODS),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
)
def test_non_finite_input_is_reported_not_raised(
    n: int, position: tuple[int, int], bad: float, method: str, dtype: torch.dtype
) -> None:
    """A NaN or ±Inf anywhere gives ok=False, reason 'non-finite input', error nan."""
    matrix = torch.eye(n, dtype=dtype)
    matrix[position[0] % n, position[1] % n] = bad
    result = inverse_root(matrix, 1, 1e-6, method)
    assert not result.ok
    assert "non-finite" in result.reason
    assert math.isnan(result.error)
    assert result.root.shape == (n, n) and result.root.dtype == torch.float64


@settings(max_examples=80, deadline=None)
@given(
    case=cases(max_size=32, max_log_condition=16.0, scales=(1e-30, 1.0, 1e30)),
    p=st.sampled_from(EXPONENTS),
    method=st.sampled_from(ROOT_METHODS),
    absolute_epsilon=st.sampled_from([None, 0.0, 1e-6]),
)
def test_extreme_inputs_give_accurate_root_or_failure(
    case: Case, p: int, method: str, absolute_epsilon: float | None
) -> None:
    """κ up to 1e16, exact zeros, duplicates, scales 1e±30, ε from 0 to dominant."""
    if absolute_epsilon is not None:
        case = Case(case.matrix, absolute_epsilon, case.condition)
    if method == "cholesky":
        p = 1
    result = inverse_root(case.matrix, p, case.epsilon, method)
    if case.epsilon > 0 and method != "newton":
        assert result.ok, result.reason
    assert_accurate_or_failed(result, case, p)


@settings(max_examples=40, deadline=None)
@given(
    case=cases(max_size=16, scales=(1e-30, 1.0, 1e30), kinds=("rank_deficient",)),
    p=st.sampled_from(EXPONENTS),
)
def test_newton_fails_rather_than_misreports_on_singular_input(case: Case, p: int) -> None:
    """PSD A with exact zeros and ε = 0: newton's M can reach I while H is garbage.

    X^(-p) is not computable here (κ(X) ~ 1/u), so the check is that ok results satisfy
    X^p A ≈ I to within their reported error, recomputed from the returned root.
    """
    singular = Case(case.matrix, 0.0, math.inf)
    result = inverse_root(singular.matrix, p, 0.0, "newton")
    assert_accurate_or_failed(result, singular, p)
    if result.ok:
        identity = torch.eye(singular.size, dtype=torch.float64)
        power = torch.linalg.matrix_power(result.root, p) @ singular.regularized()
        residual = float((power - identity).abs().max())
        assert residual <= 2 * result.error + rounding_floor(singular.size), (residual, result)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("p", [2, 4, 6, 8])
def test_newton_converges_when_max_error_grows_in_first_steps(seed: int, p: int) -> None:
    """κ = 200 with a dominant eigenvalue cluster: zλ_max > 1, so max|M - I| may rise at first.

    Divergence is therefore judged by ‖M - I‖_F, which cannot grow in exact arithmetic.
    """
    d = torch.cat([torch.ones(4), torch.logspace(0, -2.3, 5)]).double()
    q = random_orthogonal(9, seed)
    result = inverse_root((q * d) @ q.mT, p, 0.0, "newton")
    assert result.ok, result.reason
    assert result.error <= 1.1e-6


@pytest.mark.parametrize("method", ROOT_METHODS)
def test_zero_matrix_without_epsilon_fails_cleanly(method: str) -> None:
    """A = 0, ε = 0 has no inverse root: ok=False with a reason, and no exception."""
    result = inverse_root(torch.zeros(4, 4), 1, 0.0, method)
    assert not result.ok
    assert result.reason
    assert result.root.shape == (4, 4)


def test_newton_reports_divergence_on_indefinite_input() -> None:
    """newton on diag(1, -1) diverges and stops with ok=False and a 'converge' reason."""
    result = inverse_root(torch.diag(torch.tensor([1.0, -1.0])), 2, 0.0, "newton")
    assert not result.ok
    assert "converge" in result.reason
    assert result.error >= 0.1


@settings(max_examples=20, deadline=None)
@given(case=cases(max_size=16), threshold=st.sampled_from([1e-30, 1e-8, 0.1, math.inf]))
def test_newton_ok_means_error_below_failure_threshold(case: Case, threshold: float) -> None:
    """For newton, ok is exactly error < failure_threshold (the root being finite)."""
    result = inverse_root(case.matrix, 2, case.epsilon, "newton", failure_threshold=threshold)
    assert result.ok == (result.error < threshold)


def test_cholesky_falls_back_to_eigh_when_not_positive_definite() -> None:
    """A + εI with a negative eigenvalue fails Cholesky; eigh with the ε shift is used."""
    d = torch.tensor([1.0, -1.0], dtype=torch.float64)
    result = inverse_root(torch.diag(d), 1, 0.5, "cholesky")
    assert result.ok and result.method == "eigh"
    torch.testing.assert_close(torch.diagonal(result.root), 1.0 / (d + 1.5), rtol=1e-15, atol=0)


@pytest.mark.parametrize(("p", "expected_ok"), [(4, True), (2.5, False)])
def test_eigh_failure_falls_back_to_newton_for_integer_exponents(
    monkeypatch: pytest.MonkeyPatch, p: float, expected_ok: bool
) -> None:
    """If torch.linalg.eigh raises, integer exponents use newton; others report the failure."""
    case = Case(random_orthogonal(8, seed=3) * 2.0 + 20 * torch.eye(8), 1e-3, 1.0)
    expected = inverse_root(case.matrix, p, case.epsilon, "eigh").root

    def broken_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise torch.linalg.LinAlgError("simulated convergence failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    result = inverse_root(case.matrix, p, case.epsilon, "eigh")
    assert result.ok == expected_ok
    if expected_ok:
        assert result.method == "newton"
        assert relative_difference(result.root, expected) <= 2 * 8 * result.error + 1e-14
    else:
        assert "eigh failed" in result.reason
