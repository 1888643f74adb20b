"""Reference genomes, shipped by name. Small enough to train on a laptop CPU in minutes.

Each layer is one LIV operator in a pre-norm residual block, so a "transformer block" is two layers: attention,
then SwiGLU. All references share width 128, 8 layers and context 256 unless they say otherwise, so their metrics
compare like with like.
"""

from __future__ import annotations

from factory.genome.schema import Genome, LayerGene
from factory.ops import registry

D_MODEL = 128
CONTEXT = 256


def _spec(family: str, **settings):
    return registry.default_spec(family).with_(**settings)


SWIGLU = ("glu", {"nonlinearity": "swish", "expansion": 3})
MHA = ("attention", {"heads": 4, "kv_repeat": 1, "positional": "rope"})
GQA = ("attention", {"heads": 4, "kv_repeat": 2, "positional": "rope"})


def _build(name: str, pattern: list[tuple[str, dict]], **globals_) -> Genome:
    classes: list = []
    layers = []
    for family, settings in pattern:
        spec = _spec(family, **settings)
        if spec not in classes:
            classes.append(spec)
        layers.append(LayerGene(op_class=classes.index(spec)))
    settings = {"d_model": D_MODEL, "context": CONTEXT, **globals_}
    return Genome(classes=tuple(classes), layers=tuple(layers), name=name, **settings).validate()


def _interleave(mixers: list[tuple[str, dict]], channel=SWIGLU) -> list[tuple[str, dict]]:
    out = []
    for m in mixers:
        out += [m, channel]
    return out


def _references() -> dict[str, Genome]:
    conv = ("conv", {"filter": "short", "kernel": 3})
    return {
        "transformer++": _build("transformer++", _interleave([MHA] * 4)),
        "gqa-transformer": _build("gqa-transformer", _interleave([GQA] * 4)),
        "striped-hybrid": _build(
            "striped-hybrid",
            _interleave([MHA, ("mamba", {}), ("conv", {"filter": "implicit"}), ("mamba", {})]),
        ),
        "lfm2-like": _build("lfm2-like", _interleave([conv, conv, GQA, conv])),
        "rwkv": _build("rwkv", _interleave([("rwkv", {})] * 4)),
        "mamba-like": _build("mamba-like", [("mamba", {})] * 6),
        "linear-attention": _build("linear-attention", _interleave([("linear_attention", {"decay": "gla"})] * 4)),
        "perceiver-ar": _build("perceiver-ar", _interleave([MHA] * 4), latents=64),
        "pangu-pi": _build(
            "pangu-pi",
            _interleave([("attention", {**MHA[1], "shortcut": True})] * 4, ("glu", {"nonlinearity": "series", "expansion": 3})),
        ),
    }


_CACHE: dict[str, Genome] | None = None


def reference_genomes() -> dict[str, Genome]:
    global _CACHE
    if _CACHE is None:
        _CACHE = _references()
    return dict(_CACHE)


def reference(name: str) -> Genome:
    refs = reference_genomes()
    if name not in refs:
        raise KeyError(name)
    return refs[name]
