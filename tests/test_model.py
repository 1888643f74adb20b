"""The compiled model: decode parity for every reference genome and random genomes, and the static formulas
(parameters, cache) against the real module and state tensors."""

from dataclasses import replace

import pytest
import torch

from factory.genome import Genome, LayerGene
from factory.genome.metrics import cache_bytes, param_count, state_shapes
from factory.genome.references import reference_genomes
from factory.genome.space import SearchSpace
from factory.model import LIVModel
from factory.testing import perturbed_model
from factory.ops import registry

REFS = reference_genomes()
SPACE = SearchSpace.create(n_layers=4, d_model=64, context=128)
RANDOM = [SPACE.sample(seed) for seed in range(12)]


def _perturbed(genome: Genome, seed: int = 0) -> LIVModel:
    return perturbed_model(genome, seed, scale=0.05)


@torch.no_grad()
def assert_decode_parity(model: LIVModel, length: int, prompt: int, atol: float = 1e-4):
    """Prefill `prompt` tokens, then step; every step's logits equal a full forward over that prefix."""
    torch.manual_seed(7)
    ids = torch.randint(0, model.genome.vocab_size, (2, length))
    logits, state = model.prefill(ids[:, :prompt])
    ref = model(ids[:, :prompt])
    assert (logits - ref).abs().max() <= atol
    full = model(ids)
    for t in range(prompt, length):
        logits, state = model.step(ids[:, t : t + 1], torch.full((2, 1), t), state)
        if model.latents:  # Perceiver-AR: compare with the forward of the prefix (its last latent)
            expected = model(ids[:, : t + 1])[:, -1]
        else:
            expected = full[:, t]
        err = (logits[:, 0] - expected).abs().max().item()
        assert err <= atol, f"step at position {t}: max abs diff {err:.2e}"
    return state


def _max_window(genome: Genome) -> int:
    return max([h for c in genome.classes for h in registry.horizons(c)] + [genome.latents, 8])


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("prompt", [1, 5])
def test_reference_decode_parity(name, prompt):
    g = REFS[name]
    if g.latents:
        g = replace(g, latents=16)  # keep the beyond-the-window check short
    model = _perturbed(g)
    assert_decode_parity(model, length=min(_max_window(g) + 12, g.context), prompt=prompt)


@pytest.mark.parametrize("genome", RANDOM, ids=[g.hash() for g in RANDOM])
def test_random_genome_decode_parity(genome):
    model = _perturbed(genome)
    assert_decode_parity(model, length=min(_max_window(genome) + 10, genome.context), prompt=3)


@pytest.mark.parametrize("genome", list(REFS.values()) + RANDOM, ids=list(REFS) + [g.hash() for g in RANDOM])
def test_param_formula_equals_module(genome):
    assert param_count(genome) == LIVModel(genome).num_params()


@pytest.mark.parametrize("genome", list(REFS.values()) + RANDOM, ids=list(REFS) + [g.hash() for g in RANDOM])
@torch.no_grad()
def test_cache_formula_equals_state_tensors(genome):
    model = LIVModel(genome).eval()
    for context in (3, 40):
        _, state = model.prefill(torch.zeros(1, context, dtype=torch.long))
        assert {k: tuple(v.shape) for k, v in state.items()} == state_shapes(genome, 1, context)
        assert sum(v.numel() * v.element_size() for v in state.values()) == cache_bytes(genome, context)


def test_kv_cache_grows_recurrent_state_does_not():
    refs = REFS
    assert cache_bytes(refs["transformer++"], 1024) == 2 * cache_bytes(refs["transformer++"], 512)
    assert cache_bytes(refs["mamba-like"], 1024) == cache_bytes(refs["mamba-like"], 512)
    assert cache_bytes(refs["rwkv"], 4096) == cache_bytes(refs["rwkv"], 64)
    assert cache_bytes(refs["transformer++"], 512, "float16") * 2 == cache_bytes(refs["transformer++"], 512)


def _attn_glu(*layers, **spec):
    attn = registry.default_spec("attention").with_(**spec)
    return Genome(d_model=64, context=128, classes=(attn, registry.default_spec("glu")), layers=layers).validate()


def test_kv_sharing_across_layers_decodes_exactly_and_saves_cache():
    shared = _attn_glu(
        LayerGene(0, feature_group=0, features="reuse"), LayerGene(1),
        LayerGene(0, feature_group=0, features="reuse"), LayerGene(1),
    )
    plain = _attn_glu(LayerGene(0), LayerGene(1), LayerGene(0), LayerGene(1))
    assert cache_bytes(shared, 100) * 2 == cache_bytes(plain, 100)
    assert param_count(shared) < param_count(plain)
    assert_decode_parity(_perturbed(shared), length=30, prompt=4)


def test_kv_sharing_with_window_and_gqa():
    g = _attn_glu(
        LayerGene(0, feature_group=2, features="reuse"), LayerGene(1),
        LayerGene(0, feature_group=2, features="reuse"), LayerGene(0, feature_group=2, features="reuse"),
        window=16, kv_repeat=2, positional="alibi",
    )
    assert_decode_parity(_perturbed(g), length=40, prompt=3)


def test_tied_layers_share_weights():
    g = _attn_glu(
        LayerGene(0, tie_group=1, share="tied"), LayerGene(1, tie_group=0, share="tied"),
        LayerGene(0, tie_group=1, share="tied"), LayerGene(1, tie_group=0, share="tied"),
    )
    model = _perturbed(g)
    assert model.op(0) is model.op(2) and model.op(1) is model.op(3)
    untied = _attn_glu(LayerGene(0), LayerGene(1), LayerGene(0), LayerGene(1))
    assert param_count(g) < param_count(untied) and param_count(g) == model.num_params()
    assert_decode_parity(model, length=20, prompt=2)
