"""The flat integer vector that evolution mutates and recombines, and `repair()`.

Layout (codec version 2) for a codec with `n_layers` layers and `n_classes` class slots:

    [ global genes | class slot 0 | ... | class slot K-1 | layer 0 genes | ... | layer L-1 genes ]

    class slot = [ family | family 0's genes | family 1's genes | ... | shortcut ]

A class slot holds the family gene, then one block per registered family (in the order of the families' codes)
with that family's own genes, then the shortcut wrapper's gene shared by every token mixer. Only the chosen
family's block is read; the others are neutral (encoded at their defaults). Every gene is an index into its
domain (declared with its family), so neighbouring integers are neighbouring values. A family added later takes
the next code and appends its block, and the layout's `fingerprint` changes with it. The mapping is lossless on
canonical genomes: `decode(encode(g)) == g`. `repair()` takes any integer vector of the right length
(out-of-range genes wrap around) and returns a valid canonical genome, deterministically.

Version 1 vectors (one gene per field of a record shared by all families) are read by `decode_v1`
(`factory.genome.migrate`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from factory.genome.schema import FEATURE_STRATEGIES, NORMS, SHARE_STRATEGIES, Genome, GenomeError, LayerGene
from factory.ops import registry
from factory.ops.base import SHORTCUT, OpSpec

CODEC_VERSION = 2
# Global genes and their domains. vocab_size is fixed by the byte tokenizer and is not a gene.
GLOBAL_DOMAINS: dict[str, tuple] = {
    "d_model": (32, 48, 64, 96, 128, 192, 256, 384, 512, 768),
    "context": (64, 128, 256, 512, 1024, 2048, 4096),
    "norm": NORMS,
    "latents": (0, 16, 32, 64, 128),
    "tie_embeddings": (False, True),
}
# The family gene's domain: every registered family, in the order of their declared codes.
FAMILY_ORDER = tuple(registry.families())
GROUPS = 4  # sharing groups per strategy
LAYER_DOMAINS: dict[str, tuple] = {
    "op_class": None,  # 0..n_classes-1, set per codec
    "tie_group": tuple(range(GROUPS)),
    "share": SHARE_STRATEGIES,
    "feature_group": tuple(range(GROUPS)),
    "features": FEATURE_STRATEGIES,
}


def op_domains() -> dict[str, tuple]:
    """The genes of one class slot, in vector order: "family", "<family>.<gene>" for each family's own genes,
    "shortcut"."""
    out: dict[str, tuple] = {"family": FAMILY_ORDER}
    for name, cls in registry.families().items():
        out.update({f"{name}.{g.name}": g.domain for g in cls.genes})
    out[SHORTCUT.name] = SHORTCUT.domain
    return out


@dataclass(frozen=True)
class GenomeCodec:
    n_layers: int
    n_classes: int = 4
    vocab_size: int = 256

    @cached_property
    def op_domains(self) -> dict[str, tuple]:
        return op_domains()

    @cached_property
    def layer_domains(self) -> dict[str, tuple]:
        return {**LAYER_DOMAINS, "op_class": tuple(range(self.n_classes))}

    @cached_property
    def domains(self) -> list[tuple[str, tuple]]:
        """(gene name, domain) for every position of the vector, in order."""
        out = [(f"global.{k}", d) for k, d in GLOBAL_DOMAINS.items()]
        for c in range(self.n_classes):
            out += [(f"classes[{c}].{k}", d) for k, d in self.op_domains.items()]
        for i in range(self.n_layers):
            out += [(f"layers[{i}].{k}", d) for k, d in self.layer_domains.items()]
        return out

    @property
    def length(self) -> int:
        return len(self.domains)

    @property
    def upper_bounds(self) -> list[int]:
        """Largest valid integer at each position (what samplers and mutation draw within)."""
        return [len(d) - 1 for _, d in self.domains]

    # -- genome -> vector --------------------------------------------------------------------------------------
    def _slot_values(self, spec: OpSpec) -> list:
        values = []
        for key in self.op_domains:
            if key == "family":
                values.append(spec.family)
            elif key == SHORTCUT.name:
                values.append(spec.get(SHORTCUT.name, SHORTCUT.default))
            else:
                family, gene = key.split(".", 1)
                values.append(getattr(spec, gene) if family == spec.family else registry.gene_defaults(family)[gene])
        return values

    def encode(self, genome: Genome) -> list[int]:
        g = genome.canonical()
        if g.n_layers != self.n_layers:
            raise GenomeError(f"global.n_layers: codec has {self.n_layers} layers, genome has {g.n_layers}")
        if len(g.classes) > self.n_classes:
            raise GenomeError(f"classes: codec has {self.n_classes} class slots, genome uses {len(g.classes)}")
        if g.vocab_size != self.vocab_size:
            raise GenomeError(f"global.vocab_size: codec is for {self.vocab_size}, genome has {g.vocab_size}")
        values = [getattr(g, k) for k in GLOBAL_DOMAINS]
        filler = registry.default_spec(FAMILY_ORDER[-1])
        for spec in list(g.classes) + [filler] * (self.n_classes - len(g.classes)):
            values += self._slot_values(spec)
        for layer in g.layers:
            values += [getattr(layer, k) for k in self.layer_domains]
        vector = []
        for (name, domain), value in zip(self.domains, values):
            if value not in domain:
                raise GenomeError(f"{name}: {value!r} is outside the search space {list(domain)}")
            vector.append(domain.index(value))
        return vector

    # -- vector -> genome --------------------------------------------------------------------------------------
    def _spec(self, slot: dict) -> OpSpec:
        family = slot["family"]
        genes = {key.split(".", 1)[1]: v for key, v in slot.items() if key.startswith(f"{family}.")}
        if registry.family(family).mixes_tokens:
            genes[SHORTCUT.name] = slot[SHORTCUT.name]
        return OpSpec(family, **genes)

    def decode(self, vector) -> Genome:
        """Map a vector to a genome without repairing it (it may be invalid); genes wrap into their domain."""
        if len(vector) != self.length:
            raise GenomeError(f"vector: expected {self.length} genes, got {len(vector)}")
        values = [d[int(v) % len(d)] for (_, d), v in zip(self.domains, vector)]
        pos = len(GLOBAL_DOMAINS)
        glob = dict(zip(GLOBAL_DOMAINS, values[:pos]))
        classes = []
        n_op = len(self.op_domains)
        for _ in range(self.n_classes):
            classes.append(self._spec(dict(zip(self.op_domains, values[pos : pos + n_op]))))
            pos += n_op
        layers = []
        n_layer = len(self.layer_domains)
        for _ in range(self.n_layers):
            layers.append(LayerGene(**dict(zip(self.layer_domains, values[pos : pos + n_layer]))))
            pos += n_layer
        return Genome(classes=tuple(classes), layers=tuple(layers), vocab_size=self.vocab_size, **glob)

    def decode_v1(self, vector) -> Genome:
        """A codec version 1 vector of this many layers and classes, unrepaired (`factory.genome.migrate`)."""
        from factory.genome.migrate import decode_v1, spec_from_v1

        try:
            glob, records, layers = decode_v1(vector, self.n_layers, self.n_classes)
        except ValueError as e:
            raise GenomeError(str(e)) from None
        return Genome(classes=tuple(spec_from_v1(r) for r in records), layers=tuple(LayerGene(**g) for g in layers),
                      vocab_size=self.vocab_size, **glob)

    def repair(self, vector) -> Genome:
        return repair(self.decode(vector))


def repair(genome: Genome) -> Genome:
    """Deterministically turn a structurally complete genome into a valid, canonical one.

    Operator specs are repaired by their family (nearest accepted values, cross-field rules); feature reuse and
    featurizer sharing are dropped where a family has none; sharing sets that mix feature producers and consumers are untied;
    Perceiver-AR is switched off when its layer 0 cannot be a dense attention cross-attention.
    """
    classes = tuple(registry.repair_spec(c, genome.d_model, genome.context) for c in genome.classes)
    layers = []
    for g in genome.layers:
        op_class = g.op_class % len(classes)
        if g.features == "reuse" and not registry.feature_kinds(classes[op_class]):
            g = replace(g, features="none")
        if g.share == "featurizer" and not registry.featurizer(classes[op_class]):
            g = replace(g, share="none")
        layers.append(replace(g, op_class=op_class))
    genome = replace(genome, classes=classes, layers=tuple(layers))
    if genome.latents:
        spec0 = genome.layer_spec(0)
        ok = (
            spec0.family == "attention"
            and spec0.window == 0
            and not spec0.differential
            and genome.n_layers >= 2
            and genome.latents < genome.context
        )
        if ok:
            first = replace(genome.layers[0], share="none", features="none")
            # Later layers run on the latents only; they cannot reuse the cross-attention's input features.
            rest = tuple(replace(g, features="none") if g.op_class == genome.layers[0].op_class else g for g in genome.layers[1:])
            genome = replace(genome, layers=(first,) + rest)
        else:
            genome = replace(genome, latents=0)
    genome = genome.canonical()
    # Untie members of sharing sets whose feature roles disagree (one module cannot both have and lack K/V).
    while genome._sharing_errors():
        source = genome.feature_source()
        layers = list(genome.layers)
        for owner in (genome.weight_owner(), genome.featurizer_owner()):
            for i in range(genome.n_layers):
                if owner[i] != i and (source[i] is None) != (source[owner[i]] is None):
                    layers[i] = replace(layers[i], share="none")
        genome = replace(genome, layers=tuple(layers)).canonical()
    return genome.validate()
