"""A search space: a genome codec with some genes frozen (width, context, norm... fixed during a search, as in
STAR) and an optional restriction of the operator families. Sampling and repair both go through `project()`, so
a vector from anywhere (a sampler, crossover, mutation) lands on a valid genome of this space.

A family list may name a family's form by its alias (`short_conv` = conv with the short filter): the gene the
alias fixes is held at its value in every class slot of that family, unless the list also allows other values
(`short_conv,long_conv` = every conv)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from factory.genome.codec import GLOBAL_DOMAINS, FAMILY_ORDER, GenomeCodec
from factory.genome.schema import Genome, GenomeError
from factory.ops import registry


@dataclass(frozen=True)
class SearchSpace:
    codec: GenomeCodec
    fixed: tuple[tuple[int, int], ...] = ()  # (gene position, value)
    families: tuple[str, ...] = FAMILY_ORDER
    _family_positions: tuple[int, ...] = field(default=(), repr=False)
    # (family position, family index, gene position, value index): the gene held where the slot is that family
    gene_fixes: tuple[tuple[int, int, int, int], ...] = ()

    @classmethod
    def create(
        cls,
        n_layers: int = 8,
        d_model: int = 128,
        context: int = 256,
        n_classes: int = 4,
        norm: str = "rmsnorm",
        latents: int | None = None,
        tie_embeddings: bool = True,
        families: tuple[str, ...] | None = None,
    ) -> "SearchSpace":
        """Freeze the global genes. `latents` is left free by default (None): evolution samples and mutates the
        Perceiver-AR latent count like any other gene, and repair switches it off where layer 0 cannot be its dense
        attention cross-attention or the count is not below the context. An int freezes it (0: no Perceiver-AR)."""
        codec = GenomeCodec(n_layers=n_layers, n_classes=n_classes)
        frozen = {"d_model": d_model, "context": context, "norm": norm, "tie_embeddings": tie_embeddings}
        if latents is not None:
            frozen["latents"] = latents
        fixed = []
        names = list(GLOBAL_DOMAINS)
        for key, value in frozen.items():
            domain = GLOBAL_DOMAINS[key]
            if value not in domain:
                raise GenomeError(f"global.{key}: {value!r} is outside the search space {list(domain)}")
            fixed.append((names.index(key), domain.index(value)))
        fams, forms = [], {}
        for name in families or FAMILY_ORDER:
            try:
                fam, genes = registry.resolve(name)
            except ValueError:
                raise GenomeError(f"families: unknown operator family {name!r}") from None
            if fam not in fams:
                fams.append(fam)
            forms.setdefault(fam, []).append(genes)
        names = [name for name, _ in codec.domains]
        positions = tuple(i for i, name in enumerate(names) if name.endswith(".family"))
        family_domain = codec.op_domains["family"]
        fixes = []
        for fam, listed in forms.items():
            for gene in sorted({k for genes in listed for k in genes}):
                values = {genes.get(gene) for genes in listed}
                if len(values) != 1:  # the plain family or forms with different values: the gene stays free
                    continue
                index = codec.op_domains[f"{fam}.{gene}"].index(values.pop())
                for pos in positions:  # each class slot's "classes[c].family"
                    slot = names[pos].rsplit(".", 1)[0]
                    fixes.append((pos, family_domain.index(fam), names.index(f"{slot}.{fam}.{gene}"), index))
        return cls(codec=codec, fixed=tuple(fixed), families=tuple(fams), _family_positions=positions,
                   gene_fixes=tuple(fixes))

    @property
    def n_var(self) -> int:
        return self.codec.length

    @property
    def upper_bounds(self) -> list[int]:
        return self.codec.upper_bounds

    @property
    def frozen_positions(self) -> set[int]:
        return {p for p, _ in self.fixed}

    def project(self, vector) -> list[int]:
        """Apply the frozen genes and map family genes into the allowed families (deterministic)."""
        v = [int(x) % (ub + 1) for x, ub in zip(vector, self.upper_bounds)]
        for pos, value in self.fixed:
            v[pos] = value
        domain = self.codec.op_domains["family"]
        allowed = [domain.index(f) for f in self.families]
        for pos in self._family_positions:
            if v[pos] not in allowed:
                v[pos] = allowed[v[pos] % len(allowed)]
        for family_pos, family_index, pos, value in self.gene_fixes:
            if v[family_pos] == family_index:
                v[pos] = value
        return v

    def repair(self, vector) -> Genome:
        return self.codec.repair(self.project(vector))

    def encode(self, genome: Genome) -> list[int]:
        return self.codec.encode(genome)

    def sample(self, seed: int) -> Genome:
        rng = random.Random(seed)
        return self.repair([rng.randint(0, ub) for ub in self.upper_bounds])

    def contains(self, genome: Genome) -> bool:
        try:
            v = self.encode(genome)
        except GenomeError:
            return False
        return self.project(v) == v
