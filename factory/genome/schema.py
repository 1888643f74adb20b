"""The hierarchical architecture genome (STAR-style), its canonical JSON form, hash and validation.

Three levels:
- global settings: width, vocabulary, context, norm, Perceiver-AR latent window, embedding tying;
- the operator genome: one `OpSpec` per LIV class (family and its settings);
- the backbone genome: per layer, five genes: the LIV class, the weight-sharing group and strategy (STAR's
  featurizer sharing, or tying the whole operator) and the feature-group-sharing group and strategy (a later layer
  reuses an earlier layer's features, e.g. keys and values, and keeps no cache of its own).

Every layer is a pre-norm residual block `x + op(norm(x))`. Depth is the number of layers.
Sharing semantics (one rule for every kind): layers of the same class with the same strategy and group form a set.
- featurizer sharing (`share = "featurizer"`): the set's layers share the featurizer, the projections that compute
  the input-dependent part of the token mixing (attention's W_q and W_k, a recurrence's gates; the family's
  `featurizer`), and keep their own values and output projections;
- whole-operator tying (`share = "tied"`): the set's layers share one operator module (all its weights), each
  applied to its own input;
- feature sharing: layers of the same feature-capable class whose strategy is `reuse` and whose feature group is
  equal form a set; the first of the set computes its features, the later ones reuse them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace

from factory.ops import registry
from factory.genome.migrate import spec_from_v1
from factory.ops.base import OpSpec

SCHEMA_VERSION = 3
# Versions still read, through a migration: version 2 had one operator record with the same fields for every
# family and two convolution families (short_conv, long_conv); `factory.genome.migrate` maps it onto the genes
# each family declares (the same architectures, the same parameter names).
MIGRATED = {2}
# What each older schema version meant that version 2 computes differently: an old genome is refused, not
# silently rebuilt as another architecture.
SCHEMA_CHANGES = {
    1: "version 2 redefines differential operators (Differential Transformer attention, differential linear "
       "attention; other families have none), the linear-attention decay kinds, the weight-sharing strategies "
       "(featurizer sharing added beside whole-operator tying) and Hyena's filter length",
}
# Appended values keep earlier integer encodings: "featurizer" was added after "tied".
SHARE_STRATEGIES = ("none", "tied", "featurizer")
FEATURE_STRATEGIES = ("none", "reuse")
NORMS = ("rmsnorm", "layernorm")


@dataclass(frozen=True)
class LayerGene:
    op_class: int
    tie_group: int = 0
    share: str = "none"  # featurizer sharing strategy: none | tied
    feature_group: int = 0
    features: str = "none"  # feature-group sharing strategy: none | reuse


@dataclass(frozen=True)
class Genome:
    d_model: int
    classes: tuple[OpSpec, ...]
    layers: tuple[LayerGene, ...]
    vocab_size: int = 256
    context: int = 256  # longest sequence the model is trained and used at
    norm: str = "rmsnorm"
    latents: int = 0  # Perceiver-AR: the last `latents` positions are latents; 0 = off
    tie_embeddings: bool = True
    name: str = field(default="", compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_spec(self, i: int) -> OpSpec:
        return self.classes[self.layers[i].op_class]

    # -- sharing plan ------------------------------------------------------------------------------------------
    def weight_owner(self) -> list[int]:
        """For each layer, the index of the layer whose operator module (weights) it uses (itself if untied)."""
        return self._set_owner("tied")

    def featurizer_owner(self) -> list[int]:
        """For each layer, the index of the layer whose featurizer it uses (itself if it shares none)."""
        return self._set_owner("featurizer")

    def _set_owner(self, strategy: str) -> list[int]:
        owner, first = [], {}
        for i, g in enumerate(self.layers):
            if g.share == strategy:
                owner.append(first.setdefault((g.op_class, g.tie_group), i))
            else:
                owner.append(i)
        return owner

    def feature_source(self) -> list[int | None]:
        """For each layer, the earlier layer whose features it reuses, or None if it computes its own."""
        source, first = [], {}
        for i, g in enumerate(self.layers):
            if g.features == "reuse":
                producer = first.setdefault((g.op_class, g.feature_group), i)
                source.append(None if producer == i else producer)
            else:
                source.append(None)
        return source

    def publishers(self) -> set[int]:
        return {s for s in self.feature_source() if s is not None}

    # -- canonical form, JSON and hash -------------------------------------------------------------------------
    def canonical(self) -> "Genome":
        """One representative per architecture: equal models give equal canonical genomes (and hashes).

        Operator specs drop fields their family ignores; classes are deduplicated and numbered in order of first
        use (unused ones dropped); sharing sets of one member lose their strategy; group labels are renumbered in
        order of first appearance.
        """
        specs = [c.canonical() for c in self.classes]
        order: list[OpSpec] = []
        for g in self.layers:
            if specs[g.op_class] not in order:
                order.append(specs[g.op_class])
        layers = [replace(g, op_class=order.index(specs[g.op_class])) for g in self.layers]
        layers = _canonical_share_sets(layers)
        layers = _canonical_sets(layers, "features", "reuse", "feature_group")
        return replace(self, classes=tuple(order), layers=tuple(layers))

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "global": {
                "d_model": self.d_model,
                "n_layers": self.n_layers,
                "vocab_size": self.vocab_size,
                "context": self.context,
                "norm": self.norm,
                "latents": self.latents,
                "tie_embeddings": self.tie_embeddings,
            },
            "classes": [c.to_dict() for c in self.classes],  # family, then the family's genes
            "layers": [
                {f.name: getattr(g, f.name) for f in fields(LayerGene)} for g in self.layers
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def hash(self) -> str:
        """Stable content hash of the architecture (canonical form, name excluded)."""
        data = self.canonical().to_dict()
        data.pop("name")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict) -> "Genome":
        """Parse the JSON form. Raises GenomeError naming the field on malformed input."""
        if not isinstance(data, dict):
            raise GenomeError("genome: expected a JSON object")
        version = data.get("schema_version")
        if version in SCHEMA_CHANGES:
            raise GenomeError(
                f"schema_version: {version} is no longer read, {SCHEMA_CHANGES[version]}; "
                f"re-create the genome (or re-run the search) with this version"
            )
        if version != SCHEMA_VERSION and version not in MIGRATED:
            raise GenomeError(f"schema_version: expected {SCHEMA_VERSION}, got {version!r}")
        allowed_top = {"schema_version", "name", "global", "classes", "layers"}
        extra = set(data) - allowed_top
        if extra:
            raise GenomeError(f"{sorted(extra)[0]}: unknown field")
        glob = _field(data, "global", dict)
        classes_raw = _field(data, "classes", list)
        layers_raw = _field(data, "layers", list)
        classes = []
        for i, c in enumerate(classes_raw):
            if not isinstance(c, dict):
                raise GenomeError(f"classes[{i}]: expected an object")
            try:
                classes.append(spec_from_v1(c) if version == 2 else OpSpec.from_dict(c))
            except (TypeError, ValueError) as e:
                raise GenomeError(f"classes[{i}]: {e}") from None
        layers = []
        known = {f.name for f in fields(LayerGene)}
        for i, g in enumerate(layers_raw):
            if not isinstance(g, dict):
                raise GenomeError(f"layers[{i}]: expected an object")
            extra = set(g) - known
            if extra:
                raise GenomeError(f"layers[{i}].{sorted(extra)[0]}: unknown field")
            if "op_class" not in g:
                raise GenomeError(f"layers[{i}].op_class: missing")
            layers.append(LayerGene(**g))
        known_glob = {"d_model", "n_layers", "vocab_size", "context", "norm", "latents", "tie_embeddings"}
        extra = set(glob) - known_glob
        if extra:
            raise GenomeError(f"global.{sorted(extra)[0]}: unknown field")
        if "d_model" not in glob:
            raise GenomeError("global.d_model: missing")
        if "n_layers" in glob and glob["n_layers"] != len(layers):
            raise GenomeError(f"global.n_layers: says {glob['n_layers']} but {len(layers)} layers are listed")
        kwargs = {k: v for k, v in glob.items() if k != "n_layers"}
        return cls(classes=tuple(classes), layers=tuple(layers), name=str(data.get("name", "")), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Genome":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenomeError(f"genome: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data)

    # -- validation --------------------------------------------------------------------------------------------
    def errors(self) -> list[str]:
        """Every reason this genome is invalid, each naming the field and why. Empty means valid."""
        errs = []

        def check(cond, msg):
            if not cond:
                errs.append(msg)

        check(_is_int(self.d_model) and self.d_model > 0, f"global.d_model: must be a positive integer, got {self.d_model!r}")
        check(_is_int(self.vocab_size) and self.vocab_size > 0, f"global.vocab_size: must be a positive integer, got {self.vocab_size!r}")
        check(_is_int(self.context) and self.context > 0, f"global.context: must be a positive integer, got {self.context!r}")
        check(self.norm in NORMS, f"global.norm: {self.norm!r} is not one of {list(NORMS)}")
        check(isinstance(self.tie_embeddings, bool), "global.tie_embeddings: must be true or false")
        check(len(self.layers) > 0, "layers: a genome needs at least one layer")
        check(len(self.classes) > 0, "classes: a genome needs at least one operator class")
        if errs:
            return errs
        for i, spec in enumerate(self.classes):
            errs += [f"classes[{i}].{e}" for e in registry.spec_errors(spec, self.d_model, self.context)]
        for i, g in enumerate(self.layers):
            where = f"layers[{i}]"
            if not (_is_int(g.op_class) and 0 <= g.op_class < len(self.classes)):
                errs.append(f"{where}.op_class: {g.op_class!r} is not a class index (genome has {len(self.classes)})")
                continue
            check(g.share in SHARE_STRATEGIES, f"{where}.share: {g.share!r} is not one of {list(SHARE_STRATEGIES)}")
            check(g.features in FEATURE_STRATEGIES, f"{where}.features: {g.features!r} is not one of {list(FEATURE_STRATEGIES)}")
            check(_is_int(g.tie_group) and g.tie_group >= 0, f"{where}.tie_group: must be a non-negative integer")
            check(_is_int(g.feature_group) and g.feature_group >= 0, f"{where}.feature_group: must be a non-negative integer")
            if g.features == "reuse" and self.classes[g.op_class].family in registry.families():
                if not registry.feature_kinds(self.classes[g.op_class]):
                    errs.append(f"{where}.features: family {self.classes[g.op_class].family} has no features to share")
            if g.share == "featurizer" and self.classes[g.op_class].family in registry.families():
                if not registry.featurizer(self.classes[g.op_class]):
                    errs.append(f"{where}.share: family {self.classes[g.op_class].family} has no featurizer to share")
        if errs:
            return errs
        errs += self._sharing_errors()
        if self.latents:
            check(_is_int(self.latents) and 0 < self.latents < self.context,
                  f"global.latents: must be between 1 and context-1 ({self.context - 1}), got {self.latents!r}")
            check(self.layer_spec(0).family == "attention",
                  "global.latents: Perceiver-AR needs layer 0 to be an attention class (its cross-attention)")
            check(self.n_layers >= 2, "global.latents: Perceiver-AR needs at least 2 layers")
            g0 = self.layers[0]
            check(g0.share == "none" and g0.features == "none",
                  "layers[0]: the Perceiver-AR cross-attention layer cannot share weights or features")
            check(self.layer_spec(0).get("window") == 0 and not self.layer_spec(0).get("differential"),
                  "classes: the Perceiver-AR cross-attention class must be dense (window 0) and not differential")
        return errs

    def _sharing_errors(self) -> list[str]:
        errs = []
        source = self.feature_source()
        for owner in (self.weight_owner(), self.featurizer_owner()):
            for i in range(self.n_layers):
                # A module is built either with or without its own feature projections; a sharing set must agree.
                if owner[i] != i and (source[i] is None) != (source[owner[i]] is None):
                    errs.append(
                        f"layers[{i}].share: shares weights with layer {owner[i]} but one of them reuses features "
                        "and the other does not"
                    )
        return errs

    def validate(self) -> "Genome":
        errs = self.errors()
        if errs:
            raise GenomeError(errs[0] if len(errs) == 1 else f"{errs[0]} (and {len(errs) - 1} more)")
        return self


class GenomeError(ValueError):
    """A malformed or invalid genome; the message names the field."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(data: dict, key: str, kind: type):
    if key not in data:
        raise GenomeError(f"{key}: missing")
    if not isinstance(data[key], kind):
        raise GenomeError(f"{key}: expected a {kind.__name__}")
    return data[key]


def _canonical_share_sets(layers: list[LayerGene]) -> list[LayerGene]:
    """Weight-sharing sets are keyed by strategy too: a tied set and a featurizer set may carry the same label."""
    for strategy in SHARE_STRATEGIES[1:]:
        layers = _canonical_sets(layers, "share", strategy, "tie_group")
    return layers


def _canonical_sets(layers: list[LayerGene], strategy: str, active: str, group: str) -> list[LayerGene]:
    """Drop sharing from sets with one member and renumber group labels in order of first appearance."""
    members: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(layers):
        if getattr(g, strategy) == active:
            members.setdefault((g.op_class, getattr(g, group)), []).append(i)
    labels: dict[tuple[int, int], int] = {}
    per_class: dict[int, int] = {}
    out = []
    for i, g in enumerate(layers):
        key = (g.op_class, getattr(g, group))
        if getattr(g, strategy) == active and len(members[key]) > 1:
            if key not in labels:  # sets are told apart by (class, label): number them per class
                labels[key] = per_class.get(g.op_class, 0)
                per_class[g.op_class] = labels[key] + 1
            out.append(replace(g, **{group: labels[key]}))
        elif getattr(g, strategy) in (active, "none"):  # a set of one shares nothing
            out.append(replace(g, **{strategy: "none", group: 0}))
        else:  # another strategy's set, numbered by its own pass
            out.append(g)
    return out
