"""Every setting of the three front ends, declared once: :data:`SPEC`.

A row names a setting, its default in each front end that takes it, its check
(:mod:`torch_shampoo.checks`), a one-line doc and what it feeds in
:class:`~torch_shampoo.config.EngineConfig`; two rows share a name where the front ends give it
different meanings. :data:`RULES` relate several settings, :data:`FIXED` are each front end's
fixed engine fields, :data:`HINTS` its hints for names it does not take. The front ends keep
explicit signatures and take everything else from here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import (
    Betas,
    Check,
    Choice,
    Damping,
    Flag,
    Integer,
    Lr,
    Merge,
    Model,
    Real,
    Staleness,
    StateDtype,
    Workers,
    bad,
)
from .roots.matrix_roots import ROOT_DTYPES, ROOT_METHODS
from .update.grafting import GRAFTS

__all__ = [
    "ENGINE_FLAGS", "FIXED", "FRONTS", "HINTS", "NOTHING", "RULES", "SPEC", "STATISTICS", "Rule",
    "Setting", "declared", "engine_fields", "group_defaults", "kwargs", "parse", "reject", "rows",
    "validate",
]  # fmt: skip

FRONTS: tuple[str, ...] = ("Shampoo", "SOAP", "NGPlus")
STATISTICS: tuple[str, ...] = ("minibatch", "per_sample")
ENGINE_FLAGS: tuple[str, ...] = (
    "async_roots", "root_workers", "partition_roots", "partition_state", "compact_state",
)  # fmt: skip
"""The constructor flags a front end passes on to the engine's constructor."""


Feeds = str | Callable[[Mapping[str, Any]], dict[str, Any]] | None


# -------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Setting:
    name: str
    defaults: Mapping[str, Any]
    """Front end → default; a front end not named here does not take the setting."""
    check: Check
    doc: str
    feeds: Feeds = None
    """The EngineConfig field it sets (a name), the fields a function of the group sets, or
    None: a constructor-only flag (``per_group=False``) or read by the front end itself."""
    per_group: bool = True


def _all(default: Any) -> dict[str, Any]:
    return dict.fromkeys(FRONTS, default)


def _ss(default: Any) -> dict[str, Any]:  # Shampoo and SOAP
    return {"Shampoo": default, "SOAP": default}


def _sn(default: Any) -> dict[str, Any]:  # Shampoo and NG+
    return {"Shampoo": default, "NGPlus": default}


def _staleness(group: Mapping[str, Any]) -> dict[str, Any]:
    value = group["root_staleness"]
    return {"staleness": None if value is None or isinstance(value, str) else int(value)}


def _stagger(group: Mapping[str, Any]) -> dict[str, Any]:
    value = group["stagger_roots"]
    return {"stagger_roots": None if value == "auto" else value}


def _soap_beta2(group: Mapping[str, Any]) -> dict[str, Any]:
    beta = group["shampoo_beta"]
    return {"beta2": group["betas"][1] if beta is None else beta}


_UNIT_OPEN = Real(low=0.0, high=1.0, high_open=True)  # [0, 1)
_S, _O, _N = "Shampoo", "SOAP", "NGPlus"

SPEC: tuple[Setting, ...] = (
    Setting("lr", {_S: 1e-3, _O: 1e-3, _N: 1e-4}, Lr(), "learning rate (float or 0-d tensor)",
            "lr"),  # NG+: a tenth of Adam's (its graft gives Adam's step size; docs/tuning.md)
    Setting("betas", {_S: (0.9, 0.999)}, Betas(), "β₁ of the first moment, β₂ of the statistics",
            lambda g: {"beta1": g["betas"][0], "beta2": g["betas"][1]}),
    Setting("betas", {_O: (0.9, 0.999)}, Betas(high_open=True), "Adam's (β₁, β₂)",
            lambda g: {"beta1": g["betas"][0], "grafting_beta2": g["betas"][1]}),
    Setting("epsilon", {_S: 1e-12}, Real(low=0.0), "ε added to each factor before its root",
            "epsilon"),
    Setting("eps", {_O: 1e-8}, Real(low=0.0, low_open=True), "Adam's ε, in the eigenbasis",
            "grafting_epsilon"),
    Setting("damping", {_N: 3.0}, Damping(), "λ in (F̂ + λτI)⁻¹: a float or a function of the step",
            "epsilon"),
    Setting("weight_decay", _all(0.0), Real(low=0.0), "weight decay", "weight_decay"),
    Setting("decoupled_weight_decay", _ss(True), Flag(),
            "AdamW-style decay on the step (else added to the gradient)", "decoupled_weight_decay"),
    Setting("shampoo_beta", {_O: None}, Real(low=0.0, high=1.0, high_open=True, optional=True),
            "β of the factors' moving average (None: β₂)", _soap_beta2),
    Setting("curvature_beta", {_N: 0.95}, _UNIT_OPEN, "β of the moving average of F", "beta2"),
    Setting("momentum", {_S: 0.0, _O: 0.0, _N: 0.9}, _UNIT_OPEN, "heavy-ball momentum μ",
            "momentum"),
    Setting("nesterov", {_S: False, _O: False, _N: True}, Flag(), "Nesterov's form of momentum",
            "nesterov"),
    Setting("block_size", _ss(1024), Integer(1), "largest block side", "block_size"),
    Setting("block_size", {_N: 1024}, Integer(1), "largest diagonal block of F",
            lambda g: {"block_size": g["block_size"], "max_factor_dim": g["block_size"]}),
    Setting("max_factor_dim", _ss(8192), Integer(1), "dims above it get no factor",
            "max_factor_dim"),
    Setting("precondition_frequency", {_S: 20, _O: 10}, Integer(1), "steps between root steps",
            "frequency"),
    Setting("inverse_frequency", {_N: 20}, Integer(1), "T: steps between inverses", "frequency"),
    Setting("start_preconditioning_step", {_S: None}, Integer(1, optional=True),
            "first root step (None: the frequency)",
            lambda g: {"start": g["start_preconditioning_step"] or g["precondition_frequency"]}),
    Setting("start_preconditioning_step", {_O: None, _N: None}, Integer(1, optional=True),
            "first root step (None: 1)", lambda g: {"start": g["start_preconditioning_step"] or 1}),
    Setting("bias_correction", _all(True), Flag(), "bias corrections of the moving averages",
            "bias_correction"),
    Setting("grafting", _sn("adam"), Choice(GRAFTS), "whose step size each block takes",
            "grafting"),
    Setting("grafting_beta2", _sn(0.999), _UNIT_OPEN, "the graft's β₂", "grafting_beta2"),
    Setting("grafting_epsilon", _sn(1e-8), Real(low=0.0, low_open=True), "the graft's ε",
            "grafting_epsilon"),
    Setting("root_exponent", {_S: None}, Real(low=0.0, low_open=True, optional=True),
            "r in X = F^(−1/r) (None: 2 × the number of factors)", "root_exponent"),
    Setting("root_method", _sn("eigh"), Choice(ROOT_METHODS), "how roots are computed",
            "root_method"),
    Setting("root_dtype", _all(torch.float64), Choice(ROOT_DTYPES),
            "dtype of the solve (float32: a failed root solved again in float64)", "root_dtype"),
    Setting("state_dtype", _ss(None), StateDtype(),
            "factors, roots and moments stored in bfloat16, rounded stochastically (None: float32)",
            "state_dtype"),
    Setting("maximize", _all(False), Flag(), "maximize the objective", "maximize"),
    Setting("root_staleness", _all("auto"), Staleness(),
            "steps between a later root's snapshot and its use", _staleness),
    Setting("stagger_roots", _all("auto"), Choice((True, False, "auto")),
            "later root cycles spread over the frequency's steps, parameter by parameter "
            "(auto: with async roots)", _stagger),
    Setting("max_root_failures", _all(3), Integer(1),
            "consecutive failed roots of one factor that raise", "max_root_failures"),
    Setting("skip_nonfinite", _all(True), Flag(), "skip a block's update at a NaN/Inf gradient",
            "skip_nonfinite"),
    Setting("merge_dims", {_S: True, _O: False}, Merge(), "merge small neighbouring dims",
            "merge_dims"),
    Setting("precondition_1d", {_S: True, _O: False}, Flag(), "1-D parameters get a factor",
            "precondition_1d"),
    Setting("basis_refresh", {_O: True}, Flag(),
            "power iteration of the bases at an eigh root step whose bases come later",
            "basis_refresh"),
    Setting("eigh_every", {_S: 1, _O: 5}, Integer(1), "root steps per exact eigendecomposition",
            "eigh_every"),
    Setting("basis_tolerance", {_S: 0.0}, Real(low=0.0),
            "eigh_every > 1: the exact eigh also where a basis drifted beyond it (0: off)",
            "basis_tolerance"),
    Setting("relative_damping", {_N: True}, Flag(), "λ relative to each block's mean eigenvalue",
            "relative_epsilon"),
    Setting("statistics", {_N: "minibatch"}, Choice(STATISTICS), "how F is estimated",
            per_group=False),
    Setting("async_roots", _all("auto"), Choice((True, False, "auto")),
            "roots on CPU worker threads (\"auto\": unless the step's threads fill a CPU-only "
            "machine)", per_group=False),
    Setting("root_workers", _all(None), Workers(), "worker threads (None: cores / 2)",
            per_group=False),
    Setting("partition_roots", _all(False), Flag(), "under DDP, each root solved by one rank",
            per_group=False),
    Setting("partition_state", _all(False), Flag(), "under DDP, each parameter on one rank",
            per_group=False),
    Setting("compact_state", {_S: "auto"}, Choice((True, False, "auto")),
            "symmetric matrices as triangles: True every block's factor and root, \"auto\" a "
            "square block's with bfloat16 state (factors in one tensor, roots in another)",
            per_group=False),
    Setting("model", {_N: None}, Model(), "the model hooked for per-sample statistics",
            per_group=False),
)  # fmt: skip

FIXED: Mapping[str, Mapping[str, Any]] = {
    _S: dict(relative_epsilon=False, basis_refresh=False, eigenbasis=False),
    _O: dict(epsilon=0.0, grafting="adam", root_exponent=None, root_method="eigh",
             relative_epsilon=False, basis_tolerance=0.0, eigenbasis=True),
    _N: dict(beta1=0.0, decoupled_weight_decay=True, root_exponent=1.0, basis_refresh=False,
             state_dtype=None, eigh_every=1, basis_tolerance=0.0, merge_dims=True,
             precondition_1d=True, eigenbasis=False),
}  # fmt: skip
"""Each front end's engine fields that no setting feeds."""


# ----------------------------------------------------------------------------- named rules


@dataclass(frozen=True)
class Rule:
    """A check across settings, for the front ends that have all of ``needs``."""

    name: str
    needs: tuple[str, ...]
    broken: Callable[[Mapping[str, Any]], bool]
    blame: str  # the setting the error names
    requirement: str
    fronts: tuple[str, ...] = field(default=FRONTS)


RULES: tuple[Rule, ...] = (
    Rule("beta1 < 1", ("betas",), lambda g: g["betas"][0] == 1, "betas", "beta1 must be < 1",
         fronts=(_S,)),  # (SOAP's betas are Adam's: [0, 1) each, β₂ = 0 allowed)
    Rule("beta2 > 0", ("betas",), lambda g: g["betas"][1] == 0, "betas", "beta2 must be > 0",
         fronts=(_S,)),
    Rule("nesterov needs momentum", ("nesterov", "momentum"),
         lambda g: g["nesterov"] and g["momentum"] == 0, "nesterov",
         "Nesterov momentum needs momentum > 0", fronts=(_S, _O)),  # (NG+: μ = 0 is the plain step)
    Rule("cholesky needs r = 1", ("root_method", "root_exponent"),
         lambda g: g["root_method"] == "cholesky" and g["root_exponent"] != 1, "root_method",
         "cholesky computes inverses only: set root_exponent=1"),
    Rule("newton needs an integer r", ("root_method", "root_exponent"),
         lambda g: g["root_method"] == "newton" and g["root_exponent"] is not None
         and g["root_exponent"] != int(g["root_exponent"]), "root_exponent",
         "newton needs an integer exponent"),
    Rule("warm roots need eigh", ("eigh_every", "root_method"),
         lambda g: g["eigh_every"] > 1 and g["root_method"] != "eigh", "eigh_every",
         "roots from kept eigenbases need root_method='eigh'", fronts=(_S,)),
    Rule("float32 roots need eigh", ("root_dtype", "root_method"),
         lambda g: g["root_dtype"] == torch.float32 and g["root_method"] != "eigh", "root_dtype",
         "float32 roots are solved by eigh: set root_method='eigh'"),
)  # fmt: skip

HINTS: Mapping[str, Mapping[str, str]] = {
    _S: {
        "eps": "'epsilon' (ε added to each factor before its root, default 1e-12) or "
        "'grafting_epsilon' (the Adam graft's ε: what Adam calls eps)",
        "learning_rate": "'lr'",
        "beta1": "'betas=(beta1, beta2)'",
        "beta2": "'betas=(beta1, beta2)' (β₂ of the statistics) or 'grafting_beta2' (Adam's β₂)",
        "max_preconditioner_dim": "'block_size'",
        "use_nesterov": "'nesterov'",
        "use_decoupled_weight_decay": "'decoupled_weight_decay'",
        "use_bias_correction": "'bias_correction'",
        "matrix_epsilon": "'epsilon'",
        "diagonal_epsilon": "'grafting_epsilon'",
        "preconditioning_compute_steps": "'precondition_frequency'",
        "graft_type": "'grafting'",
        "grafting_config": "'grafting' (a name: adam, adagrad, rmsprop, sgd, none)",
        "exponent_override": "'root_exponent'",
        "inverse_exponent_override": "'root_exponent'",
    },
    _O: {
        "epsilon": "'eps' (Adam's ε, in the eigenbasis)",
        "learning_rate": "'lr'",
        "beta1": "'betas=(beta1, beta2)'",
        "beta2": "'betas=(beta1, beta2)' (Adam's β₂) or 'shampoo_beta' (the factors' β)",
        "correct_bias": "'bias_correction'",
        "max_precond_dim": "'max_factor_dim'",
        "grafting": "nothing: SOAP's step has Adam's size by construction (use Shampoo to graft)",
        "root_exponent": "nothing: SOAP uses eigenvectors, not roots",
        "compact_state": "nothing: it packs Shampoo's symmetric roots (SOAP's bases are not)",
        "use_nesterov": "'nesterov'",
    },
    _N: {
        "eps": "'damping' (λ in (F + λI)⁻¹)",
        "epsilon": "'damping' (λ in (F + λI)⁻¹)",
        "precondition_frequency": "'inverse_frequency'",
        "betas": "'curvature_beta' (β of the moving average of F) and 'momentum'",
        "compact_state": "nothing: it is Shampoo's (NG+ keeps one factor per weight)",
        "state_dtype": "nothing: low-precision state is Shampoo's and SOAP's",
    },
}
"""Per front end: what a caller probably meant by a name that front end does not take
(``NOTHING`` and why: a name of another optimizer's that has no counterpart here)."""
NOTHING = "nothing: "


# ------------------------------------------------------------------------------- derived


_ROWS = {front: tuple(s for s in SPEC if front in s.defaults) for front in FRONTS}


def rows(front: str) -> list[Setting]:
    """The settings ``front`` takes, in table order."""
    return list(_ROWS[front])


def kwargs(front: str) -> list[str]:
    """The keyword arguments of ``front`` (every setting, per group or not)."""
    return [s.name for s in rows(front)]


def group_defaults(front: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``front``'s per-group settings, taken from its constructor's ``arguments`` in order."""
    names = {s.name for s in rows(front) if s.per_group}
    missing = names - set(arguments)
    if missing:
        raise AssertionError(f"{front}'s signature lacks the settings {sorted(missing)}")
    return {k: v for k, v in arguments.items() if k in names}


def validate(front: str, group: Mapping[str, Any], per_group: bool = True) -> None:
    """Check ``group`` (``per_group``: its settings; else: the constructor flags), then the
    rules: ValueError/TypeError naming the first bad setting and its value."""
    for s in _ROWS[front]:
        if s.per_group == per_group:
            s.check(s.name, group[s.name])
    if not per_group:
        return
    for rule in RULES:
        if front in rule.fronts and all(n in group for n in rule.needs) and rule.broken(group):
            raise bad(rule.blame, group[rule.blame], rule.requirement)


def engine_fields(front: str, group: Mapping[str, Any]) -> dict[str, Any]:
    """The EngineConfig fields of ``group``: those its settings feed, and ``front``'s fixed."""
    fields = dict(FIXED[front])
    for s in _ROWS[front]:
        if isinstance(s.feeds, str):
            fields[s.feeds] = group[s.name]
        elif s.feeds is not None:
            fields.update(s.feeds(group))
    return fields


def reject(front: str, unknown: Mapping[str, Any]) -> None:
    """A TypeError for unknown keyword arguments that says what was probably meant."""
    if not unknown:
        return
    name = sorted(unknown)[0]
    hint = HINTS[front].get(name)
    if hint is None:
        close = difflib.get_close_matches(name, ["params", *kwargs(front)], n=2, cutoff=0.6)
        hint = " or ".join(f"'{c}'" for c in close)
    meant = f": did you mean {hint}?" if hint else ""
    if hint and hint.startswith(NOTHING):  # a name other optimizers take, with the reason
        meant = f": {front} has no such setting ({hint.removeprefix(NOTHING)})"
    raise TypeError(f"{front} got an unexpected keyword argument '{name}'{meant}")


def parse(
    front: str, arguments: Mapping[str, Any], unknown: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``front``'s constructor ``arguments``, checked (:func:`reject`, then :func:`validate` of
    the flags), as its group defaults and the flags of :data:`ENGINE_FLAGS` it takes."""
    reject(front, unknown)
    validate(front, arguments, per_group=False)
    flags = {name: arguments[name] for name in ENGINE_FLAGS if name in arguments}
    return group_defaults(front, arguments), flags


def declared(names: Iterable[str]) -> list[str]:
    """The per-group settings among a signature's ``names`` (for config.group_defaults)."""
    skip = {s.name for s in SPEC if not s.per_group} | {"self", "params", "unknown"}
    return [n for n in names if n not in skip and not n.startswith("__")]
