"""Property tests for torch_shampoo.roots.matrix_roots: arguments refused by name, dtypes, symmetry
and determinism (bitwise, across batches and threads); accuracy: test_matrix_roots.py."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matrix_roots_helpers import EXPONENTS, Case, cases, methods_for, random_orthogonal

from torch_shampoo.roots.matrix_roots import (
    ROOT_METHODS,
    eigenbases,
    finite_rows,
    inverse_root,
    inverse_roots,
)

# ---------------------------------------------------------------------------------------------
# Arguments, dtypes, symmetry, determinism


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"exponent": 0.0}, "exponent"),
        ({"exponent": -2.0}, "exponent"),
        ({"exponent": math.nan}, "exponent"),
        ({"exponent": math.inf}, "exponent"),
        ({"epsilon": -1e-12}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"method": "svd"}, "method"),
        ({"method": "newton", "exponent": 2.5}, "exponent"),
        ({"method": "cholesky", "exponent": 2.0}, "exponent"),
        ({"matrix": torch.ones(2, 3)}, "matrix"),
        ({"matrix": torch.ones(3)}, "matrix"),
        ({"matrix": torch.ones(2, 2, 2)}, "matrix"),
        ({"failure_threshold": 0.0}, "failure_threshold"),
        ({"failure_threshold": math.nan}, "failure_threshold"),
        ({"matrix": torch.eye(2, dtype=torch.complex128)}, "matrix"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(
    kwargs: dict[str, object], argument: str
) -> None:
    """Invalid arguments (not values) raise ValueError whose message names the argument."""
    arguments: dict[str, object] = {"matrix": torch.eye(3), "exponent": 2.0, "epsilon": 1e-6}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        inverse_root(**arguments)  # type: ignore[arg-type]


def test_unknown_method_message_lists_valid_choices() -> None:
    with pytest.raises(ValueError) as info:
        inverse_root(torch.eye(2), 2, 0.0, "svd")
    assert all(name in str(info.value) for name in ROOT_METHODS)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: inverse_roots(torch.eye(3), 2.0, 1e-6), r"\(k, n, n\) stack, got shape \(3, 3\)"),
        (lambda: eigenbases(torch.eye(3)), r"\(k, n, n\) stack, got shape \(3, 3\)"),
        (lambda: inverse_roots(torch.eye(3)[None], 2.0, 1e-6, dtype=torch.float16),
         r"dtype must be one of .*, got torch.float16"),
        (lambda: eigenbases(torch.eye(3)[None], torch.bfloat16),
         r"dtype must be one of .*, got torch.bfloat16"),
        (lambda: inverse_roots(torch.eye(3)[None], 2.0, 1e-6, "newton", dtype=torch.float32),
         r"float32 roots are solved by eigh only, got method 'newton'"),
    ],
    ids=["roots-of-a-matrix", "bases-of-a-matrix", "float16-roots", "bfloat16-bases",
         "float32-newton"],
)  # fmt: skip
def test_the_batched_functions_refuse_a_bad_stack_or_dtype_naming_it(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_an_empty_stack_has_no_bases() -> None:
    assert eigenbases(torch.zeros(0, 3, 3)) == []


def test_a_root_beyond_float64s_range_is_a_failure_not_an_inf() -> None:
    """λ_min = 1e-320 with ε = 0 and p = 1: its root entry 1e320 would overflow float64."""
    result = inverse_root(torch.diag(torch.tensor([1.0, 1e-320], dtype=torch.float64)), 1, 0.0)
    assert not result.ok and "overflows float64" in result.reason


def test_empty_matrix_has_empty_root() -> None:
    result = inverse_root(torch.zeros(0, 0), 2, 1e-6)
    assert result.ok and result.root.shape == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_is_converted_to_float64_cpu(dtype: torch.dtype) -> None:
    """Any float dtype gives a float64 CPU root bitwise equal to passing the float64 matrix."""
    matrix = (random_orthogonal(6, seed=1) * torch.linspace(1, 2, 6, dtype=torch.float64)).to(dtype)
    matrix = matrix @ matrix.mT
    result = inverse_root(matrix, 4, 1e-3)
    assert result.root.dtype == torch.float64 and result.root.device.type == "cpu"
    assert torch.equal(result.root, inverse_root(matrix.double(), 4, 1e-3).root)


@settings(max_examples=20, deadline=None)
@given(case=cases(max_size=24, max_log_condition=6.0), method=st.sampled_from(ROOT_METHODS))
def test_root_depends_only_on_symmetric_part(case: Case, method: str) -> None:
    """inverse_root(A) and inverse_root(Aᵀ) are bitwise equal and exactly symmetric."""
    generator = torch.Generator().manual_seed(case.size)
    noise = torch.randn(case.size, case.size, dtype=torch.float64, generator=generator)
    matrix = case.matrix + 1e-3 * noise
    p = 1 if method == "cholesky" else 2
    result = inverse_root(matrix, p, case.epsilon + 0.1, method)
    transposed = inverse_root(matrix.mT, p, case.epsilon + 0.1, method)
    assert torch.equal(result.root, transposed.root)
    assert torch.equal(result.root, result.root.mT)


def assert_bitwise_reproducible(
    matrix: torch.Tensor, p: int, epsilon: float, methods: list[str]
) -> None:
    """Each method gives the same bits twice in a row and from two worker threads at once."""
    for method in methods:
        first = inverse_root(matrix, p, epsilon, method).root
        assert torch.equal(first, inverse_root(matrix, p, epsilon, method).root)
        threads = torch.get_num_threads()  # workers do not inherit it: set it explicitly
        with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            futures = [pool.submit(inverse_root, matrix, p, epsilon, method) for _ in range(4)]
            roots = [future.result().root for future in futures]
        assert all(torch.equal(first, root) for root in roots), method


@settings(max_examples=8, deadline=None)
@given(case=cases(max_size=48, max_log_condition=8.0), p=st.sampled_from(EXPONENTS))
def test_repeated_and_concurrent_calls_are_bitwise_identical(case: Case, p: int) -> None:
    """Same bits serially and from two worker threads at once, for every method.

    Bits are reproducible for one intra-op thread configuration (MKL's blocking depends on it),
    and a worker thread does not inherit torch.set_num_threads from the thread that created it.
    """
    assert_bitwise_reproducible(case.matrix, p, case.epsilon, methods_for(p))


@pytest.mark.parametrize("p", [1, 4])
def test_concurrent_calls_are_bitwise_identical_on_a_larger_matrix(
    default_thread_count: int, p: int
) -> None:
    """The same for eigh past the blocked W Wᵀ threshold, where MKL uses several threads."""
    torch.set_num_threads(default_thread_count)
    generator = torch.Generator().manual_seed(p)
    gaussian = torch.randn(300, 300, dtype=torch.float64, generator=generator)
    assert_bitwise_reproducible(gaussian @ gaussian.mT / 300, p, 1e-6, ["eigh"])


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 5),
    n=st.integers(1, 6),
    entries=st.lists(
        st.sampled_from([0.0, 1.0, -2.5, 1e308, -1e308, math.nan, math.inf, -math.inf]),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 2**16),
)
def test_finite_rows_is_the_entrywise_check_even_when_a_sum_overflows(
    k: int, n: int, entries: list[float], seed: int
) -> None:
    """The one-sum-per-matrix check answers as torch.isfinite on every entry would, also for
    finite entries whose sum overflows (±1e308 twice) and for +inf beside -inf."""
    gen = torch.Generator().manual_seed(seed)
    stack = torch.randn(k, n, n, generator=gen, dtype=torch.float64)
    flat = stack.view(-1)
    where = torch.randint(0, flat.numel(), (len(entries),), generator=gen)
    for i, value in zip(where.tolist(), entries):
        flat[i] = value
    expected = [bool(torch.isfinite(matrix).all()) for matrix in stack]
    assert finite_rows(stack) == expected
