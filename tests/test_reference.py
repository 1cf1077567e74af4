"""``torch_shampoo.Shampoo`` against the plain reference in ``reference_shampoo.py``, and the
paper's claims about special cases: no preconditioning is the grafted optimizer itself, a vector
with sums of outer products is full-matrix AdaGrad, and Shampoo is equivariant to rotations.

Tolerance. Everything runs in float64, so the optimizer and the reference differ only in the
order of their floating-point operations, ~1e-16 relative per operation, amplified by the inverse
roots. The worst amplification is in blocks whose statistics are rank-deficient (a 5-vector seen
for fewer than 5 steps): rounding leaves ~1e-16·|m̂| of the step in directions no gradient has
visited, where X has eigenvalue ε^(-1/r), and it moves those eigenvalues of F/bc2 + εI by
~1e-16·|F|, i.e. by ~1e-16·|F|/ε relative. So the disagreement grows like 1/ε (measured on the
cases below: 9e-11 at ε = 1e-6, 8e-12 at 1e-5, 6e-13 at 1e-4; 1e-5 at the default 1e-12). With
``EPSILON = 1e-4`` we ask for RTOL = 1e-9, about 1000 times the measured error, and still tight
enough that a change to the rule (ε doubled, a root exponent off by 0.1, the graft's ε doubled,
roots one step late) fails by orders of magnitude. Errors scale with a block, not with an entry,
so the absolute tolerance is RTOL times the largest entry of the compared steps.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from reference_shampoo import ReferenceShampoo

from torch_shampoo import Shampoo
from torch_shampoo.layout.blocking import block_layout

RTOL = 1e-9
EPSILON = 1e-4
BLOCK_SIZE = 8
MAX_FACTOR_DIM = 12
STEPS = 10

MODEL_SHAPES = {
    "scalar": (),
    "vector": (5,),
    "vector longer than max_factor_dim": (20,),  # unfactored: no preconditioner at all
    "matrix cut into two blocks": (10, 6),  # 10 > block_size
    "3-d": (3, 4, 5),
    "conv": (6, 2, 2, 2),  # merged to (6, 8)
    "embedding": (16, 5),  # 16 > max_factor_dim: one-sided
    "with a size-1 dim": (3, 1, 7),
    "small 3-d": (2, 2, 2),  # ≤ block_size elements: (2, 4); merge_dims="all": (8,)
}


def make_params(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64)
        for shape in MODEL_SHAPES.values()
    ]


def make_grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(shape, generator=generator, dtype=torch.float64)
            for shape in MODEL_SHAPES.values()
        ]
        for _ in range(steps)
    ]


def assert_same_steps(
    actual: torch.Tensor, expected: torch.Tensor, start: torch.Tensor, what: str
) -> None:
    """Compare the distance travelled from ``start``: elementwise to RTOL, and absolutely to
    RTOL times the largest distance (rounding errors scale with the block, not the entry)."""
    actual_step, expected_step = actual - start, expected - start
    scale = expected_step.abs().max().item() if expected_step.numel() else 0.0
    torch.testing.assert_close(
        actual_step, expected_step, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}"
    )


def test_the_model_has_every_kind_of_block() -> None:
    """The shapes above really exercise what the names say, with these block settings."""
    layouts = {
        name: block_layout(shape, BLOCK_SIZE, MAX_FACTOR_DIM)
        for name, shape in MODEL_SHAPES.items()
    }
    assert layouts["scalar"].shape == (1,)
    assert layouts["vector longer than max_factor_dim"].factored == (False,)
    assert layouts["matrix cut into two blocks"].num_blocks == 2
    assert layouts["3-d"].shape == (3, 4, 5)
    assert layouts["3-d"].factored == (True, True, True)
    assert layouts["conv"].shape == (6, 8)
    assert layouts["embedding"].factored == (False, True)
    assert layouts["with a size-1 dim"].shape == (3, 7)
    assert layouts["small 3-d"].shape == (2, 4)
    assert block_layout((2, 2, 2), BLOCK_SIZE, MAX_FACTOR_DIM, "all").shape == (8,)
    assert block_layout((2, 2, 2), BLOCK_SIZE, MAX_FACTOR_DIM, False).shape == (2, 2, 2)


# --- the optimizer follows the rule ---------------------------------------------------------------

OPTIONS = (
    "beta2",
    "frequency",
    "grafting",
    "weight_decay",
    "momentum",
    "maximize",
    "bias_correction",
)
OPTION_VALUES: dict[str, list[Any]] = {
    "beta2": [0.99, 1.0],
    "frequency": [1, 3],
    "grafting": ["adam", "adagrad", "rmsprop", "sgd", "none"],
    "weight_decay": ["decoupled", "coupled"],
    "momentum": ["off", "heavy-ball", "nesterov"],
    "maximize": [False, True],
    "bias_correction": [True, False],
}
# Every pair of values of every two options appears in some row (checked below): 15 rows instead
# of the 480 of the full product.
PAIRWISE_CASES = [
    (1.0, 3, "none", "decoupled", "off", True, False),
    (0.99, 1, "rmsprop", "coupled", "heavy-ball", True, True),
    (0.99, 1, "adam", "decoupled", "nesterov", False, False),
    (1.0, 3, "sgd", "coupled", "nesterov", False, True),
    (0.99, 1, "adagrad", "coupled", "off", False, False),
    (1.0, 3, "adagrad", "decoupled", "heavy-ball", False, True),
    (1.0, 1, "adam", "coupled", "off", True, True),
    (0.99, 3, "sgd", "decoupled", "heavy-ball", True, False),
    (1.0, 3, "rmsprop", "decoupled", "nesterov", False, False),
    (0.99, 1, "none", "coupled", "nesterov", True, True),
    (1.0, 3, "adam", "decoupled", "heavy-ball", False, True),
    (1.0, 1, "adagrad", "decoupled", "nesterov", True, False),
    (1.0, 1, "sgd", "decoupled", "off", False, True),
    (1.0, 1, "none", "coupled", "heavy-ball", False, True),
    (0.99, 3, "rmsprop", "decoupled", "off", False, True),
]


def hyperparameters(case: tuple[Any, ...]) -> dict[str, Any]:
    option = dict(zip(OPTIONS, case, strict=True))
    return dict(
        lr=0.1,
        betas=(0.9, option["beta2"]),
        epsilon=EPSILON,
        weight_decay=0.05,
        decoupled_weight_decay=option["weight_decay"] == "decoupled",
        momentum=0.0 if option["momentum"] == "off" else 0.8,
        nesterov=option["momentum"] == "nesterov",
        block_size=BLOCK_SIZE,
        max_factor_dim=MAX_FACTOR_DIM,
        precondition_frequency=option["frequency"],
        bias_correction=option["bias_correction"],
        grafting=option["grafting"],
        grafting_beta2=0.95,  # ≠ β₂, so that mixing the two up shows
        grafting_epsilon=1e-8,
        maximize=option["maximize"],
    )


# Options the pairwise table leaves at one value, each changed once.
EXTRA_CASES = {
    "root_exponent given": dict(root_exponent=2.5),
    "start before frequency": dict(start_preconditioning_step=2, precondition_frequency=3),
    "start after frequency": dict(start_preconditioning_step=4, precondition_frequency=2),
    "beta1 = 0": dict(betas=(0.0, 0.99)),
    "no weight decay": dict(weight_decay=0.0),
    "epsilon 1e-6": dict(epsilon=1e-6),  # with β₂ < 1: F/bc2 + εI, not (F + εI)/bc2
    "merge_dims all": dict(merge_dims="all"),  # the small 3-d as (8,)
    "merge_dims off": dict(merge_dims=False),  # the conv as (6, 2, 2, 2)
    "vectors unfactored": dict(precondition_1d=False),  # the vectors take the graft's step
}


def test_pairwise_cases_cover_every_pair_of_option_values() -> None:
    for first, second in itertools.combinations(range(len(OPTIONS)), 2):
        seen = {(case[first], case[second]) for case in PAIRWISE_CASES}
        for pair in itertools.product(
            OPTION_VALUES[OPTIONS[first]], OPTION_VALUES[OPTIONS[second]]
        ):
            assert pair in seen, f"{OPTIONS[first]}, {OPTIONS[second]} = {pair} is never tested"


def run_against_reference(
    kwargs: dict[str, Any], steps: int = STEPS, compact_state: bool = False
) -> None:
    """The optimizer against the reference, step by step; ``compact_state``: the optimizer
    keeps each factor and root as two triangles of one tensor (how it stores them is not part
    of the rule, so the reference does not take it)."""
    initial = make_params()
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    reference_params = [p.clone() for p in initial]
    optimizer = Shampoo(params, async_roots=False, compact_state=compact_state, **kwargs)
    reference = ReferenceShampoo(reference_params, **kwargs)
    for step, grads in enumerate(make_grads(steps), start=1):
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
        reference.step(grads)
        for name, param, expected, start in zip(
            MODEL_SHAPES, params, reference_params, initial, strict=True
        ):
            assert_same_steps(param.detach(), expected, start, f"step {step}, {name}")


@pytest.mark.parametrize("compact_state", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize(
    "case", PAIRWISE_CASES, ids=lambda case: "-".join(str(value) for value in case)
)
def test_optimizer_follows_the_update_rule(case: tuple[Any, ...], compact_state: bool) -> None:
    run_against_reference(hyperparameters(case), compact_state=compact_state)


@pytest.mark.parametrize("compact_state", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("change", EXTRA_CASES.values(), ids=EXTRA_CASES.keys())
def test_optimizer_follows_the_update_rule_with_other_settings(
    change: dict[str, Any], compact_state: bool
) -> None:
    kwargs = hyperparameters(PAIRWISE_CASES[2]) | change  # adam, β₂ < 1, frequency 1
    run_against_reference(kwargs, compact_state=compact_state)


# --- no preconditioning: Shampoo is its graft ---------------------------------------------------

NEVER = 10**6
GRAFT_EQUIVALENTS = {
    "adam": (
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05),
        dict(betas=(0.9, 0.99), grafting="adam", weight_decay=0.05, decoupled_weight_decay=False),
    ),
    "adamw, maximize": (
        lambda p: torch.optim.AdamW(
            p, lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05, maximize=True
        ),
        dict(betas=(0.8, 0.99), grafting="adam", weight_decay=0.05, maximize=True),
    ),
    "adagrad": (
        lambda p: torch.optim.Adagrad(p, lr=0.01, eps=1e-8, weight_decay=0.05),
        dict(
            betas=(0.0, 0.99), grafting="adagrad", weight_decay=0.05, decoupled_weight_decay=False
        ),
    ),
    "rmsprop with momentum": (
        lambda p: torch.optim.RMSprop(
            p, lr=0.01, alpha=0.95, eps=1e-8, weight_decay=0.05, momentum=0.5
        ),
        dict(
            betas=(0.0, 0.99),
            grafting="rmsprop",
            weight_decay=0.05,
            decoupled_weight_decay=False,
            momentum=0.5,
        ),
    ),
    "sgd": (
        lambda p: torch.optim.SGD(p, lr=0.01),
        dict(betas=(0.0, 0.99), grafting="sgd"),
    ),
    "sgd, nesterov momentum, weight decay, maximize": (
        lambda p: torch.optim.SGD(
            p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True
        ),
        dict(
            betas=(0.0, 0.99),
            grafting="sgd",
            momentum=0.9,
            nesterov=True,
            weight_decay=0.05,
            decoupled_weight_decay=False,
            maximize=True,
        ),
    ),
}


@pytest.mark.parametrize(
    ("make_torch_optimizer", "shampoo_kwargs"),
    GRAFT_EQUIVALENTS.values(),
    ids=GRAFT_EQUIVALENTS.keys(),
)
def test_without_preconditioning_shampoo_is_its_graft(
    make_torch_optimizer: Any, shampoo_kwargs: dict[str, Any]
) -> None:
    initial = make_params()
    ours = [torch.nn.Parameter(p.clone()) for p in initial]
    theirs = [torch.nn.Parameter(p.clone()) for p in initial]
    shampoo = Shampoo(
        ours,
        lr=0.01,
        epsilon=EPSILON,
        block_size=BLOCK_SIZE,
        max_factor_dim=MAX_FACTOR_DIM,
        precondition_frequency=NEVER,
        start_preconditioning_step=NEVER,
        grafting_beta2=0.95,
        grafting_epsilon=1e-8,
        async_roots=False,
        **shampoo_kwargs,
    )
    torch_optimizer = make_torch_optimizer(theirs)
    for step, grads in enumerate(make_grads(20), start=1):
        for mine, other, grad in zip(ours, theirs, grads, strict=True):
            mine.grad = grad.clone()
            other.grad = grad.clone()
        shampoo.step()
        torch_optimizer.step()
        for name, mine, other, start in zip(MODEL_SHAPES, ours, theirs, initial, strict=True):
            assert_same_steps(mine.detach(), other.detach(), start, f"step {step}, {name}")


# --- a vector with sums of outer products is full-matrix AdaGrad ----------------------------------


@pytest.mark.parametrize("bias_correction", [True, False])
def test_vector_shampoo_is_full_matrix_adagrad(bias_correction: bool) -> None:
    """With β = (0, 1), no graft and roots every step, a vector moves by lr·(Σ ggᵀ + εI)^(-1/2) g.

    Bias correction is then a no-op (1 − 0ᵗ = 1, and β₂ = 1 means plain sums)."""
    size, lr, epsilon = 6, 0.1, 1e-4
    generator = torch.Generator().manual_seed(3)
    param = torch.nn.Parameter(torch.randn(size, generator=generator, dtype=torch.float64))
    optimizer = Shampoo(
        [param],
        lr=lr,
        betas=(0.0, 1.0),
        epsilon=epsilon,
        momentum=0.0,
        grafting="none",
        precondition_frequency=1,
        bias_correction=bias_correction,
        async_roots=False,
    )
    outer_products = torch.zeros(size, size, dtype=torch.float64)
    for _ in range(12):
        g = torch.randn(size, generator=generator, dtype=torch.float64)
        outer_products += torch.outer(g, g)
        a = outer_products + epsilon * torch.eye(size, dtype=torch.float64)
        eigenvalues, eigenvectors = torch.linalg.eigh(a)
        expected = lr * eigenvectors @ (eigenvalues**-0.5 * (eigenvectors.T @ g))

        before = param.detach().clone()
        param.grad = g.clone()
        optimizer.step()
        update = before - param.detach()
        torch.testing.assert_close(update, expected, rtol=RTOL, atol=RTOL * lr)
        # The same without eigenvectors: u = lr·A^(-1/2) g has |u|² = lr²·gᵀ A⁻¹ g.
        squared_norm = lr**2 * g @ torch.linalg.solve(a, g)
        assert math.isclose(update @ update, squared_norm.item(), rel_tol=1e-8)


# --- rotation equivariance -----------------------------------------------------------------------


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


ROTATION_CASES = {
    "no graft": dict(grafting="none", betas=(0.9, 1.0)),
    "sgd graft, decoupled weight decay, nesterov": dict(
        grafting="sgd", weight_decay=0.1, momentum=0.5, nesterov=True
    ),
    "sgd graft, coupled weight decay, maximize": dict(
        grafting="sgd", weight_decay=0.1, decoupled_weight_decay=False, maximize=True
    ),
}


def rotated_runs(kwargs: dict[str, Any], steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Train W on gradients G_t and W' = U W Vᵀ on U G_t Vᵀ. Returns (U (W_T − W_0) Vᵀ,
    W'_T − W'_0); equivariance says they are equal."""
    rows, cols = 6, 5
    options = dict(lr=0.1, epsilon=EPSILON, block_size=6, precondition_frequency=1) | kwargs
    layout = block_layout((rows, cols), options["block_size"], 8192)
    assert layout.num_blocks == 1 and layout.factored == (True, True), "one 2-D block"

    generator = torch.Generator().manual_seed(4)
    u, v = random_orthogonal(rows, generator), random_orthogonal(cols, generator)
    w0 = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    plain = torch.nn.Parameter(w0.clone())
    rotated = torch.nn.Parameter(u @ w0 @ v.T)
    plain_optimizer = Shampoo([plain], async_roots=False, **options)
    rotated_optimizer = Shampoo([rotated], async_roots=False, **options)
    for _ in range(steps):
        g = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        plain.grad = g
        rotated.grad = u @ g @ v.T
        plain_optimizer.step()
        rotated_optimizer.step()
    return u @ (plain.detach() - w0) @ v.T, rotated.detach() - u @ w0 @ v.T


@pytest.mark.parametrize("kwargs", ROTATION_CASES.values(), ids=ROTATION_CASES.keys())
def test_shampoo_is_equivariant_to_rotations(kwargs: dict[str, Any]) -> None:
    """Feeding U G Vᵀ instead of G (U, V orthogonal) rotates the steps the same way."""
    expected, actual = rotated_runs(kwargs)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


def test_elementwise_adam_graft_is_not_equivariant() -> None:
    """The check above can fail: Adam's per-entry scaling does not commute with rotations."""
    expected, actual = rotated_runs(dict(grafting="adam"))
    assert not torch.allclose(actual, expected, rtol=1e-3, atol=0.0)
