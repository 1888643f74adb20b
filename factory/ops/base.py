"""The LIV operator contract.

Every operator family lives in one file of this package and subclasses `LIVOperator`. A family has:

- a parallel form, `forward(x)` ([B, T, D] -> [B, T, D]) used for training, and `prefill(x)`, which also returns
  the state decoding continues from;
- a recurrent form, `step(x_t, position, state)`, one token at a time with the state as a dict of plain tensors
  (new tensors are returned, nothing is mutated in place), which is what the ONNX decode graph is traced from;
- its state shapes, `state_shapes(d_model, spec, batch, context)`, which must match what `prefill` returns for a
  prompt of `context` tokens;
- its cost formulas: `param_count` (exactly the module's parameters) and `flops` (matmul FLOPs per token).

Feature sharing across layers (STAR's feature-group sharing, e.g. one layer's keys and values reused by a later
layer, which then keeps no cache of its own) goes through two optional dicts: a producer fills `publish` with its
features, a consumer built with `reuse_features=True` reads them from `reuse`. Families that cannot share features
leave `feature_kinds` empty and the genome's repair never asks them to.

Featurizer sharing (STAR's featurizer sharing: layers share the projections that compute the input-dependent part
of their token-mixing matrix, e.g. attention's W_q and W_k, each layer keeping its own values and output): a
family names those submodules in `featurizer` and counts their parameters in `featurizer_params`. The model builds
every member of a featurizer set with its own operator and then points the later members' featurizer submodules at
the first member's. Families with an empty `featurizer` cannot share one and the genome's repair never asks them to.

Differential forms are each family's own (`differential` in `choices`), not a generic wrapper: attention is the
Differential Transformer's, linear attention two feature maps over one shared value. `layer` (the 0-based depth of
the layer the operator is built for) is there for depth-dependent initialisation such as its lambda_init.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from torch import nn

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OpSpec:
    """The operator genome of one LIV class: which family and its settings.

    Every field has a codec domain (see `factory.genome.codec`); a family declares which fields matter to it and
    which values it accepts (`LIVOperator.choices`). Fields a family ignores are reset to these defaults by
    `canonical()`, so two specs that build the same operator compare (and hash) equal.
    """

    family: str = "glu"
    heads: int = 4  # attention / recurrence heads
    kv_repeat: int = 1  # query heads per key/value head: 1 = MHA, heads = MQA, between = GQA
    positional: str = "none"  # rope | alibi | none
    window: int = 0  # attention sliding window (banded sparsity; 0 = dense) / long-conv filter length
    nonlinearity: str = "swish"  # family-specific: GLU activation, linear-attention feature map, conv gate
    decay: str = "none"  # linear attention: none | retnet | gla (per key channel) | scalar (per head, Mamba-2 style)
    state_size: int = 16  # SSM state size N, linear-attention key dim per head
    kernel: int = 4  # short conv kernel, SSM conv kernel
    expansion: int = 2  # GLU hidden multiple, SSM inner expansion
    channel_mixing: str = "dense"  # output projection: dense | grouped | diagonal
    differential: bool = False  # the family's own differential form (only families that define one accept it)
    shortcut: bool = False  # PanGu-pi augmented shortcut beside the operator

    def canonical(self) -> "OpSpec":
        from factory.ops.registry import canonical_spec

        return canonical_spec(self)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "OpSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown operator field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def with_(self, **changes) -> "OpSpec":
        return replace(self, **changes)


@dataclass(frozen=True)
class Flops:
    """Matmul FLOPs per token (2 per multiply-add); elementwise work is not counted."""

    prefill: float  # average per token over a prompt of `context` tokens
    decode: float  # one new token with `context` tokens already in the state

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.prefill + other.prefill, self.decode + other.decode)

    def scale(self, k: float) -> "Flops":
        return Flops(self.prefill * k, self.decode * k)


class LIVOperator(nn.Module):
    """Base class of every LIV operator family (see the module docstring for the contract)."""

    family: ClassVar[str] = ""
    # spec field -> the values this family accepts; fields not listed are irrelevant to it.
    choices: ClassVar[dict[str, tuple]] = {}
    # defaults for the relevant fields when a genome does not say (registry defaults, mad-lab style).
    defaults: ClassVar[dict[str, object]] = {}
    # kinds of features a later layer can reuse instead of computing its own (e.g. ("key", "value")).
    feature_kinds: ClassVar[tuple[str, ...]] = ()
    # token mixers carry information across positions; channel mixers (GLU) do not.
    mixes_tokens: ClassVar[bool] = True
    # attribute names of the submodules that form the featurizer (shared by featurizer sharing); () = cannot share.
    featurizer: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__()
        self.d_model = d_model
        self.spec = spec
        self.reuse_features = reuse_features
        self.layer = layer

    # -- parallel form ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, publish: dict | None = None, reuse: dict | None = None) -> torch.Tensor:
        return self.prefill(x, publish=publish, reuse=reuse)[0]

    def prefill(
        self, x: torch.Tensor, publish: dict | None = None, reuse: dict | None = None
    ) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    # -- recurrent form --------------------------------------------------------------------------------------
    def step(
        self,
        x: torch.Tensor,
        position: torch.Tensor,
        state: State,
        publish: dict | None = None,
        reuse: dict | None = None,
    ) -> tuple[torch.Tensor, State]:
        """One token. x: [B, 1, D]; position: [B, 1] int64, the absolute position of this token."""
        raise NotImplementedError

    # -- shapes and costs (static: from the spec alone, no module needed) -------------------------------------
    @classmethod
    def state_shapes(
        cls, d_model: int, spec: OpSpec, batch: int, context: int, reuse_features: bool = False
    ) -> dict[str, tuple[int, ...]]:
        """Shapes of the state after `context` tokens (what `prefill` of that many tokens returns)."""
        return {}

    @classmethod
    def param_count(cls, d_model: int, spec: OpSpec, reuse_features: bool = False) -> int:
        raise NotImplementedError

    @classmethod
    def flops(cls, d_model: int, spec: OpSpec, context: int, reuse_features: bool = False) -> Flops:
        raise NotImplementedError

    @classmethod
    def featurizer_params(cls, d_model: int, spec: OpSpec, reuse_features: bool = False) -> int:
        """Parameters of the `featurizer` submodules (what a later member of a featurizer set does not own)."""
        return 0

    @classmethod
    def constraint_errors(cls, d_model: int, spec: OpSpec, context: int) -> list[str]:
        """Cross-field rules beyond `choices` (e.g. heads must divide d_model), each message naming the field."""
        return []

    @classmethod
    def repair(cls, d_model: int, spec: OpSpec, context: int) -> OpSpec:
        """Deterministically fix what `constraint_errors` would report (values are already within `choices`)."""
        return spec

    @classmethod
    def activation_elements(cls, d_model: int, spec: OpSpec, tokens: int) -> int:
        """Largest live intermediate (elements) while processing `tokens` positions in parallel form.

        Used by the peak-memory estimate; the default assumes a few [tokens, d_model] buffers.
        """
        return 4 * tokens * d_model

    @classmethod
    def mix_width(cls, d_model: int, spec: OpSpec) -> int:
        """Input width of the output projection (`channel_mix`): what its traffic is counted on."""
        return d_model

    @classmethod
    def traffic_elements(cls, d_model: int, spec: OpSpec, tokens: int) -> int:
        """Elements the parallel form writes into intermediates while processing `tokens` positions, including
        buffers an onnxruntime kernel makes for itself that are never live together (a latency feature, not a
        memory bound). The default: the largest live intermediates. The output projection's own copies (grouped
        channel mixing) are added by `registry.traffic_elements` from `mix_width`, for every family alike; what
        `shared_elements` names is left out."""
        return cls.activation_elements(d_model, spec, tokens)

    @classmethod
    def shared_elements(cls, d_model: int, spec: OpSpec, tokens: int) -> dict[tuple, int]:
        """Intermediates computed from the prompt length and the spec alone, not from the layer's input (an
        attention mask), keyed by what they depend on: {key: elements}. The exported graph computes each distinct
        one once however many layers use it (the exporter's and onnxruntime's common subexpression elimination,
        tests/test_latency_model.py), so the latency features count each key once per genome (factory.features)
        and `traffic_elements` leaves them out."""
        return {}

    def extra_repr(self) -> str:
        return f"family={self.family}, d_model={self.d_model}"


def linear_params(d_in: int, d_out: int, bias: bool = False) -> int:
    return d_in * d_out + (d_out if bias else 0)


def matmul_flops(d_in: int, d_out: int) -> float:
    return 2.0 * d_in * d_out
