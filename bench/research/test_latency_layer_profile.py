"""Self-check of bench/research/latency_layer_profile.py's node-to-layer map, on a genome whose masks the exported
graph builds once: each mask's nodes land in the first layer that uses it, and every layer has nodes of its own.

Not part of the default suite (pyproject's testpaths is tests/, which never imports bench/):
    .venv/bin/python -m pytest -q bench/research/test_latency_layer_profile.py
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("latency_layer_profile",
                                               Path(__file__).resolve().parent / "latency_layer_profile.py")
layer_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layer_profile)


def _masked_attention_genome():
    """Three attention layers, two with the same window and ALiBi slopes, and a GLU between them (as
    tests/test_latency_model.py's mask test)."""
    from factory.genome import Genome
    from factory.genome.schema import LayerGene
    from factory.ops import registry

    alibi = registry.default_spec("attention").with_(heads=2, positional="alibi", window=16)
    rope = registry.default_spec("attention").with_(heads=2, positional="rope", window=16)
    glu = registry.default_spec("glu")
    layers = tuple(LayerGene(op_class=c) for c in (0, 2, 0, 1))
    return Genome(d_model=32, classes=(alibi, rope, glu), layers=layers, context=64, name="masks").validate()


def test_each_mask_lands_in_the_first_layer_that_uses_it(tmp_path):
    """Layer 0 (ALiBi) and layer 3 (RoPE with a window) build the two distinct masks; layer 2 reuses layer 0's."""
    import onnx

    from export.graphs import state_layout
    from export.onnx_export import export_graphs
    from factory.testing import perturbed_model

    genome = _masked_attention_genome()
    graphs = export_graphs(perturbed_model(genome), state_layout(genome), tmp_path)
    layer_of = layer_profile.layer_of_node(graphs.prefill)
    assert set(layer_of.values()) == {0, 1, 2, 3, "head"}
    where_layers = {layer_of[n.name] for n in onnx.load(str(graphs.prefill)).graph.node if n.op_type == "Where"}
    assert where_layers == {0, 3}
