"""The optimizers the example scripts and benchmarks compare: a registry key per configuration
(label, class, lr group, kwargs), ``Method`` (a key, an lr and extra kwargs) and how a list of
keys on a command line becomes methods."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import nn

import torch_shampoo


class _Entry(NamedTuple):
    label: str
    module: ModuleType | str
    """The module, or the name of an optional one (a published reference, imported if there)."""
    class_name: str
    lr_group: str
    kwargs: dict[str, Any]


REGISTRY = {
    "sgd": _Entry("SGD-momentum", torch.optim, "SGD", "sgd", {"momentum": 0.9}),
    "adam": _Entry("Adam", torch.optim, "Adam", "adam", {}),
    "adamw": _Entry("AdamW", torch.optim, "AdamW", "adamw", {}),
    "shampoo-sync": _Entry(
        "Shampoo sync", torch_shampoo, "Shampoo", "shampoo", {"async_roots": False}
    ),
    "shampoo-async": _Entry(
        "Shampoo async", torch_shampoo, "Shampoo", "shampoo", {"async_roots": True}
    ),
    # the default: async_roots="auto" (sync where the step's threads fill a CPU-only machine)
    "shampoo": _Entry("Shampoo", torch_shampoo, "Shampoo", "shampoo", {}),
    # float32 roots, a failed one solved again in float64 (benchmarks: root_dtype's default)
    "shampoo-sync-f32": _Entry(
        "Shampoo sync f32",
        torch_shampoo,
        "Shampoo",
        "shampoo",
        {"async_roots": False, "root_dtype": torch.float32},
    ),
    # warm-started roots: an exact eigh every 5th root step, a power iteration between
    "shampoo-sync-warm": _Entry(
        "Shampoo sync eigh/5",
        torch_shampoo,
        "Shampoo",
        "shampoo",
        {"async_roots": False, "eigh_every": 5},
    ),
    "shampoo-async-warm": _Entry(
        "Shampoo async eigh/5", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": True, "eigh_every": 5},
    ),
    # roots at every f-th step for every parameter (async's default staggers them by parameter)
    "shampoo-async-unstaggered": _Entry(
        "Shampoo async unstaggered", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": True, "stagger_roots": False},
    ),
    "shampoo-sync-stagger": _Entry(
        "Shampoo sync stagger", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": False, "stagger_roots": True},
    ),
    # bfloat16 state (roots, moments; factors float32), rounded stochastically; sync: bitwise
    # repeatable; square blocks paired (compact_state "auto")
    "shampoo-sync-bf16": _Entry(
        "Shampoo sync bf16",
        torch_shampoo,
        "Shampoo",
        "shampoo",
        {"async_roots": False, "state_dtype": torch.bfloat16},
    ),
    "shampoo-sync-bf16full": _Entry(
        "Shampoo sync bf16 full", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": False, "state_dtype": torch.bfloat16, "compact_state": False},
    ),
    # and compact_state=True: every block packed (unpaired ones' roots then float32)
    "shampoo-sync-bf16c": _Entry(
        "Shampoo sync bf16 compact", torch_shampoo, "Shampoo", "shampoo",
        {"async_roots": False, "state_dtype": torch.bfloat16, "compact_state": True},
    ),
    "ngplus": _Entry("NG+", torch_shampoo, "NGPlus", "ngplus", {"statistics": "minibatch"}),
    "ngplus-async": _Entry(
        "NG+ async", torch_shampoo, "NGPlus", "ngplus",
        {"statistics": "minibatch", "async_roots": True},
    ),
    "ngplus-unstaggered": _Entry(
        "NG+ unstaggered", torch_shampoo, "NGPlus", "ngplus",
        {"statistics": "minibatch", "async_roots": True, "stagger_roots": False},
    ),
    "ngplus-sync": _Entry(
        "NG+ sync", torch_shampoo, "NGPlus", "ngplus",
        {"statistics": "minibatch", "async_roots": False},
    ),
    "ngplus-f32": _Entry(
        "NG+ f32",
        torch_shampoo,
        "NGPlus",
        "ngplus",
        {"statistics": "minibatch", "root_dtype": torch.float32},
    ),
    "ngplus-ps": _Entry(
        "NG+ per-sample", torch_shampoo, "NGPlus", "ngplus", {"statistics": "per_sample"}
    ),
    # SOAP takes Adam's lr (its step is Adam's, in a rotated basis)
    "soap": _Entry("SOAP", torch_shampoo, "SOAP", "adam", {}),
    "soap-async": _Entry("SOAP async", torch_shampoo, "SOAP", "adam", {"async_roots": True}),
    "soap-sync": _Entry("SOAP sync", torch_shampoo, "SOAP", "adam", {"async_roots": False}),
    "soap-sync-f32": _Entry(
        "SOAP sync f32", torch_shampoo, "SOAP", "adam",
        {"async_roots": False, "root_dtype": torch.float32},
    ),
    "soap-sync-bf16": _Entry(
        "SOAP sync bf16", torch_shampoo, "SOAP", "adam",
        {"async_roots": False, "state_dtype": torch.bfloat16},
    ),
    "soap-unstaggered": _Entry(
        "SOAP async unstaggered", torch_shampoo, "SOAP", "adam",
        {"async_roots": True, "stagger_roots": False},
    ),
    "soap-stale": _Entry(
        "SOAP stale=f", torch_shampoo, "SOAP", "adam", {"async_roots": True, "root_staleness": 10}
    ),
    # pytorch-optimizer's SOAP (pip install pytorch-optimizer), as a published reference
    "soap-ref": _Entry(
        "SOAP (pytorch-optimizer)", "pytorch_optimizer", "SOAP", "adam", {"weight_decay": 0.0}
    ),
}
METHOD_KEYS = tuple(REGISTRY)
LR_GROUPS = ("sgd", "adam", "adamw", "shampoo", "ngplus")


@dataclass(frozen=True)
class Method:
    """One optimizer configuration: registry key, learning rate and extra keyword arguments."""

    key: str
    lr: float
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Human-readable name used in tables and plots."""
        return REGISTRY[self.key].label

    def optimizer_class(self) -> Callable[..., torch.optim.Optimizer] | None:
        """The optimizer class, or None if this version of the library does not provide it."""
        entry = REGISTRY[self.key]
        module = entry.module
        if isinstance(module, str):
            try:
                module = importlib.import_module(module)
            except ImportError:
                return None
        return getattr(module, entry.class_name, None)

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        """Construct the optimizer for `model` (attaching hooks for per-sample statistics)."""
        cls = self.optimizer_class()
        if cls is None:
            raise RuntimeError(f"{self.label} is not available in this torch_shampoo version")
        kwargs = {**REGISTRY[self.key].kwargs, **self.kwargs}
        if world() > 1 and REGISTRY[self.key].module is torch_shampoo:
            kwargs["partition_state"] = True  # DDP: each parameter kept by one process
        opt = cls(model.parameters(), lr=self.lr, **kwargs)
        if kwargs.get("statistics") == "per_sample":
            opt.attach(model)  # type: ignore[attr-defined]
        return opt


def make_method(
    key: str,
    lrs: Mapping[str, float],
    weight_decay: float = 0.01,
    ngplus_damping: float | None = None,
) -> Method:
    """Build a Method for registry `key`, taking its lr from `lrs` (indexed by lr group)."""
    group = REGISTRY[key].lr_group
    kwargs: dict[str, Any] = {}
    if group == "adamw":
        kwargs["weight_decay"] = weight_decay
    if group == "ngplus" and ngplus_damping is not None:
        kwargs["damping"] = ngplus_damping
    return Method(key, lrs[group], kwargs)


def parse_keys(text: str, choices: Sequence[str]) -> list[str]:
    """Split a comma-separated list of names and check each is one of `choices`."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in choices]
    if unknown:
        raise SystemExit(f"unknown names {unknown}; choose from {', '.join(choices)}")
    return keys


def available(methods: Sequence[Method]) -> list[Method]:
    """Keep the methods whose optimizer class is importable; print a note for the others."""
    kept = []
    for method in methods:
        if method.optimizer_class() is None:
            entry = REGISTRY[method.key]
            where = entry.module if isinstance(entry.module, str) else entry.module.__name__
            print(f"note: skipping {method.label}: {where} has no {entry.class_name} here")
        else:
            kept.append(method)
    return kept


def world() -> int:
    """Processes in torch.distributed's default group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_of() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
