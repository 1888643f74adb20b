"""The operator registry: family name -> class, found by scanning this package (mad-lab style).

A family is one module of `factory.ops` whose `LIVOperator` subclass is decorated with `@register`; it declares
its genes (names, domains, defaults), its stable codec `code` and its rules in that file, so adding an operator
is one new file plus its tests. Nothing outside `factory.ops` knows an operator's internals; it asks this module.
One generic wrapper applies to every token-mixing family: `AugmentedShortcut` (PanGu-pi's parallel bottleneck
beside the operator), the `shortcut` gene. Differential forms are not a wrapper: a family that defines one
declares a `differential` gene (see `base.py`).
"""

from __future__ import annotations

import importlib
import pkgutil

import torch.nn.functional as F
from torch import nn

from factory.ops.base import SHORTCUT, Flops, Gene, LIVOperator, OpSpec, State
from factory.ops.common import GROUPS, channel_mix_traffic

FAMILIES: dict[str, type[LIVOperator]] = {}
_NOT_FAMILIES = {"base", "common", "registry"}  # the package's shared modules
_loaded = False


def register(cls: type[LIVOperator]) -> type[LIVOperator]:
    for other in FAMILIES.values():
        if other.code == cls.code and other.family != cls.family:
            raise ValueError(f"operator families {other.family} and {cls.family} both claim codec code {cls.code}")
    if cls.code < 0:
        raise ValueError(f"operator family {cls.family} declares no codec code")
    FAMILIES[cls.family] = cls
    return cls


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        package = importlib.import_module("factory.ops")
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in _NOT_FAMILIES:
                importlib.import_module(f"factory.ops.{info.name}")
        _loaded = True


def families() -> dict[str, type[LIVOperator]]:
    """Every registered family, in codec order."""
    _ensure_loaded()
    return dict(sorted(FAMILIES.items(), key=lambda kv: kv[1].code))


def family(name: str) -> type[LIVOperator]:
    _ensure_loaded()
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown operator family {name!r} (known: {', '.join(sorted(FAMILIES))})") from None


def resolve(name: str) -> tuple[str, dict]:
    """A family name or a family's alias (`LIVOperator.aliases`) -> (family, the genes the name fixes)."""
    _ensure_loaded()
    if name in FAMILIES:
        return name, {}
    for cls in FAMILIES.values():
        if name in cls.aliases:
            return cls.family, dict(cls.aliases[name])
    raise ValueError(f"unknown operator family {name!r} (known: {', '.join(known_names())})")


def known_names() -> list[str]:
    """Every family name and alias, families first (in codec order)."""
    fams = families()
    return list(fams) + [a for cls in fams.values() for a in cls.aliases]


def genes(name: str) -> tuple[Gene, ...]:
    """A family's genes: its own, then the shortcut wrapper's for token mixers."""
    cls = family(name)
    return cls.genes + ((SHORTCUT,) if cls.mixes_tokens else ())


def gene_defaults(name) -> dict:
    """{gene: default} of a family, in order; {} for an unknown name (validation reports it, naming the field)."""
    _ensure_loaded()
    if name not in FAMILIES:
        return {}
    return {g.name: g.default for g in genes(name)}


def domain(name: str, gene: str) -> tuple:
    """The values a family's gene may take."""
    for g in genes(name):
        if g.name == gene:
            return g.domain
    raise ValueError(f"{name} has no gene {gene!r}")


def default_spec(name: str) -> OpSpec:
    """The registry default spec of a family, or of the form an alias names (`resolve`)."""
    fam, fixed = resolve(name)
    return canonical_spec(OpSpec(fam, **fixed))


# -- specs: canonical form, validation, repair --------------------------------------------------------------------
def canonical_spec(spec: OpSpec) -> OpSpec:
    """Reset the genes that do not shape this operator (`LIVOperator.relevant`) to their defaults, so equal
    operators have equal specs."""
    cls = family(spec.family)
    keep = set(cls.relevant(spec)) | {SHORTCUT.name}
    changes = {g.name: g.default for g in cls.genes if g.name not in keep}
    return spec.with_(**changes) if changes else spec


def spec_errors(spec: OpSpec, d_model: int, context: int) -> list[str]:
    """Every reason `spec` is invalid at this width and context, each naming the field."""
    if spec.family not in families():
        return [f"family: unknown operator family {spec.family!r} (known: {', '.join(sorted(FAMILIES))})"]
    cls = family(spec.family)
    errors = []
    for gene in genes(spec.family):
        value = getattr(spec, gene.name)
        if value not in gene.domain:
            errors.append(f"{gene.name}: {value!r} is not accepted by {spec.family} (allowed: {list(gene.domain)})")
    if not errors and spec.get("channel_mixing") == "grouped" and d_model % GROUPS:
        errors.append(f"channel_mixing: grouped needs d_model divisible by {GROUPS}, got {d_model}")
    if not errors:
        errors += cls.constraint_errors(d_model, spec, context)
    return errors


def repair_spec(spec: OpSpec, d_model: int, context: int) -> OpSpec:
    """Deterministically turn any spec of a known family into a valid, canonical one."""
    cls = family(spec.family)
    changes = {}
    for gene in genes(spec.family):
        value = getattr(spec, gene.name)
        if value in gene.domain:
            continue
        numeric = [a for a in gene.domain if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(numeric) == len(gene.domain):
            changes[gene.name] = min(gene.domain, key=lambda a: (abs(a - value), a))
        else:
            changes[gene.name] = gene.default
    spec = spec.with_(**changes)
    if spec.get("channel_mixing") == "grouped" and d_model % GROUPS:
        spec = spec.with_(channel_mixing="dense")
    spec = cls.repair(d_model, spec, context)
    return canonical_spec(spec)


# -- building and costs ------------------------------------------------------------------------------------------
def _base(spec: OpSpec) -> OpSpec:
    return spec.with_(shortcut=False) if spec.get("shortcut") else spec


def build_operator(d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0) -> nn.Module:
    """The operator of one layer; `layer` is its 0-based depth (for depth-dependent initialisation)."""
    cls = family(spec.family)
    op: nn.Module = cls(d_model, _base(spec), reuse_features=reuse_features, layer=layer)
    if spec.get("shortcut"):
        op = AugmentedShortcut(op, d_model)
    return op


def featurizer_module(op: nn.Module) -> LIVOperator:
    """The family operator inside a built layer (under its shortcut wrapper, if any)."""
    return op.op if isinstance(op, AugmentedShortcut) else op


def param_count(d_model: int, spec: OpSpec, reuse_features: bool = False) -> int:
    cls = family(spec.family)
    n = cls.param_count(d_model, _base(spec), reuse_features)
    if spec.get("shortcut"):
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
    if spec.get("shortcut"):
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


def forms() -> tuple[str, ...]:
    """Every family's form names (LIVOperator.forms, else the family), in codec order."""
    return tuple(g for cls in families().values() for g in (cls.forms or (cls.family,)))


def form(spec: OpSpec) -> str:
    return family(spec.family).form(spec)


def horizons(spec: OpSpec) -> tuple[int, ...]:
    """Where the operator's behaviour changes along time (LIVOperator.horizons)."""
    return family(spec.family).horizons(spec)


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
    """The family default, then each value of each gene changed alone (the shortcut wrapper among them).

    Repaired and deduplicated: what the test sweep and export sweep run for every registered family.
    """
    base = default_spec(name)
    out = [base]
    for gene in genes(name):
        for value in gene.domain:
            out.append(base.with_(**{gene.name: value}))
    seen, unique = set(), []
    for spec in out:
        spec = repair_spec(spec, d_model, context)
        if spec not in seen:
            seen.add(spec)
            unique.append(spec)
    return unique
