"""Genome: JSON and integer-vector round trips, hashing, validation messages, repair under hypothesis."""

import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.genome import Genome, GenomeCodec, GenomeError, LayerGene
from factory.genome.references import reference_genomes
from factory.genome.space import SearchSpace
from factory.ops import registry

REFS = reference_genomes()
SPACE = SearchSpace.create(n_layers=6, d_model=64, context=128)
NO_LATENTS = SearchSpace.create(n_layers=6, d_model=64, context=128, latents=0)
CODEC = GenomeCodec(n_layers=6)


@pytest.mark.parametrize("name", sorted(REFS))
def test_reference_json_round_trip_and_hash(name):
    g = REFS[name]
    back = Genome.from_json(g.to_json())
    assert back == g and back.name == name
    assert back.hash() == g.hash()
    assert replace(g, name="renamed").hash() == g.hash()  # the name is not part of the architecture


@pytest.mark.parametrize("name", sorted(REFS))
def test_reference_vector_round_trip(name):
    g = REFS[name]
    codec = GenomeCodec(n_layers=g.n_layers)
    v = codec.encode(g)
    assert len(v) == codec.length
    assert codec.decode(v).canonical() == g.canonical()


def test_reference_hashes_are_distinct():
    hashes = {g.hash() for g in REFS.values()}
    assert len(hashes) == len(REFS)


vectors = st.lists(st.integers(-1000, 1000), min_size=CODEC.length, max_size=CODEC.length)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vectors)
def test_repair_of_any_vector_is_valid_canonical_and_deterministic(vector):
    g = CODEC.repair(vector)
    assert g.errors() == []
    assert g == g.canonical()
    assert CODEC.repair(vector) == g  # deterministic
    # Lossless on canonical genomes: encode then decode gives it back; repair is idempotent.
    v = CODEC.encode(g)
    assert CODEC.decode(v).canonical() == g
    assert CODEC.repair(v) == g


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_space_projection_keeps_frozen_genes(vector):
    g = SPACE.repair(vector)
    assert (g.d_model, g.context) == (64, 128)
    assert 0 <= g.latents < g.context  # the latent count is a free gene (Perceiver-AR in the search)
    assert SPACE.contains(g)
    assert NO_LATENTS.repair(vector).latents == 0  # and frozen where a space fixes it


def test_equal_architectures_hash_equal():
    conv, glu = registry.default_spec("short_conv"), registry.default_spec("glu")
    a = Genome(d_model=64, classes=(conv, glu), layers=(LayerGene(0), LayerGene(1)))
    # Same model written differently: classes in another order plus an unused one, a lone "tied" layer.
    b = Genome(
        d_model=64,
        classes=(glu, registry.default_spec("glu").with_(expansion=4), conv),
        layers=(LayerGene(2, tie_group=3, share="tied"), LayerGene(0)),
    )
    assert a.hash() == b.hash()
    # A gene the spec's form does not use does not matter either (Hyena's filter length means nothing to the short
    # filter); a gene another family declares cannot be given at all.
    c = Genome(d_model=64, classes=(conv.with_(length=1024), glu), layers=(LayerGene(0), LayerGene(1)))
    assert c.hash() == a.hash()
    with pytest.raises(ValueError, match="glu has no gene 'heads'"):
        glu.with_(heads=8)
    d = Genome(d_model=64, classes=(conv, glu.with_(expansion=4)), layers=(LayerGene(0), LayerGene(1)))
    assert d.hash() != a.hash()


def _genome_dict():
    return json.loads(REFS["transformer++"].to_json())


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["global"].update(d_model=-4), "global.d_model"),
        (lambda d: d["classes"][0].update(heads=3), "classes[0].heads"),
        (lambda d: d["classes"][0].update(family="transformer"), "classes[0].family"),
        (lambda d: d["layers"][2].update(op_class=9), "layers[2].op_class"),
        (lambda d: d["layers"][1].update(features="reuse"), "layers[1].features"),
        (lambda d: d["global"].update(norm="batchnorm"), "global.norm"),
        (lambda d: d["global"].update(latents=999), "global.latents"),
    ],
)
def test_validation_names_the_field(mutate, field):
    d = _genome_dict()
    mutate(d)
    g = Genome.from_dict(d)
    errors = g.errors()
    assert errors and errors[0].startswith(field), errors


@pytest.mark.parametrize(
    "text, field",
    [
        ("{not json", "genome"),
        (json.dumps({"schema_version": 99}), "schema_version"),
        (json.dumps({**_genome_dict(), "extra": 1}), "extra"),
        (json.dumps({**_genome_dict(), "layers": "x"}), "layers"),
    ],
)
def test_malformed_json_names_the_field(text, field):
    with pytest.raises(GenomeError, match=f"^{field.replace('[', '.').replace(']', '.')}"):
        Genome.from_json(text)


def test_feature_sharing_plan():
    attn, glu = registry.default_spec("attention"), registry.default_spec("glu")
    g = Genome(
        d_model=64,
        classes=(attn, glu),
        layers=(
            LayerGene(0, feature_group=1, features="reuse"),
            LayerGene(1),
            LayerGene(0, feature_group=1, features="reuse"),
            LayerGene(0),
        ),
    ).validate()
    assert g.feature_source() == [None, None, 0, None]
    assert g.publishers() == {0}
