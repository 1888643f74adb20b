"""Genomes written before the genes were declared per family (genome schema 2, codec version 1) keep decoding to
the same architectures.

The fixture tests/fixtures/codec_v1/ was written by that code: every reference genome as JSON and as a vector,
24 random vectors with the genomes they repaired to, each with its parameter count, and a checkpoint of a tiny
genome with every family (both convolutions, featurizer sharing, the shortcut wrapper) with its logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factory.genome.codec import GenomeCodec, repair
from factory.genome.metrics import static_metrics
from factory.genome.references import reference_genomes
from factory.genome.schema import SCHEMA_VERSION, Genome, GenomeError
from factory.model import LIVModel
from factory.ops import registry

FIXTURE = Path(__file__).parent / "fixtures" / "codec_v1"
OLD = json.loads((FIXTURE / "old_genomes.json").read_text())


def _params(genome: Genome) -> int:
    return sum(p.numel() for p in LIVModel(genome).parameters())


@pytest.mark.parametrize("item", OLD["references"], ids=lambda r: r["name"])
def test_old_reference_json_and_vectors_decode_to_the_same_architecture(item):
    """Schema-2 JSON and the version-1 vector give one genome: the reference of that name today, with the parameter
    count the old code computed (and the model built from it has that many parameters)."""
    from_json = Genome.from_dict(item["genome"])
    assert item["genome"]["schema_version"] == 2 and from_json.to_dict()["schema_version"] == SCHEMA_VERSION
    codec = GenomeCodec(n_layers=from_json.n_layers, n_classes=item["n_classes"])
    from_vector = repair(codec.decode_v1(item["vector"]))
    assert from_vector == from_json.canonical() == reference_genomes()[item["name"]].canonical()
    assert static_metrics(from_json).params == item["params"] == _params(from_json)
    assert codec.decode(codec.encode(from_json)).canonical() == from_json.canonical()  # and today's codec


def test_old_random_vectors_repair_to_the_genomes_the_old_code_made():
    spec = OLD["random_vectors"]
    codec = GenomeCodec(n_layers=spec["n_layers"], n_classes=spec["n_classes"])
    families = set()
    for item in spec["items"]:
        old = Genome.from_dict(item["genome"])
        assert repair(codec.decode_v1(item["vector"])) == old
        assert static_metrics(old).params == item["params"]
        assert codec.decode(codec.encode(old)).canonical() == old
        families |= {registry.form(c) for c in old.classes}
    assert {"short_conv", "long_conv", "attention", "mamba"} <= families  # the sample reaches the migrated forms


def test_a_checkpoint_saved_by_the_old_code_loads_and_computes_the_same_logits():
    from factory.train import load_checkpoint

    model, _ = load_checkpoint(FIXTURE / "old_checkpoint")
    assert model.genome.hash() != OLD["checkpoint"]["hash"]  # the JSON form changed ...
    assert static_metrics(model.genome).params == OLD["checkpoint"]["params"]  # ... the architecture did not
    assert {registry.form(c) for c in model.genome.classes} >= {"short_conv", "long_conv"}
    expected = load_file(FIXTURE / "old_checkpoint_logits.safetensors")
    with torch.no_grad():
        logits = model(expected["ids"])
    err = ((logits - expected["logits"]).abs().max() / expected["logits"].abs().max()).item()
    assert err <= 1e-6, f"relative error {err:.2e}"


def test_old_records_name_their_fields_when_wrong():
    data = json.loads(json.dumps(OLD["references"][0]["genome"]))
    data["classes"][0]["bogus"] = 1
    with pytest.raises(GenomeError, match=r"classes\[0\]: unknown operator field\(s\): bogus"):
        Genome.from_dict(data)
    data = json.loads(json.dumps(OLD["references"][0]["genome"]))
    data["schema_version"] = SCHEMA_VERSION  # a schema-2 record read as today's: a gene its family lacks
    with pytest.raises(GenomeError, match=r"classes\[0\]: attention has no gene 'decay'"):
        Genome.from_dict(data)
    with pytest.raises(GenomeError, match="vector: a version 1 vector"):
        GenomeCodec(n_layers=2).decode_v1([0, 1, 2])


def test_a_family_list_may_name_a_convolution_form():
    """`short_conv` in a space's family list is conv held at the short filter; with `long_conv` both filters."""
    from factory.genome.space import SearchSpace

    short = SearchSpace.create(n_layers=3, d_model=32, context=64, families=("glu", "short_conv"))
    both = SearchSpace.create(n_layers=3, d_model=32, context=64, families=("short_conv", "long_conv"))
    forms_short, forms_both = set(), set()
    for seed in range(40):
        g = short.sample(seed)
        forms_short |= {registry.form(c) for c in g.classes}
        assert short.contains(g)
        forms_both |= {registry.form(c) for c in both.sample(seed).classes}
    assert forms_short == {"glu", "short_conv"} and forms_both == {"short_conv", "long_conv"}
    with pytest.raises(GenomeError, match="unknown operator family 'hyena'"):
        SearchSpace.create(n_layers=3, d_model=32, context=64, families=("hyena",))


def test_a_search_database_of_schema_2_genomes_is_rewritten_with_todays_hashes(tmp_path):
    """Opening it for writing (a resume) rewrites its genomes in today's form and every hash with them, so the run
    finds its evaluations under the hashes its genomes now have; population rows follow."""
    import sqlite3

    from factory.search.store import Store

    item = next(r for r in OLD["references"] if r["name"] == "striped-hybrid")  # mamba, Hyena, attention
    path = tmp_path / "search.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO evaluations (hash, train_config_hash, generation, status, objectives, violation, static, "
               "measurements, genome, seed, created_at) VALUES (?, 't', 0, 'ok', '{}', 0, '{}', '{}', ?, 0, 0)",
               (item["hash"], json.dumps(item["genome"])))
    db.execute("INSERT INTO population (generation, slot, hash, rank) VALUES (0, 0, ?, 0)", (item["hash"],))
    db.commit()
    db.close()
    with Store(path, readonly=True) as store:  # a reader leaves it as it is
        pass
    with Store(path) as store:
        pass
    db = sqlite3.connect(path)
    (h, text), = db.execute("SELECT hash, genome FROM evaluations").fetchall()
    (pop,), = db.execute("SELECT hash FROM population").fetchall()
    genome = Genome.from_dict(json.loads(text))
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION and genome.name == item["name"]
    assert h == pop == genome.hash() == reference_genomes()[item["name"]].hash() != item["hash"]
