"""NG+'s per-sample statistics: the factor against the brute-force Fisher from torch.func, the bias
folded into its layer's factor, hooks attached, detached and refused, unsupported modules."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import assert_bitwise_equal, roundtrip
from ngplus_reference import (
    F64,
    PAPER,
    SYNC,
    as_matrix,
    assert_close,
    data,
    gradients,
    mean_loss_step,
    mlp,
    outer,
    sample_loss,
    snapshot,
    solve_blocks,
)
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from torch_shampoo import NGPlus


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(F64)


MODELS = {"mlp": (mlp, (4,), ["0", "2"]), "cnn": (cnn, (2, 4, 4), ["0", "3"])}



def per_sample_fisher(model: nn.Module, x: Tensor, y: Tensor, layer: str) -> Tensor:
    """(1/B) Σ_i G_i G_iᵀ with G_i = [∂ℓ_i/∂W  ∂ℓ_i/∂b] from torch.func, W as an m × n matrix."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return sample_loss(functional_call(model, p, (xi[None],)), yi[None]).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([grads[f"{layer}.weight"].flatten(2), grads[f"{layer}.bias"][..., None]], dim=2)
    return torch.einsum("bij,bkj->ik", g, g) / x.shape[0]




@pytest.mark.parametrize("how", ["model=", "attach"])
@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_factor_is_the_brute_force_fisher_with_the_bias_folded(
    name: str, how: str
) -> None:
    make, input_shape, layers = MODELS[name]
    beta, damping = 0.9, 0.1
    model = make()
    x, y = data(input_shape, 5)
    expected = {layer: per_sample_fisher(model, x, y, layer) for layer in layers}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    kwargs: dict[str, Any] = dict(
        lr=1.0,
        momentum=0.0,
        damping=damping,
        curvature_beta=beta,
        inverse_frequency=1,
        **PAPER,
        **SYNC,
    )
    if how == "model=":
        opt = NGPlus(model.parameters(), statistics="per_sample", model=model, **kwargs)
    else:
        opt = NGPlus(model.parameters(), statistics="per_sample", **kwargs).attach(model)
    with opt:
        opt.zero_grad()
        sample_loss(model(x), y).mean().backward()
        names, params = zip(*model.named_parameters())
        grads = dict(zip(names, gradients(list(params))))
        opt.step()
        for layer in layers:
            weight, bias = (
                model.get_parameter(f"{layer}.weight"),
                model.get_parameter(f"{layer}.bias"),
            )
            factor = opt.state[weight]["factors"][0]
            assert_close(factor, (1 - beta) * expected[layer])
            assert torch.equal(opt.state[bias]["factors"][0], factor)
            # The direction of W̃ = [W b] is (F + λI)⁻¹ [G g_b] with the mini-batch gradient.
            g_tilde = torch.cat(
                [as_matrix(grads[f"{layer}.weight"]), grads[f"{layer}.bias"][:, None]], dim=1
            )
            d = solve_blocks((1 - beta) * expected[layer], g_tilde, damping)
            assert_close(
                before[f"{layer}.weight"] - weight.detach(), d[:, :-1].reshape(weight.shape)
            )
            assert_close(before[f"{layer}.bias"] - bias.detach(), d[:, -1])
            # Not vacuous: the per-sample Fisher is not the mini-batch G̃ G̃ᵀ.
            assert (expected[layer] - g_tilde @ g_tilde.T).abs().max() > 1e-3


@pytest.mark.parametrize("async_roots", [False, True])
def test_a_bias_shares_its_layers_inverse_instead_of_computing_it_again(
    async_roots: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With per-sample statistics W and b of a layer have one F (b is W̃'s last column), so b
    takes W's installed inverse: no job of its own, and the same steps as an optimizer that
    computes b's inverse separately."""
    kwargs: dict[str, Any] = dict(
        lr=0.05, inverse_frequency=2, root_staleness=1, async_roots=async_roots,
        stagger_roots=False,  # (a bias of its own would get a phase of its own)
    )

    def run(share: bool) -> tuple[list[Tensor], NGPlus, nn.Module]:
        model = mlp()
        opt = NGPlus(model.parameters(), statistics="per_sample", model=model, **kwargs)
        if not share:  # the same optimizer, every parameter on its own
            monkeypatch.setattr(opt, "_leader_of", lambda p: None)
            monkeypatch.setattr(opt, "_followers_of", lambda p: [])
        for seed in range(7):
            mean_loss_step(model, opt, *data((4,), 5, seed))
        opt.close()
        return snapshot(model.parameters()), opt, model

    shared, opt, model = run(True)
    apart, separate, _ = run(False)
    for a, b in zip(shared, apart):
        assert_close(a, b, tol=1e-12)
    for layer in ("0", "2"):
        weight, bias = (model.get_parameter(f"{layer}.{k}") for k in ("weight", "bias"))
        assert opt._leader_of(bias) is weight
        for x, y in zip(opt.state[weight]["roots"], opt.state[bias]["roots"]):
            assert torch.equal(x, y)
        assert torch.equal(opt.state[bias]["has_root"], opt.state[weight]["has_root"])
    # Roots of steps 1 (at once), 2 and 4 (installed a step later), 6 (at 7): four cycles,
    # each one root per factor of the weights only; separately, the biases' too.
    weights = sum(len(opt.state[p]["factors"]) for p in model.parameters() if p.dim() > 1)
    biases = sum(len(opt.state[p]["factors"]) for p in model.parameters() if p.dim() == 1)
    assert opt.root_stats()["roots_computed"] == 4 * weights
    assert separate.root_stats()["roots_computed"] == 4 * (weights + biases)


def test_a_shared_inverse_in_flight_survives_a_checkpoint_bitwise() -> None:
    """Saved after step 4, whose weight inverse is due at 5 (the bias has none in flight of
    its own): the resumed run copies it into the bias at 5, as the uninterrupted run does."""
    kwargs: dict[str, Any] = dict(
        lr=0.05, inverse_frequency=2, root_staleness=1, statistics="per_sample"
    )
    batches = [data((4,), 5, seed) for seed in range(8)]
    model = mlp()
    with NGPlus(model.parameters(), model=model, **kwargs) as opt:
        for x, y in batches:
            mean_loss_step(model, opt, x, y)
    uninterrupted = snapshot(model.parameters())

    model = mlp()
    with NGPlus(model.parameters(), model=model, **kwargs) as opt:
        for x, y in batches[:4]:
            mean_loss_step(model, opt, x, y)
        checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    saved = checkpoint["opt"]["state"]
    assert int(saved[0]["pending_due"]) == 5 and int(saved[1]["pending_due"]) == -1
    resumed_model = mlp()
    resumed_model.load_state_dict(checkpoint["model"])
    with NGPlus(resumed_model.parameters(), model=resumed_model, **kwargs) as resumed:
        resumed.load_state_dict(checkpoint["opt"])
        for x, y in batches[4:]:
            mean_loss_step(resumed_model, resumed, x, y)
    assert_bitwise_equal(snapshot(resumed_model.parameters()), uninterrupted)


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_fisher_undoes_the_batch_mean(name: str) -> None:
    """Doubling the batch with duplicated samples leaves F unchanged (it does not shrink)."""
    make, input_shape, layers = MODELS[name]
    x, y = data(input_shape, 4)
    factors = []
    for xs, ys in [(x, y), (torch.cat([x, x]), torch.cat([y, y]))]:
        model = make()
        with NGPlus(model.parameters(), statistics="per_sample", model=model, **SYNC) as opt:
            mean_loss_step(model, opt, xs, ys)
            factors.append(
                [opt.state[model.get_parameter(f"{k}.weight")]["factors"][0] for k in layers]
            )
    for small, doubled in zip(*factors):
        assert small.abs().max() > 1e-4
        assert_close(doubled, small, tol=1e-12)


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, dtype=F64)
        self.fc = nn.Linear(4, 3, dtype=F64)

    def forward(self, idx: Tensor) -> Tensor:
        return self.fc(self.emb(idx))


class WithGroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(2, 4, 3, groups=2, dtype=F64)
        self.fc = nn.Linear(16, 3, dtype=F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.grouped(x)).flatten(1))


@pytest.mark.parametrize(
    ("make", "unsupported"), [(WithEmbedding, "emb"), (WithGroupedConv, "grouped")]
)
def test_an_unsupported_module_warns_once_and_falls_back_to_minibatch(
    make: Callable[[], nn.Module], unsupported: str
) -> None:
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(3)
    if unsupported == "emb":
        inputs = [torch.randint(0, 7, (6,), generator=gen) for _ in range(3)]
    else:
        inputs = [torch.randn(6, 2, 4, 4, generator=gen, dtype=F64) for _ in range(3)]
    targets = [torch.randn(6, 3, generator=gen, dtype=F64) for _ in range(3)]
    beta = 0.8
    with pytest.warns(UserWarning, match=unsupported) as caught:
        opt = NGPlus(
            model.parameters(), statistics="per_sample", model=model, curvature_beta=beta, **SYNC
        )
    assert len([w for w in caught if issubclass(w.category, UserWarning)]) == 1
    weight = model.get_parameter(f"{unsupported}.weight")
    fc_weight = model.get_parameter("fc.weight")
    fc_expected = per_sample_fisher(model, inputs[0], targets[0], "fc")
    with opt, warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        fisher = torch.zeros(weight.shape[0], weight.shape[0], dtype=F64)
        for t, (x, y) in enumerate(zip(inputs, targets)):
            opt.zero_grad()
            sample_loss(model(x), y).mean().backward()
            assert weight.grad is not None
            fisher = beta * fisher + (1 - beta) * outer(weight.grad)
            opt.step()
            assert_close(opt.state[weight]["factors"][0], fisher)
            if t == 0:  # the supported layer next to it still gets per-sample statistics
                assert_close(opt.state[fc_weight]["factors"][0], (1 - beta) * fc_expected)
    assert not [w for w in later if issubclass(w.category, UserWarning)]


def _hooks(model: nn.Module) -> int:
    modules = sum(len(m._forward_hooks) for m in model.modules())
    params = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    return modules + params


def test_detach_removes_the_hooks() -> None:
    model = cnn()
    with NGPlus(model.parameters(), statistics="per_sample", model=model, **SYNC) as opt:
        assert _hooks(model) > 0
        opt.detach()
        assert _hooks(model) == 0
        opt.detach()  # idempotent
        assert _hooks(model) == 0
    with NGPlus(model.parameters(), statistics="minibatch") as opt, pytest.raises(ValueError):
        opt.attach(model)
    assert _hooks(model) == 0


def test_attach_after_a_step_is_refused_and_changes_no_hooks() -> None:
    """The per-sample layout (a bias folded into its layer's factor) must be known before the
    first step made the state: a later attach() raises, leaves the hooks as they were, and
    training goes on."""
    model = mlp()
    x, y = data((4,), 8)
    with NGPlus(model.parameters(), statistics="per_sample", model=model, **SYNC) as opt:
        mean_loss_step(model, opt, x, y)
        hooks = _hooks(model)
        with pytest.raises(RuntimeError, match=r"attach\(model\) before the first step"):
            opt.attach(model)
        assert _hooks(model) == hooks > 0
        before = snapshot(model.parameters())
        mean_loss_step(model, opt, x, y)
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_per_sample_without_a_model_raises_a_clear_error() -> None:
    model = mlp()
    x, y = data((4,), 5)
    with (
        NGPlus(model.parameters(), statistics="per_sample", **SYNC) as opt,
        pytest.raises(RuntimeError, match=r"per_sample.*attach\(model\)"),
    ):
        mean_loss_step(model, opt, x, y)


def test_attach_after_the_missing_model_error_trains_like_a_fresh_optimizer() -> None:
    """The error says "call optimizer.attach(model)": doing so must work, and the failed step
    must leave no trace (no step counted, no statistics)."""
    x, y = data((4,), 5)
    model = mlp()
    with NGPlus(model.parameters(), statistics="per_sample", **SYNC) as opt:
        with pytest.raises(RuntimeError, match="attach"):
            mean_loss_step(model, opt, x, y)
        opt.attach(model)
        for _ in range(3):
            mean_loss_step(model, opt, x, y)
    fresh = mlp()
    with NGPlus(fresh.parameters(), statistics="per_sample", model=fresh, **SYNC) as opt:
        for _ in range(3):
            mean_loss_step(fresh, opt, x, y)
    assert_bitwise_equal(snapshot(model.parameters()), snapshot(fresh.parameters()))
