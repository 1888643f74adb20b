"""The operator registry: family name -> class, its accepted settings and defaults (mad-lab style).

Nothing outside `factory.ops` knows an operator's internals; it asks this module. Two generic wrappers apply to
every token-mixing family: `Differential` (difference of two copies, the differential variants) and
`AugmentedShortcut` (PanGu-pi's parallel bottleneck beside the operator).
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
_WRAPPER_FIELDS = ("differential", "shortcut")


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
    return spec.with_(differential=False, shortcut=False)


def build_operator(d_model: int, spec: OpSpec, reuse_features: bool = False) -> nn.Module:
    cls = family(spec.family)
    op: nn.Module = cls(d_model, _base(spec), reuse_features=reuse_features)
    if spec.differential:
        op = Differential(op, cls(d_model, _base(spec), reuse_features=reuse_features))
    if spec.shortcut:
        op = AugmentedShortcut(op, d_model)
    return op


def param_count(d_model: int, spec: OpSpec, reuse_features: bool = False) -> int:
    cls = family(spec.family)
    n = cls.param_count(d_model, _base(spec), reuse_features)
    if spec.differential:
        n = 2 * n + 1
    if spec.shortcut:
        n += AugmentedShortcut.param_count(d_model)
    return n


def state_shapes(
    d_model: int, spec: OpSpec, batch: int, context: int, reuse_features: bool = False
) -> dict[str, tuple[int, ...]]:
    cls = family(spec.family)
    shapes = cls.state_shapes(d_model, _base(spec), batch, context, reuse_features)
    if spec.differential:
        shapes = {**shapes, **{Differential.NEG + k: v for k, v in shapes.items()}}
    return shapes


def flops(d_model: int, spec: OpSpec, context: int, reuse_features: bool = False) -> Flops:
    cls = family(spec.family)
    f = cls.flops(d_model, _base(spec), context, reuse_features)
    if spec.differential:
        f = f.scale(2.0)
    if spec.shortcut:
        per = 2.0 * AugmentedShortcut.param_count(d_model)
        f = f + Flops(per, per)
    return f


def activation_elements(d_model: int, spec: OpSpec, tokens: int) -> int:
    n = family(spec.family).activation_elements(d_model, _base(spec), tokens)
    return 2 * n if spec.differential else n


def traffic_elements(d_model: int, spec: OpSpec, tokens: int) -> int:
    cls, base = family(spec.family), _base(spec)
    n = cls.traffic_elements(d_model, base, tokens) + channel_mix_traffic(
        base.channel_mixing, cls.mix_width(d_model, base), d_model, tokens)
    return 2 * n if spec.differential else n


def shared_elements(d_model: int, spec: OpSpec, tokens: int) -> dict[tuple, int]:
    """A layer's intermediates computed once per graph (LIVOperator.shared_elements); a differential layer's two
    copies share them."""
    return family(spec.family).shared_elements(d_model, _base(spec), tokens)


def feature_kinds(spec: OpSpec) -> tuple[str, ...]:
    return family(spec.family).feature_kinds


# -- generic wrappers --------------------------------------------------------------------------------------------
def _sub(d: dict | None, key: str) -> dict | None:
    if d is None:
        return None
    return d.setdefault(key, {})


class Differential(nn.Module):
    """Differential variant: y = A(x) - lambda * B(x) with two copies of one operator and a learned lambda.

    Noise common to both copies cancels (Differential Transformer). The second copy's state kinds are prefixed
    with `neg_`.
    """

    NEG = "neg_"

    def __init__(self, pos: nn.Module, neg: nn.Module):
        super().__init__()
        self.pos, self.neg = pos, neg
        self.lam = nn.Parameter(torch.tensor(0.5))

    def _split(self, state: State) -> tuple[State, State]:
        n = len(self.NEG)
        pos = {k: v for k, v in state.items() if not k.startswith(self.NEG)}
        neg = {k[n:]: v for k, v in state.items() if k.startswith(self.NEG)}
        return pos, neg

    def _join(self, pos: State, neg: State) -> State:
        return {**pos, **{self.NEG + k: v for k, v in neg.items()}}

    def forward(self, x, publish=None, reuse=None):
        a = self.pos(x, publish=_sub(publish, "pos"), reuse=_sub(reuse, "pos"))
        b = self.neg(x, publish=_sub(publish, "neg"), reuse=_sub(reuse, "neg"))
        return a - self.lam * b

    def prefill(self, x, publish=None, reuse=None):
        a, sa = self.pos.prefill(x, publish=_sub(publish, "pos"), reuse=_sub(reuse, "pos"))
        b, sb = self.neg.prefill(x, publish=_sub(publish, "neg"), reuse=_sub(reuse, "neg"))
        return a - self.lam * b, self._join(sa, sb)

    def step(self, x, position, state, publish=None, reuse=None):
        pos_state, neg_state = self._split(state)
        a, sa = self.pos.step(x, position, pos_state, publish=_sub(publish, "pos"), reuse=_sub(reuse, "pos"))
        b, sb = self.neg.step(x, position, neg_state, publish=_sub(publish, "neg"), reuse=_sub(reuse, "neg"))
        return a - self.lam * b, self._join(sa, sb)


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
    """The family default, then each accepted value of each field changed alone, then the two wrappers.

    Repaired and deduplicated: what the test sweep and export sweep run for every registered family.
    """
    base = default_spec(name)
    cls = family(name)
    out = [base]
    for field_name, allowed in cls.choices.items():
        for value in allowed:
            out.append(base.with_(**{field_name: value}))
    if cls.mixes_tokens:
        out += [base.with_(differential=True), base.with_(shortcut=True)]
    seen, unique = set(), []
    for spec in out:
        spec = repair_spec(spec, d_model, context)
        if spec not in seen:
            seen.add(spec)
            unique.append(spec)
    return unique
