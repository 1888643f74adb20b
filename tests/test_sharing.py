"""Weight sharing between layers: STAR's featurizer sharing (the projections that compute a layer's
input-dependent mixing are shared; values and outputs stay per layer) beside whole-operator tying."""

from dataclasses import replace

import pytest
import torch

from factory.genome import Genome, GenomeCodec, GenomeError, LayerGene
from factory.genome.metrics import param_count
from factory.model import LIVModel
from factory.ops import registry
from factory.train import load_checkpoint, unique_state

D = 64
CONTEXT = 64
SHARING_FAMILIES = sorted(name for name, cls in registry.families().items() if cls.featurizer)


def _pair(family: str, share: str) -> Genome:
    """Two layers of one class sharing by `share`, with a GLU between them (a layer of another class)."""
    spec = registry.repair_spec(registry.default_spec(family), D, CONTEXT)
    glu = registry.default_spec("glu")
    layers = (LayerGene(0, share=share), LayerGene(1), LayerGene(0, share=share))
    return Genome(d_model=D, classes=(spec, glu), layers=layers, context=CONTEXT).validate()


def _featurizer_params(op) -> set[int]:
    """ids of the parameters behind an operator's featurizer attributes (modules, parameters, or None)."""
    out = set()
    for name in type(op).featurizer:
        value = getattr(op, name)
        if isinstance(value, torch.nn.Parameter):
            out.add(id(value))
        elif value is not None:
            out.update(id(p) for p in value.parameters())
    return out


def test_the_token_mixers_that_have_a_featurizer_declare_one():
    assert "attention" in SHARING_FAMILIES
    assert "glu" not in SHARING_FAMILIES  # a channel mixer has no input-dependent mixing to share


@pytest.mark.parametrize("family", SHARING_FAMILIES)
def test_featurizer_sharing_shares_exactly_the_featurizer(family):
    torch.manual_seed(0)
    genome = _pair(family, "featurizer")
    assert genome.featurizer_owner() == [0, 1, 0]
    model = LIVModel(genome)
    first, later = registry.featurizer_module(model.op(0)), registry.featurizer_module(model.op(2))
    names = type(first).featurizer
    shared = _featurizer_params(first)
    assert shared and shared == _featurizer_params(later)
    # Everything else (values, outputs, norms) stays per layer.
    others_first = {id(p) for n, p in first.named_parameters() if n.split(".")[0] not in names}
    others_later = {id(p) for n, p in later.named_parameters() if n.split(".")[0] not in names}
    assert others_first and not (others_first & others_later)
    # The exact count knows the featurizer is stored once.
    assert param_count(genome) == model.num_params()
    untied = LIVModel(_pair(family, "none"))
    expected = untied.num_params() - registry.featurizer_params(D, genome.layer_spec(0))
    assert model.num_params() == expected


@pytest.mark.parametrize("family", SHARING_FAMILIES)
def test_featurizer_sharing_decodes_like_the_full_forward_and_survives_a_checkpoint(family, tmp_path):
    import numpy as np

    from factory.data.corpus import Corpus
    from factory.train import TrainConfig, TrainResult, save_checkpoint

    torch.manual_seed(1)
    genome = _pair(family, "featurizer")
    model = LIVModel(genome).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids)
        logits, state = model.prefill(ids[:, :8])
        steps = [logits[:, -1]]
        for t in range(8, 12):
            out, state = model.step(ids[:, t : t + 1], torch.full((2, 1), t), state)
            steps.append(out[:, 0])
    err = (torch.stack(steps[1:], 1) - full[:, 8:]).abs().max().item()
    assert err < 1e-4, f"decode parity error {err:.2e} (tolerance 1e-4)"

    # The shared weights are written once and come back shared.
    stored = unique_state(model)
    assert len(stored) < len(model.state_dict())
    corpus = Corpus("tiny", np.zeros(64, np.uint8), np.zeros(64, np.uint8), "0" * 64)
    result = TrainResult("ok", 1.0, 1.0, 0, 0, 0.0, 0.0)
    save_checkpoint(tmp_path / "ckpt", model, result, TrainConfig(), corpus)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids), full)
    a, b = registry.featurizer_module(loaded.op(0)), registry.featurizer_module(loaded.op(2))
    name = type(a).featurizer[0]
    assert getattr(a, name) is getattr(b, name)


def test_tied_and_featurizer_sets_are_told_apart_by_strategy():
    spec = registry.default_spec("attention")
    glu = registry.default_spec("glu")
    layers = (
        LayerGene(0, share="tied"), LayerGene(1), LayerGene(0, share="featurizer"),
        LayerGene(1), LayerGene(0, share="tied"), LayerGene(1), LayerGene(0, share="featurizer"),
    )
    g = Genome(d_model=D, classes=(spec, glu), layers=layers, context=CONTEXT).canonical().validate()
    assert g.weight_owner() == [0, 1, 2, 3, 0, 5, 6]
    assert g.featurizer_owner() == [0, 1, 2, 3, 4, 5, 2]
    # A set of one shares nothing, whatever its strategy.
    lone = replace(g, layers=g.layers[:3]).canonical()
    assert [x.share for x in lone.layers] == ["none", "none", "none"]


def test_featurizer_sharing_is_repaired_away_where_a_family_has_no_featurizer():
    glu = registry.default_spec("glu")
    g = Genome(d_model=D, classes=(glu,), layers=(LayerGene(0, share="featurizer"),) * 2, context=CONTEXT)
    with pytest.raises(GenomeError, match="no featurizer to share"):
        g.validate()
    codec = GenomeCodec(n_layers=2)
    from factory.genome.codec import repair

    assert [x.share for x in repair(g).layers] == ["none", "none"]
    assert codec.decode(codec.encode(repair(g))).canonical() == repair(g)


def test_version_one_genomes_are_refused_naming_the_change():
    data = _pair("attention", "none").to_dict()
    data["schema_version"] = 1
    with pytest.raises(GenomeError) as e:
        Genome.from_dict(data)
    msg = str(e.value)
    assert "\n" not in msg and "differential" in msg and "schema_version: 1" in msg
