"""The operator registry: family name -> class, its accepted settings and defaults (mad-lab style).

Nothing outside `factory.ops` knows an operator's internals; it asks this module. One generic wrapper applies to
every token-mixing family: `AugmentedShortcut` (PanGu-pi's parallel bottleneck beside the operator). Differential
forms are not a wrapper: a family that defines one lists `differential` in its `choices` (see `base.py`).
"""

from __future__ import annotations

import importlib
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, LIVOperator, OpSpec, State
from factory.ops.common import GROUPS, channel_mix_traffic

FAMILIES: dict[str, type[LIVOperator]] = {}

# One module per family; importing it registers the class.
_FAMILY_MODULES = (
    "attention",
    "linear_attention",
    "rwkv",
    "mamba",
    "short_conv",
    "long_conv",
    "glu",
)
_loaded = False

_DEFAULT_SPEC = OpSpec()
_WRAPPER_FIELDS = ("shortcut",)


def register(cls: type[LIVOperator]) -> type[LIVOperator]:
    FAMILIES[cls.family] = cls
    return cls


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        for name in _FAMILY_MODULES:
            importlib.import_module(f"factory.ops.{name}")
        _loaded = True


def families() -> dict[str, type[LIVOperator]]:
    _ensure_loaded()
    return dict(FAMILIES)


def family(name: str) -> type[LIVOperator]:
    _ensure_loaded()
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown operator family {name!r} (known: {', '.join(sorted(FAMILIES))})") from None


def default_spec(name: str) -> OpSpec:
    """The registry default spec of a family."""
    cls = family(name)
    return canonical_spec(OpSpec(family=name, **cls.defaults))


def default_spec_dict(name) -> dict:
    """Registry defaults of a family as a dict, so a genome file may list only the fields it changes.

    An unknown name gives {} and is reported by validation, which names the field.
    """
    _ensure_loaded()
    if name not in FAMILIES:
        return {}
    return {k: v for k, v in FAMILIES[name].defaults.items()}


# -- specs: canonical form, validation, repair --------------------------------------------------------------------
def canonical_spec(spec: OpSpec) -> OpSpec:
    """Reset the fields a family ignores to the global defaults, so equal operators have equal specs."""
    cls = family(spec.family)
    changes = {}
    for f in fields(OpSpec):
        if f.name == "family" or f.name in cls.choices:
            continue
        if f.name in _WRAPPER_FIELDS and cls.mixes_tokens:
            continue
        changes[f.name] = getattr(_DEFAULT_SPEC, f.name)
    return spec.with_(**changes)


def spec_errors(spec: OpSpec, d_model: int, context: int) -> list[str]:
    """Every reason `spec` is invalid at this width and context, each naming the field."""
    if spec.family not in families():
        return [f"family: unknown operator family {spec.family!r} (known: {', '.join(sorted(FAMILIES))})"]
    cls = family(spec.family)
    errors = []
    for name, allowed in cls.choices.items():
        value = getattr(spec, name)
        if value not in allowed:
            errors.append(f"{name}: {value!r} is not accepted by {spec.family} (allowed: {list(allowed)})")
    if not errors and spec.channel_mixing == "grouped" and d_model % GROUPS:
        errors.append(f"channel_mixing: grouped needs d_model divisible by {GROUPS}, got {d_model}")
    if not errors:
        errors += cls.constraint_errors(d_model, spec, context)
    return errors


def repair_spec(spec: OpSpec, d_model: int, context: int) -> OpSpec:
    """Deterministically turn any spec of a known family into a valid, canonical one."""
    cls = family(spec.family)
    changes = {}
    for name, allowed in cls.choices.items():
        value = getattr(spec, name)
        if value in allowed:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in allowed
        ):
            changes[name] = min(allowed, key=lambda a: (abs(a - value), a))
        else:
            changes[name] = cls.defaults.get(name, allowed[0])
    spec = spec.with_(**changes)
    if spec.channel_mixing == "grouped" and d_model % GROUPS:
        spec = spec.with_(channel_mixing="dense")
    spec = cls.repair(d_model, spec, context)
    return canonical_spec(spec)


# -- building and costs ------------------------------------------------------------------------------------------
def _base(spec: OpSpec) -> OpSpec:
    return spec.with_(shortcut=False)


def build_operator(d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0) -> nn.Module:
    """The operator of one layer; `layer` is its 0-based depth (for depth-dependent initialisation)."""
    cls = family(spec.family)
    op: nn.Module = cls(d_model, _base(spec), reuse_features=reuse_features, layer=layer)
    if spec.shortcut:
        op = AugmentedShortcut(op, d_model)
    return op


def featurizer_module(op: nn.Module) -> LIVOperator:
    """The family operator inside a built layer (under its shortcut wrapper, if any)."""
    return op.op if isinstance(op, AugmentedShortcut) else op


def param_count(d_model: int, spec: OpSpec, reuse_features: bool = False) -> int:
    cls = family(spec.family)
    n = cls.param_count(d_model, _base(spec), reuse_features)
    if spec.shortcut:
        n += AugmentedShortcut.param_count(d_model)
    return n


def featurizer_params(d_model: int, spec: OpSpec, reuse_features: bool = False) -> int:
    return family(spec.family).featurizer_params(d_model, _base(spec), reuse_features)


def featurizer(spec: OpSpec) -> tuple[str, ...]:
    return family(spec.family).featurizer


def state_shapes(
    d_model: int, spec: OpSpec, batch: int, context: int, reuse_features: bool = False
) -> dict[str, tuple[int, ...]]:
    return family(spec.family).state_shapes(d_model, _base(spec), batch, context, reuse_features)


def flops(d_model: int, spec: OpSpec, context: int, reuse_features: bool = False) -> Flops:
    cls = family(spec.family)
    f = cls.flops(d_model, _base(spec), context, reuse_features)
    if spec.shortcut:
        per = 2.0 * AugmentedShortcut.param_count(d_model)
        f = f + Flops(per, per)
    return f


def activation_elements(d_model: int, spec: OpSpec, tokens: int) -> int:
    return family(spec.family).activation_elements(d_model, _base(spec), tokens)


def traffic_elements(d_model: int, spec: OpSpec, tokens: int) -> int:
    cls, base = family(spec.family), _base(spec)
    return cls.traffic_elements(d_model, base, tokens) + channel_mix_traffic(
        base.channel_mixing, cls.mix_width(d_model, base), d_model, tokens)


def shared_elements(d_model: int, spec: OpSpec, tokens: int) -> dict[tuple, int]:
    """A layer's intermediates computed once per graph (LIVOperator.shared_elements)."""
    return family(spec.family).shared_elements(d_model, _base(spec), tokens)


def feature_kinds(spec: OpSpec) -> tuple[str, ...]:
    return family(spec.family).feature_kinds


# -- generic wrapper ---------------------------------------------------------------------------------------------
class AugmentedShortcut(nn.Module):
    """PanGu-pi augmented shortcut: y = op(x) + up(gelu(down(x))), a bottleneck of width max(8, d/32).

    It is memoryless per token, so it adds no decode state.
    """

    @staticmethod
    def bottleneck(d_model: int) -> int:
        return max(8, d_model // 32)

    @classmethod
    def param_count(cls, d_model: int) -> int:
        return 2 * d_model * cls.bottleneck(d_model)

    def __init__(self, op: nn.Module, d_model: int):
        super().__init__()
        self.op = op
        r = self.bottleneck(d_model)
        self.down = nn.Linear(d_model, r, bias=False)
        self.up = nn.Linear(r, d_model, bias=False)
        nn.init.zeros_(self.up.weight)  # starts as the plain operator

    def _aug(self, x):
        return self.up(F.gelu(self.down(x)))

    def forward(self, x, publish=None, reuse=None):
        return self.op(x, publish=publish, reuse=reuse) + self._aug(x)

    def prefill(self, x, publish=None, reuse=None):
        y, state = self.op.prefill(x, publish=publish, reuse=reuse)
        return y + self._aug(x), state

    def step(self, x, position, state, publish=None, reuse=None):
        y, state = self.op.step(x, position, state, publish=publish, reuse=reuse)
        return y + self._aug(x), state


def spec_variants(name: str, d_model: int = 64, context: int = 64) -> list[OpSpec]:
    """The family default, then each accepted value of each field changed alone, then the shortcut wrapper.

    Repaired and deduplicated: what the test sweep and export sweep run for every registered family.
    """
    base = default_spec(name)
    cls = family(name)
    out = [base]
    for field_name, allowed in cls.choices.items():
        for value in allowed:
            out.append(base.with_(**{field_name: value}))
    if cls.mixes_tokens:
        out += [base.with_(shortcut=True)]
    seen, unique = set(), []
    for spec in out:
        spec = repair_spec(spec, d_model, context)
        if spec not in seen:
            seen.add(spec)
            unique.append(spec)
    return unique
