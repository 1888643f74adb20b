"""Reading genomes written before the operator genes were declared per family (genome schema 2, codec version 1).

Then one operator record had the same thirteen fields for every family (`window` was an attention window or a
long convolution's filter length, `state_size` an SSM state or a linear-attention key width, ...), short and long
convolution were two families, and a class slot of the integer vector held one gene per field. This module maps
both forms onto today's specs; nothing else in the package knows the old shapes.
"""

from __future__ import annotations

from factory.ops.base import OpSpec

# The thirteen operator fields of schema 2 and their codec version 1 domains (the union over the families of
# that time), in vector order, and that codec's family order.
V1_FAMILIES = ("attention", "linear_attention", "rwkv", "mamba", "short_conv", "long_conv", "glu")
V1_OP_DOMAINS: dict[str, tuple] = {
    "family": V1_FAMILIES,
    "heads": (1, 2, 4, 8),
    "kv_repeat": (1, 2, 4, 8),
    "positional": ("alibi", "none", "rope"),
    "window": (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    "nonlinearity": ("elu", "gelu", "identity", "relu", "series", "sigmoid", "swish"),
    "decay": ("gla", "none", "retnet", "scalar"),
    "state_size": (8, 16, 32, 64),
    "kernel": (2, 3, 4, 5, 6, 7, 8),
    "expansion": (1, 2, 3, 4),
    "channel_mixing": ("dense", "diagonal", "grouped"),
    "differential": (False, True),
    "shortcut": (False, True),
}
# Schema 2's defaults for the fields a file left out: the family's registry defaults of that time (equal to
# today's genes' defaults), the shared record's defaults for the rest (which the family ignored).
_V1_RECORD = {"heads": 4, "kv_repeat": 1, "positional": "none", "window": 0, "nonlinearity": "swish",
              "decay": "none", "state_size": 16, "kernel": 4, "expansion": 2, "channel_mixing": "dense",
              "differential": False, "shortcut": False}
_V1_DEFAULTS = {
    "attention": {"heads": 4, "kv_repeat": 1, "positional": "rope", "window": 0, "channel_mixing": "dense",
                  "differential": False},
    "linear_attention": {"heads": 4, "decay": "gla", "nonlinearity": "identity", "state_size": 16,
                         "channel_mixing": "dense", "differential": False},
    "rwkv": {"heads": 4, "channel_mixing": "dense"},
    "mamba": {"expansion": 2, "state_size": 16, "kernel": 4, "heads": 4, "channel_mixing": "dense"},
    "short_conv": {"kernel": 3, "nonlinearity": "identity", "channel_mixing": "dense"},
    "long_conv": {"window": 256, "nonlinearity": "identity", "channel_mixing": "dense"},
    "glu": {"nonlinearity": "swish", "expansion": 3, "channel_mixing": "dense"},
}
# Old family -> (today's family, fixed genes, {old field: today's gene}) for the fields that family read.
_V1_MAP = {
    "attention": ("attention", {}, {f: f for f in ("heads", "kv_repeat", "positional", "window", "channel_mixing",
                                                   "differential", "shortcut")}),
    "linear_attention": ("linear_attention", {}, {"heads": "heads", "decay": "decay", "nonlinearity": "nonlinearity",
                                                  "state_size": "key_dim", "channel_mixing": "channel_mixing",
                                                  "differential": "differential", "shortcut": "shortcut"}),
    "rwkv": ("rwkv", {}, {f: f for f in ("heads", "channel_mixing", "shortcut")}),
    "mamba": ("mamba", {}, {f: f for f in ("expansion", "state_size", "kernel", "heads", "channel_mixing",
                                           "shortcut")}),
    "short_conv": ("conv", {"filter": "short"}, {f: f for f in ("kernel", "nonlinearity", "channel_mixing",
                                                                "shortcut")}),
    "long_conv": ("conv", {"filter": "implicit"}, {"window": "length", "nonlinearity": "nonlinearity",
                                                   "channel_mixing": "channel_mixing", "shortcut": "shortcut"}),
    "glu": ("glu", {}, {f: f for f in ("nonlinearity", "expansion", "channel_mixing")}),
}


def spec_from_v1(record: dict) -> OpSpec:
    """Today's spec for a schema-2 operator record (any subset of its fields; the family decides which matter).
    Raises ValueError naming an unknown field or family."""
    unknown = sorted(set(record) - set(V1_OP_DOMAINS))
    if unknown:
        raise ValueError(f"unknown operator field(s): {', '.join(unknown)}")
    old = record.get("family", "glu")
    if old not in _V1_MAP:
        # not a family of that time: kept as written, so validation reports it by name
        return OpSpec(old, **{k: v for k, v in record.items() if k != "family"})
    family, fixed, fields = _V1_MAP[old]
    values = {**_V1_RECORD, **_V1_DEFAULTS[old], **record}
    return OpSpec(family, **fixed, **{new: values[f] for f, new in fields.items()})


def decode_v1(vector, n_layers: int, n_classes: int):
    """A codec version 1 vector -> (global values, [operator records], [layer values]), unrepaired, genes
    wrapped into their domains as that codec did."""
    from factory.genome.codec import GLOBAL_DOMAINS, LAYER_DOMAINS

    domains = list(GLOBAL_DOMAINS.values()) + list(V1_OP_DOMAINS.values()) * n_classes
    layer = {**LAYER_DOMAINS, "op_class": tuple(range(n_classes))}
    domains += list(layer.values()) * n_layers
    if len(vector) != len(domains):
        raise ValueError(f"vector: a version 1 vector of {n_layers} layers and {n_classes} classes has "
                         f"{len(domains)} genes, got {len(vector)}")
    values = [d[int(v) % len(d)] for d, v in zip(domains, vector)]
    g = len(GLOBAL_DOMAINS)
    glob = dict(zip(GLOBAL_DOMAINS, values[:g]))
    n_op = len(V1_OP_DOMAINS)
    records = [dict(zip(V1_OP_DOMAINS, values[g + c * n_op : g + (c + 1) * n_op])) for c in range(n_classes)]
    start = g + n_classes * n_op
    layers = [dict(zip(layer, values[start + i * len(layer) : start + (i + 1) * len(layer)])) for i in range(n_layers)]
    return glob, records, layers
