"""Inverse p-th roots X = (A + εI)^(-1/p) of symmetric positive semi-definite matrices: pure,
bitwise reproducible CPU functions in float64 (or float32 first, a failed row solved again in
float64), safe to call from worker threads; results are float64."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

ROOT_METHODS: tuple[str, ...] = ("eigh", "newton", "cholesky")
ROOT_DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32)

NEWTON_TOLERANCE = 1e-6
NEWTON_MAX_ITERATIONS = 100
NEWTON_MAX_GROWTH = 1.2
GRAM_BLOCK = 256
MAX_LOG_ROOT = 709.0  # log of the largest root entry allowed, just below log(float64 max)
MAX_LOG_ROOT_32 = 88.0  # the same for float32 (log(float32 max) = 88.72)
UNIT_32 = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class RootResult:
    """Outcome of `inverse_root`."""

    root: torch.Tensor
    """Float64 CPU (n, n); its content must not be used when ``ok`` is False."""
    ok: bool
    error: float
    """0.0 for the direct methods, newton's residual max|X^p (A + εI) - I|; nan: unusable input."""
    reason: str
    """Empty when ok, else a short human-readable cause."""
    method: str
    """The method that actually produced ``root`` (after any fallback)."""
    retried: bool = False
    """Solved in float32 first, which failed (:func:`inverse_roots`), then again in float64."""


def inverse_root(
    matrix: torch.Tensor,
    exponent: float,
    epsilon: float,
    method: str = "eigh",
    failure_threshold: float = 0.1,
) -> RootResult:
    """X = (A + eps*I)^(-1/exponent) for a symmetric PSD A (symmetrized), in float64 on CPU, by
    "eigh" (if it fails: "newton" for an integer exponent), "newton" (integer exponents) or
    "cholesky" (exponent 1; if A + εI is not numerically positive definite: "eigh").

    Bad values (non-finite input, singular matrix, non-convergence) give ``ok=False``; bad
    arguments raise ValueError.
    """
    _check_arguments(matrix, exponent, epsilon, method, failure_threshold)
    a = matrix.to(device="cpu", dtype=torch.float64)
    n = a.shape[0]
    if not _all_finite(a):
        return _failure(n, method, "non-finite input")
    if n == 0:
        return RootResult(root=a.clone(), ok=True, error=0.0, reason="", method=method)
    regularized = _symmetrized(a)
    regularized.diagonal().add_(epsilon)
    if method == "newton":
        return _newton_root(regularized, int(exponent), failure_threshold)
    if method == "cholesky":
        return _cholesky_inverse(regularized, epsilon, failure_threshold)
    return _eigh_root(regularized, exponent, epsilon, failure_threshold)


def inverse_roots(
    matrices: torch.Tensor,
    exponent: float,
    epsilon: float,
    method: str = "eigh",
    failure_threshold: float = 0.1,
    dtype: torch.dtype = torch.float64,
) -> list[RootResult]:
    """:func:`inverse_root` of every matrix of a stack (k, n, n). For ``"eigh"`` (n ≤
    ``GRAM_BLOCK``) one batched eigendecomposition and product W Wᵀ; a matrix the batched pass
    cannot handle is computed again alone, with its fallbacks. Other methods loop.

    ``dtype=torch.float32`` (``"eigh"`` only): :func:`_float32_roots`, the float64 result of a
    float32 solve, its failed rows solved again in float64 (``retried``)."""
    if matrices.dim() != 3:
        raise ValueError(f"matrices must be a (k, n, n) stack, got shape {tuple(matrices.shape)}")
    _check_dtype(dtype, method)
    k, n = matrices.shape[0], matrices.shape[-1]
    if dtype == torch.float32 and k and n:
        _check_arguments(matrices[0], exponent, epsilon, method, failure_threshold)
        return _float32_roots(matrices, exponent, epsilon, failure_threshold)
    if k == 0 or n == 0 or method != "eigh" or n > GRAM_BLOCK:
        return [inverse_root(m, exponent, epsilon, method, failure_threshold) for m in matrices]
    _check_arguments(matrices[0], exponent, epsilon, method, failure_threshold)
    a = matrices.to(device="cpu", dtype=torch.float64)
    regularized = _symmetrized(a)
    regularized.diagonal(dim1=-2, dim2=-1).add_(epsilon)
    usable = finite_rows(a)
    if not all(usable):  # solved as I here, then again alone (with the fallbacks)
        eye = torch.eye(n, dtype=torch.float64)
        regularized = torch.where(torch.tensor(usable).view(-1, 1, 1), regularized, eye)
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(regularized)
    except RuntimeError:  # includes torch.linalg.LinAlgError: each alone, with its fallbacks
        return [inverse_root(m, exponent, epsilon, method, failure_threshold) for m in a]
    smallest = eigenvalues[:, :1]
    eigenvalues = torch.where(smallest < epsilon, (eigenvalues - smallest) + epsilon, eigenvalues)
    smallest = eigenvalues[:, 0]
    bounded = (smallest > 0) & (-torch.log(smallest) / exponent <= MAX_LOG_ROOT)
    scaled = eigenvectors.mul_(eigenvalues.pow(-0.5 / exponent).unsqueeze(1))
    spectrum, powers = finite_rows(eigenvalues), finite_rows(scaled)
    if not (all(usable) and all(spectrum) and all(powers) and bool(bounded.all())):
        usable = [all(row) for row in zip(usable, bounded.tolist(), spectrum, powers)]
    roots = _symmetrized(scaled @ scaled.mT).unbind()
    return [
        RootResult(root=root, ok=True, error=0.0, reason="", method="eigh")
        if fine
        else inverse_root(a[i], exponent, epsilon, method, failure_threshold)
        for i, (root, fine) in enumerate(zip(roots, usable))
    ]


def finite_rows(stack: torch.Tensor) -> list[bool]:
    """Per matrix of a stack (k, ...): are all its entries finite? (One sum per matrix first.)"""
    if bool(torch.isfinite(stack.flatten(1).sum(1)).all()):
        return [True] * len(stack)
    return torch.isfinite(stack).flatten(1).all(1).tolist()


def eigenbases(matrices: torch.Tensor, dtype: torch.dtype = torch.float64) -> list[RootResult]:
    """The eigenvectors Q (``RootResult.root``, float64; columns, eigenvalues ascending) of every
    symmetric matrix of a stack (k, n, n), in ``dtype``, by one batched ``eigh`` (each alone if
    that fails). A matrix with a non-finite entry fails; the caller keeps its previous basis.
    float32: a finite matrix whose float32 basis fails is solved again in float64 (``retried``)."""
    if matrices.dim() != 3:
        raise ValueError(f"matrices must be a (k, n, n) stack, got shape {tuple(matrices.shape)}")
    _check_dtype(dtype, "eigh")
    if matrices.shape[0] == 0:
        return []
    a = matrices.to(device="cpu", dtype=torch.float64)
    if dtype == torch.float64:
        return _bases(a)
    return _retried(_bases(a.to(torch.float32)), a, eigenbases)


def _bases(a: torch.Tensor) -> list[RootResult]:
    """:func:`eigenbases` in ``a``'s dtype (the bases as float64)."""
    n = a.shape[-1]
    usable = finite_rows(a)
    symmetric = _symmetrized(a)
    if not all(usable):
        eye = torch.eye(n, dtype=a.dtype)
        symmetric = torch.where(torch.tensor(usable).view(-1, 1, 1), symmetric, eye)
    try:
        bases = torch.linalg.eigh(symmetric).eigenvectors
    except RuntimeError:  # includes torch.linalg.LinAlgError: each alone
        found = []
        for matrix in symmetric:
            try:
                found.append(torch.linalg.eigh(matrix).eigenvectors)
            except RuntimeError:  # a NaN basis: not finite below
                found.append(torch.full((n, n), math.nan, dtype=a.dtype))
        bases = torch.stack(found)
    usable = [fine and finite for fine, finite in zip(usable, finite_rows(bases))]
    reasons = ["" if fine else "non-finite statistics" for fine in usable]
    return [
        RootResult(basis, fine, 0.0 if fine else math.nan, reason, method="eigh")
        for basis, fine, reason in zip(bases.double().unbind(), usable, reasons)
    ]


def _float32_roots(
    matrices: torch.Tensor, exponent: float, epsilon: float, failure_threshold: float
) -> list[RootResult]:
    """:func:`inverse_roots` by one float32 ``eigh`` of the stack (spectrum shifted as in
    float64), the roots returned in float64. A row fails when its input or root is not finite,
    eigh fails, the root would overflow float32, or κ·u > ``failure_threshold`` (κ = λ_max/λ_min
    of the shifted spectrum, u = float32's eps): eigh's eigenvalues are off by about u·λ_max, so
    the root's relative error is about κu/p, and a rank-deficient factor's small eigenvalues are
    rounding noise. The failed rows are solved again in float64, as one batch."""
    a = matrices.to(device="cpu", dtype=torch.float64)
    n = a.shape[-1]
    regularized = _symmetrized(a.to(torch.float32))
    regularized.diagonal(dim1=-2, dim2=-1).add_(epsilon)
    usable = finite_rows(regularized)
    if not all(usable):  # solved as I here, then again in float64
        eye = torch.eye(n, dtype=torch.float32)
        regularized = torch.where(torch.tensor(usable).view(-1, 1, 1), regularized, eye)
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(regularized)
    except RuntimeError:  # includes torch.linalg.LinAlgError: all again in float64
        return _retried([_failure(n, "eigh", "float32 eigh failed")] * len(a), a, inverse_roots,
                        exponent, epsilon, "eigh", failure_threshold)  # fmt: skip
    smallest = eigenvalues[:, :1]
    eigenvalues = torch.where(smallest < epsilon, (eigenvalues - smallest) + epsilon, eigenvalues)
    smallest, largest = eigenvalues[:, 0], eigenvalues[:, -1]
    accurate = (smallest > 0) & (largest * UNIT_32 <= failure_threshold * smallest)
    bounded = accurate & (-torch.log(smallest) / exponent <= MAX_LOG_ROOT_32)
    scaled = eigenvectors.mul_(eigenvalues.pow(-0.5 / exponent).unsqueeze(1))
    if n <= GRAM_BLOCK:
        roots = _symmetrized(scaled @ scaled.mT)
    else:
        roots = torch.stack([_gram(w) for w in scaled])
    fine = [all(row) for row in zip(usable, bounded.tolist(), finite_rows(roots))]
    found = [
        RootResult(root, True, 0.0, "", "eigh") if ok else _failure(n, "eigh", "float32 failed")
        for root, ok in zip(roots.double().unbind(), fine)
    ]
    return _retried(found, a, inverse_roots, exponent, epsilon, "eigh", failure_threshold)


def _retried(
    found: list[RootResult], a: torch.Tensor, again: Callable[..., list[RootResult]], *args: Any
) -> list[RootResult]:
    """``found`` with its failed rows solved again by ``again(a[rows], *args)`` (float64, one
    batch); ``retried``: those whose float64 input is finite (else float64 fails them too)."""
    rows = [i for i, f in enumerate(found) if not f.ok]
    if not rows:
        return found
    out = list(found)
    for i, result, finite in zip(rows, again(a[rows], *args), finite_rows(a[rows])):
        out[i] = replace(result, retried=finite)
    return out


def _check_dtype(dtype: torch.dtype, method: str) -> None:
    if dtype not in ROOT_DTYPES:
        raise ValueError(f"dtype must be one of {ROOT_DTYPES}, got {dtype!r}")
    if dtype == torch.float32 and method != "eigh":
        raise ValueError(f"float32 roots are solved by eigh only, got method {method!r}")


def _check_arguments(
    matrix: torch.Tensor, exponent: float, epsilon: float, method: str, failure_threshold: float
) -> None:
    """Raise ValueError for arguments (not values) that no method can handle."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be a square 2-D tensor, got shape {tuple(matrix.shape)}")
    if matrix.is_complex():
        raise ValueError(f"matrix must be real, got dtype {matrix.dtype}")
    if not (math.isfinite(exponent) and exponent > 0):
        raise ValueError(f"exponent must be finite and > 0, got {exponent!r}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    if method not in ROOT_METHODS:
        raise ValueError(f"method must be one of {ROOT_METHODS}, got {method!r}")
    if method == "newton" and not float(exponent).is_integer():
        raise ValueError(f"exponent must be an integer for method 'newton', got {exponent!r}")
    if method == "cholesky" and exponent != 1:
        raise ValueError(f"exponent must be 1 for method 'cholesky', got {exponent!r}")
    if not failure_threshold > 0:
        raise ValueError(f"failure_threshold must be > 0, got {failure_threshold!r}")


def _failure(n: int, method: str, reason: str) -> RootResult:
    """A failed result whose root is all NaN."""
    root = torch.full((n, n), math.nan, dtype=torch.float64)
    return RootResult(root=root, ok=False, error=math.nan, reason=reason, method=method)


def _all_finite(x: torch.Tensor) -> bool:
    """True iff x has no NaN or ±Inf (a sum is finite unless an entry is, or it overflows)."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def _symmetrized(x: torch.Tensor) -> torch.Tensor:
    """(X + Xᵀ)/2 as 0.5·Xᵀ + 0.5·X (exact halvings), always row-major: the layout selects the
    BLAS code path, hence the bits of everything computed from it."""
    halved = torch.mul(x.mT, 0.5, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return halved.add_(x, alpha=0.5)


def _gram(w: torch.Tensor) -> torch.Tensor:
    """W Wᵀ, exactly symmetric: W = [W₁; W₂] gives blocks W₁W₁ᵀ, W₁W₂ᵀ, (W₁W₂ᵀ)ᵀ, W₂W₂ᵀ, the
    off-diagonal one computed once (≈ n³ flops, not 2n³); diagonal blocks recurse."""
    n = w.shape[0]
    if n <= GRAM_BLOCK:
        return _symmetrized(w @ w.mT)
    out = torch.empty(n, n, dtype=w.dtype)
    _gram_into(w, out)
    return out


def _gram_into(w: torch.Tensor, out: torch.Tensor) -> None:
    """out <- W Wᵀ (see `_gram`), writing the blocks into the views of out."""
    half = w.shape[0] // 2
    upper, lower = w[:half], w[half:]
    torch.mm(upper, lower.mT, out=out[:half, half:])
    out[half:, :half] = out[:half, half:].mT
    for block, diagonal in ((upper, out[:half, :half]), (lower, out[half:, half:])):
        if half <= GRAM_BLOCK:
            diagonal.copy_(_symmetrized(block @ block.mT))
        else:
            _gram_into(block, diagonal)


def _eigh_root(
    regularized: torch.Tensor, exponent: float, epsilon: float, failure_threshold: float
) -> RootResult:
    """X = Q diag(λ^(-1/p)) Qᵀ from A + εI = Q diag(λ) Qᵀ, after λ <- λ - λ_min + ε if λ_min < ε,
    as W Wᵀ with W = Q diag(λ^(-1/(2p))) (symmetric by construction)."""
    n = regularized.shape[0]
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(regularized)
    except RuntimeError as exc:  # includes torch.linalg.LinAlgError
        reason = f"eigh failed ({str(exc).splitlines()[0]})"
        return _eigh_fallback(regularized, exponent, failure_threshold, reason)
    if not _all_finite(eigenvalues):
        return _eigh_fallback(regularized, exponent, failure_threshold, "eigh returned non-finite")
    smallest = float(eigenvalues[0])
    if smallest < epsilon:
        eigenvalues = (eigenvalues - smallest) + epsilon  # the smallest becomes exactly ε
        smallest = epsilon
    if not smallest > 0:
        return _failure(n, "eigh", "singular matrix (smallest eigenvalue <= 0 and epsilon 0)")
    if -math.log(smallest) / exponent > MAX_LOG_ROOT:  # |X_ij| <= λ_min^(-1/p) would overflow
        return _failure(n, "eigh", "root overflows float64")
    scaled = eigenvectors.mul_(eigenvalues.pow(-0.5 / exponent))
    if not _all_finite(scaled):  # the powers are finite here, so Q is not
        return _eigh_fallback(regularized, exponent, failure_threshold, "eigh returned non-finite")
    root = _gram(scaled)
    return RootResult(root=root, ok=True, error=0.0, reason="", method="eigh")


def _eigh_fallback(
    regularized: torch.Tensor, exponent: float, failure_threshold: float, reason: str
) -> RootResult:
    """After eigh failed: newton for integer exponents, else ok=False."""
    n = regularized.shape[0]
    if not float(exponent).is_integer():
        return _failure(n, "eigh", reason)
    fallback = _newton_root(regularized, int(exponent), failure_threshold)
    return fallback if fallback.ok else replace(fallback, reason=f"{reason}; {fallback.reason}")


def _newton_root(regularized: torch.Tensor, p: int, failure_threshold: float) -> RootResult:
    """Coupled Newton iteration for X = A^(-1/p) (Guo & Higham 2006), A = regularized matrix.

    z = (1+p)/(2‖A‖_F), M₀ = zA, H₀ = z^(1/p) I; T = ((p+1)I - M)/p, M <- T^p M, H <- H T, so
    M -> I, H -> A^(-1/p). Stops at max|M - I| <= NEWTON_TOLERANCE, NEWTON_MAX_ITERATIONS, or when
    ‖M - I‖_F grows more than NEWTON_MAX_GROWTH-fold (keeping the previous H). The error is
    max|H^p A - I|: for a numerically singular A, M can reach I while H is far off.
    """
    n = regularized.shape[0]
    largest = float(regularized.abs().max())
    if largest == 0.0:
        return _failure(n, "newton", "zero matrix (with epsilon 0) has no inverse root")
    frobenius = largest * float(torch.linalg.matrix_norm(regularized / largest))
    z = (1 + p) / (2 * frobenius)
    if not (math.isfinite(z) and z > 0):
        return _failure(n, "newton", f"matrix norm {frobenius:.3g} out of range")
    identity = torch.eye(n, dtype=torch.float64)
    m = z * regularized
    h = z ** (1.0 / p) * identity
    residual = m - identity
    err, distance = float(residual.abs().max()), float(torch.linalg.matrix_norm(residual))
    for _ in range(NEWTON_MAX_ITERATIONS):
        if err <= NEWTON_TOLERANCE:
            break
        t = ((p + 1) * identity - m) / p
        m_next = torch.linalg.matrix_power(t, p) @ m
        residual = m_next - identity
        distance_next = float(torch.linalg.matrix_norm(residual))
        if not distance_next <= NEWTON_MAX_GROWTH * distance:  # diverging or NaN: keep previous H
            break
        m, h = m_next, h @ t
        err, distance = float(residual.abs().max()), distance_next
    root = _symmetrized(h)
    if not _all_finite(root):
        reason = "newton root is not finite"
        return RootResult(root, ok=False, error=math.nan, reason=reason, method="newton")
    error = float((torch.linalg.matrix_power(root, p) @ regularized - identity).abs().max())
    if not error < failure_threshold:
        reason = f"newton did not converge (error {error:.3g})"
        return RootResult(root, ok=False, error=error, reason=reason, method="newton")
    return RootResult(root=root, ok=True, error=error, reason="", method="newton")


def _cholesky_inverse(
    regularized: torch.Tensor, epsilon: float, failure_threshold: float
) -> RootResult:
    """X = (A + εI)^(-1) = (L Lᵀ)^(-1) from the Cholesky factor; eigh if that factor fails."""
    factor, info = torch.linalg.cholesky_ex(regularized)
    if int(info) == 0:
        root = _symmetrized(torch.cholesky_inverse(factor))
        if _all_finite(root):
            return RootResult(root=root, ok=True, error=0.0, reason="", method="cholesky")
    return _eigh_root(regularized, 1.0, epsilon, failure_threshold)
