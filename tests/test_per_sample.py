"""PerSampleFisher against brute-force per-sample gradients from torch.func (float64)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from torch_shampoo.per_sample import PerSampleFisher

SETTINGS = settings(max_examples=12, deadline=None)


def assert_fisher(actual: Tensor | None, expected: Tensor) -> None:
    """``actual`` is a captured F equal to ``expected`` to 1e-10."""
    assert actual is not None
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def sample_loss(out: Tensor, target: Tensor) -> Tensor:
    """ℓ_i = ½‖tanh(out_i) − y_i‖² per sample: (B, …) → (B,)."""
    return 0.5 * (out.tanh() - target).pow(2).flatten(1).sum(1)


def backward(model: nn.Module, x: Tensor, target: Tensor, reduction: str = "mean") -> None:
    """One backward of the batch loss, mean or sum of ℓ_i."""
    losses = sample_loss(model(x), target)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()


def brute_force(
    model: nn.Module, x: Tensor, target: Tensor, weight: str | None, bias: str | None
) -> Tensor:
    """F = (1/B) Σ_i G_i G_iᵀ from per-sample gradients G_i = [∂ℓ_i/∂W  ∂ℓ_i/∂b]."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return sample_loss(out, yi.unsqueeze(0)).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    cols = [
        grads[k].flatten(2) if k == weight else grads[k][..., None] for k in (weight, bias) if k
    ]
    g = torch.cat(cols, dim=2)
    return torch.einsum("bij,bkj->ik", g, g) / x.shape[0]


def check_layer(layer: nn.Linear | nn.Conv2d, x: Tensor, reduction: str) -> None:
    """Hooked F (via weight and bias) equals brute force for a single-layer model."""
    target = torch.randn_like(layer(x))
    expected = brute_force(layer, x, target, "weight", "bias" if layer.bias is not None else None)
    fisher = PerSampleFisher(layer, reduction=reduction)
    backward(layer, x, target, reduction)
    f_weight = fisher.pop(layer.weight)
    assert f_weight is not None and f_weight.dtype == torch.float64
    assert_fisher(f_weight, expected)
    if layer.bias is not None:
        f_bias = fisher.pop(layer.bias)
        assert f_bias is not None and f_bias is not f_weight
        assert_fisher(f_bias, expected)
    assert fisher.pop(layer.weight) is None


@SETTINGS
@given(
    batch=st.integers(1, 5),
    n=st.integers(1, 6),
    m=st.integers(1, 5),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_linear_2d(batch: int, n: int, m: int, bias: bool, reduction: str) -> None:
    layer = nn.Linear(n, m, bias=bias, dtype=torch.float64)
    check_layer(layer, torch.randn(batch, n, dtype=torch.float64), reduction)


@SETTINGS
@given(
    batch=st.integers(1, 4),
    middle=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    n=st.integers(1, 5),
    m=st.integers(1, 5),
    bias=st.booleans(),
)
def test_linear_nd(batch: int, middle: list[int], n: int, m: int, bias: bool) -> None:
    # Covers both routes: T > 1 with small m·n (Gram) and T = 1 middle dims.
    layer = nn.Linear(n, m, bias=bias, dtype=torch.float64)
    check_layer(layer, torch.randn(batch, *middle, n, dtype=torch.float64), "mean")


def test_linear_nd_outer_route() -> None:
    # T = 40 positions vs n = m = 2: the per-sample outer product G_i G_iᵀ is cheaper.
    layer = nn.Linear(2, 2, dtype=torch.float64)
    check_layer(layer, torch.randn(3, 40, 2, dtype=torch.float64), "sum")


@SETTINGS
@given(
    batch=st.integers(1, 3),
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 4),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bias=st.booleans(),
)
def test_conv2d(
    batch: int,
    c_in: int,
    c_out: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    bias: bool,
) -> None:
    conv = nn.Conv2d(
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
        dtype=torch.float64,
    )
    check_layer(conv, torch.randn(batch, c_in, 7, 6, dtype=torch.float64), "mean")


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv2d_string_padding(padding: str) -> None:
    # Even kernel with "same": asymmetric padding, the extra row/column on the bottom/right.
    conv = nn.Conv2d(2, 3, (2, 4), padding=padding, dilation=(1, 2), dtype=torch.float64)
    check_layer(conv, torch.randn(2, 2, 5, 9, dtype=torch.float64), "mean")


def test_conv2d_gram_route() -> None:
    # Kernel covering the input: one position per sample, so the T×T Gram route is cheaper.
    conv = nn.Conv2d(3, 4, 3, dtype=torch.float64)
    check_layer(conv, torch.randn(5, 3, 3, 3, dtype=torch.float64), "mean")


def test_chunked_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # A one-element budget processes the batch one sample at a time, with weight sharing.
    monkeypatch.setattr("torch_shampoo.per_sample._CHUNK_ELEMENTS", 1)
    test_weight_sharing_is_exact()
    check_layer(
        nn.Conv2d(2, 3, 2, bias=True, dtype=torch.float64),
        torch.randn(3, 2, 4, 5, dtype=torch.float64),
        "sum",
    )


def test_lazy_params_rejected() -> None:
    with pytest.raises(ValueError, match="uninitialized"):
        PerSampleFisher(nn.LazyLinear(2))


@pytest.mark.parametrize(
    "layer, shape",
    [(nn.Linear(3, 2), (3,)), (nn.Conv2d(2, 3, 2), (2, 4, 4))],
    ids=["linear", "conv"],
)
def test_unbatched_input_is_one_sample(
    layer: nn.Linear | nn.Conv2d, shape: tuple[int, ...]
) -> None:
    layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    target = torch.randn_like(layer(x))
    expected = brute_force(layer, x[None], target[None], "weight", "bias")
    fisher = PerSampleFisher(layer)
    sample_loss(layer(x)[None], target[None]).mean().backward()
    assert_fisher(fisher.pop(layer.weight), expected)


def two_layer_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64),
        nn.ReLU(inplace=True),  # in-place op on a hooked output
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5, dtype=torch.float64),
    )


def test_two_layers_only_listed_params_hooked() -> None:
    model = two_layer_model()
    conv, linear = model.get_submodule("0"), model.get_submodule("3")
    conv_w, conv_b = model.get_parameter("0.weight"), model.get_parameter("0.bias")
    linear_w, linear_b = model.get_parameter("3.weight"), model.get_parameter("3.bias")
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    target = torch.randn(4, 5, dtype=torch.float64)
    f_conv_expected = brute_force(model, x, target, "0.weight", None)
    f_linear_expected = brute_force(model, x, target, None, "3.bias")
    # Conv: weight only (bias not folded); Linear: bias only (F = mean of g_i g_iᵀ, g_i = δ_i).
    fisher = PerSampleFisher(model, params=[conv_w, linear_b])
    assert fisher.owner(conv_w) is conv and fisher.owner(linear_b) is linear
    assert fisher.owner(conv_b) is None and fisher.owner(linear_w) is None
    assert fisher.unsupported() == []
    backward(model, x, target)
    assert fisher.pop(conv_b) is None and fisher.pop(linear_w) is None
    assert_fisher(fisher.pop(conv_w), f_conv_expected)
    assert_fisher(fisher.pop(linear_b), f_linear_expected)


def test_all_params_of_two_layers() -> None:
    model = two_layer_model()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    target = torch.randn(3, 5, dtype=torch.float64)
    expected = {i: brute_force(model, x, target, f"{i}.weight", f"{i}.bias") for i in (0, 3)}
    fisher = PerSampleFisher(model)
    backward(model, x, target)
    for idx in (0, 3):
        for kind in ("weight", "bias"):
            assert_fisher(fisher.pop(model.get_parameter(f"{idx}.{kind}")), expected[idx])


def test_reduction_mean_vs_sum() -> None:
    model = nn.Linear(4, 3, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64)
    target = torch.randn(6, 3, dtype=torch.float64)
    expected = brute_force(model, x, target, "weight", "bias")
    results: dict[tuple[str, str], Tensor | None] = {}
    for loss_reduction, hook_reduction in [("mean", "mean"), ("sum", "sum"), ("mean", "sum")]:
        fisher = PerSampleFisher(model, reduction=hook_reduction)
        backward(model, x, target, loss_reduction)
        results[loss_reduction, hook_reduction] = fisher.pop(model.weight)
        fisher.remove()
    assert_fisher(results["mean", "mean"], expected)
    assert_fisher(results["sum", "sum"], expected)
    # Mean loss read without rescale: δ carries 1/B, so F shrinks by B².
    assert_fisher(results["mean", "sum"], expected / 36)


def test_bad_reduction() -> None:
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\), got 'avg'"):
        PerSampleFisher(nn.Linear(2, 2), reduction="avg")


def test_param_not_in_model() -> None:
    with pytest.raises(ValueError, match="not a parameter of model"):
        PerSampleFisher(nn.Linear(2, 2), params=[nn.Parameter(torch.zeros(2))])


def test_remove() -> None:
    model = nn.Linear(3, 2, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    target = torch.randn(4, 2, dtype=torch.float64)
    fisher = PerSampleFisher(model)
    pending = sample_loss(model(x), target).mean()  # forward before remove, backward after
    fisher.remove()
    fisher.remove()
    pending.backward()
    backward(model, x, target)
    assert fisher.pop(model.weight) is None and fisher.pop(model.bias) is None
    assert not model._forward_hooks and not model._forward_hooks_with_kwargs
    assert not model.weight._post_accumulate_grad_hooks


def test_unsupported() -> None:
    model = nn.Module()
    model.emb = nn.Embedding(5, 4)
    model.grouped = nn.Conv2d(4, 4, 3, groups=2)
    model.conv1d = nn.Conv1d(2, 2, 3)
    model.reflect = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    model.norm = nn.LayerNorm(4)
    model.attn = nn.MultiheadAttention(4, 2)
    model.head = nn.Linear(4, 5)
    model.head.weight = model.emb.weight  # tied: gradient also flows through the embedding
    model.frozen = nn.Conv1d(2, 2, 3).requires_grad_(False)
    model.ok = nn.Linear(2, 2)
    model.scale = nn.Parameter(torch.ones(1))
    fisher = PerSampleFisher(model)
    expected = [
        "Module",
        "emb",
        "grouped",
        "conv1d",
        "reflect",
        "norm",
        "attn",
        "attn.out_proj",
        "head",
    ]
    assert fisher.unsupported() == expected
    assert fisher.owner(model.ok.weight) is model.ok
    assert fisher.owner(model.attn.out_proj.weight) is None
    only = PerSampleFisher(model, params=[model.ok.weight, model.norm.weight])
    assert only.unsupported() == ["norm"]


def test_accumulation_is_sample_weighted_average() -> None:
    model = nn.Linear(3, 2, dtype=torch.float64)
    x1, x2 = torch.randn(2, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    y1, y2 = torch.randn(2, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    f1 = brute_force(model, x1, y1, "weight", "bias")
    f2 = brute_force(model, x2, y2, "weight", "bias")
    expected = (2 * f1 + 5 * f2) / 7
    fisher = PerSampleFisher(model)
    backward(model, x1, y1)
    backward(model, x2, y2)
    assert_fisher(fisher.pop(model.weight), expected)
    assert_fisher(fisher.pop(model.bias), expected)
    assert fisher.pop(model.weight) is None


def test_partial_pop_cleared_by_next_forward() -> None:
    model = nn.Linear(3, 2, dtype=torch.float64)
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y1, y2 = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    expected = brute_force(model, x2, y2, "weight", "bias")
    fisher = PerSampleFisher(model)
    backward(model, x1, y1)
    first = fisher.pop(model.weight)
    assert first is not None
    assert_fisher(fisher.pop(model.weight), first)  # re-readable
    with torch.no_grad():
        model(x2)  # not a capturing forward
    assert_fisher(fisher.pop(model.weight), first)
    backward(model, x2, y2)  # bias never popped: old statistics dropped, not averaged
    assert_fisher(fisher.pop(model.bias), expected)


class Twice(nn.Module):
    """One Linear applied twice per forward (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.layer(x).tanh())


def test_weight_sharing_is_exact() -> None:
    model = Twice()
    x = torch.randn(4, 3, dtype=torch.float64)
    target = torch.randn(4, 3, dtype=torch.float64)
    expected = brute_force(model, x, target, "layer.weight", "layer.bias")
    fisher = PerSampleFisher(model)
    backward(model, x, target)
    assert_fisher(fisher.pop(model.layer.weight), expected)


def test_input_gradient_backward_not_counted() -> None:
    model = nn.Linear(3, 2, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 2, dtype=torch.float64)
    loss = sample_loss(model(x), target).mean()
    (x_grad,) = torch.autograd.grad(loss, x)
    x_adv = (x + 0.1 * x_grad).detach()
    expected = brute_force(model, x_adv, target, "weight", "bias")
    fisher = PerSampleFisher(model)
    loss = sample_loss(model(x), target).mean()
    torch.autograd.grad(loss, x)  # e.g. an adversarial step: no .grad accumulated
    backward(model, x_adv, target)
    assert_fisher(fisher.pop(model.weight), expected)


def run_grads(make: Callable[[], nn.Module], hooked: bool) -> list[Tensor]:
    torch.manual_seed(0)
    model = make()
    if hooked:
        PerSampleFisher(model)
    backward(model, torch.randn(3, 2, 4, 4), torch.randn(3, 5))
    return [p.grad for p in model.parameters() if p.grad is not None]


def test_grads_unchanged_by_hooks() -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 5))

    plain, hooked = run_grads(make, False), run_grads(make, True)
    assert len(plain) == 4 and all(torch.equal(a, b) for a, b in zip(plain, hooked, strict=True))


def test_float32_close_to_float64() -> None:
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    target = torch.randn(4, 5, dtype=torch.float64)
    model = two_layer_model()
    expected = brute_force(model, x, target, "0.weight", "0.bias")
    model.float()
    fisher = PerSampleFisher(model)
    backward(model, x.float(), target.float())
    got = fisher.pop(model.get_parameter("0.weight"))
    assert got is not None and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
