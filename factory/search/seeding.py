"""The search space of a run, the reference genomes adapted to it, and cheap probe genomes.

Adapting a reference (chosen rule): keep its operator classes and its layer *pattern*, truncated or tiled to the
space's depth (layer i of the adapted genome is layer i mod n of the reference), at the space's width and context;
then repair (e.g. head counts that must divide the width). Truncating keeps the local block structure (a
transformer block stays attention + SwiGLU), which proportional resampling would break. A reference is left out
when it uses a family the space excludes, or more operator classes than the space has slots.
"""

from __future__ import annotations

from dataclasses import replace

from factory.errors import FactoryError
from factory.genome.codec import FAMILY_ORDER, GLOBAL_DOMAINS
from factory.genome.codec import repair as repair_genome
from factory.genome.schema import Genome, GenomeError, LayerGene
from factory.genome.space import SearchSpace
from factory.ops import registry
from factory.search.config import SearchConfig

BASELINES = ("transformer++", "striped-hybrid")


def resolve_families(families) -> tuple[str, ...]:
    if not families:
        return FAMILY_ORDER
    known = registry.known_names()  # families and their forms' aliases (short_conv: conv with the short filter)
    for f in families:
        if f not in known:
            raise FactoryError(f"--families: unknown operator family {f!r} (registered: {', '.join(known)})")
    return tuple(families)


def build_space(config: SearchConfig) -> SearchSpace:
    for key, flag in (("d_model", "--d-model"), ("context", "--context")):
        value, domain = getattr(config, key), GLOBAL_DOMAINS[key]
        if value not in domain:
            raise FactoryError(f"{flag} {value} is not one of the space's values: {', '.join(map(str, domain))}")
    try:
        # latents=None: the Perceiver-AR latent count is a gene like any other (repair switches it off where layer 0
        # cannot be its dense attention cross-attention, or where it is not below the context).
        return SearchSpace.create(n_layers=config.n_layers, d_model=config.d_model, context=config.context,
                                  n_classes=config.n_classes, latents=None, families=resolve_families(config.families))
    except GenomeError as e:
        raise FactoryError(f"search space: {e}") from None


def space_globals(space: SearchSpace) -> Genome:
    """A genome carrying the space's frozen global genes (width, context, norm, latents, embedding tying)."""
    return space.codec.decode(space.project([0] * space.n_var))


def adapt_to_space(reference: Genome, space: SearchSpace, restrict_families: bool = True) -> tuple[Genome | None, str]:
    """(adapted genome or None, a note saying what was done or why it was left out)."""
    frame = space_globals(space)
    n = space.codec.n_layers
    layers = tuple(reference.layers[i % reference.n_layers] for i in range(n))
    # Families are checked on the adapted pattern: a truncated reference may no longer use an excluded family.
    used = sorted({reference.classes[g.op_class].family for g in layers})
    allowed = space.families if restrict_families else tuple(registry.families())
    missing = [f for f in used if f not in allowed]
    if missing:
        return None, f"uses {missing[0]}, which this space excludes"
    latents_frozen = list(GLOBAL_DOMAINS).index("latents") in space.frozen_positions
    latents = frame.latents if latents_frozen else reference.latents
    genome = replace(reference, d_model=frame.d_model, context=frame.context, norm=frame.norm, latents=latents,
                     tie_embeddings=frame.tie_embeddings, layers=layers)
    try:
        genome = repair_genome(genome)
    except (GenomeError, ValueError) as e:
        return None, f"cannot be adapted: {e}"
    if len(genome.classes) > space.codec.n_classes:
        return None, f"needs {len(genome.classes)} operator classes, the space has {space.codec.n_classes}"
    notes = []
    if reference.n_layers != n:
        notes.append(f"{'truncated' if n < reference.n_layers else 'tiled'} {reference.n_layers}->{n} layers")
    if reference.d_model != frame.d_model:
        notes.append(f"width {reference.d_model}->{frame.d_model}")
    if reference.context != frame.context:
        notes.append(f"context {reference.context}->{frame.context}")
    if reference.latents != genome.latents:
        notes.append("Perceiver-AR latents off")
    if restrict_families:
        try:
            genome = replace(space.repair(space.encode(genome)), name=reference.name)
        except GenomeError as e:
            return None, f"outside the space: {e}"
    return replace(genome, name=reference.name), ", ".join(notes) or "fits as is"


def adapted_references(space: SearchSpace, restrict_families: bool = True) -> list[tuple[str, Genome | None, str]]:
    from factory.genome.references import reference_genomes

    out = []
    for name, ref in reference_genomes().items():
        try:
            genome, note = adapt_to_space(ref, space, restrict_families)
        except (ValueError, KeyError) as e:  # a family being rebuilt by someone else: leave it out, say why
            genome, note = None, f"cannot be adapted: {e}"
        out.append((name, genome, note))
    return out


def cheapest_probes(space: SearchSpace) -> list[Genome]:
    """Per allowed family and spec variant: every layer that spec, untied and all tied in one group (the fewest
    parameters), and with feature reuse where the family has features (the smallest cache)."""
    frame = space_globals(space)
    out = []
    for fam in space.families:
        try:
            variants = registry.spec_variants(fam, frame.d_model, frame.context)
        except Exception:  # noqa: BLE001 - a family mid-edit elsewhere must not break the probe
            continue
        for spec in variants:
            for share, features in (("none", "none"), ("tied", "none"), ("tied", "reuse")):
                if features == "reuse" and not registry.feature_kinds(spec):
                    continue
                layer = LayerGene(op_class=0, share=share, features=features)
                g = replace(frame, classes=(spec,), layers=(layer,) * space.codec.n_layers, name="")
                try:
                    out.append(space.repair(space.encode(repair_genome(g))))
                except (GenomeError, ValueError):
                    continue
    return out
