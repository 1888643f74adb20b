"""The LIV operator contract.

Every operator family lives in one file of this package and subclasses `LIVOperator`. A family has:

- its genes (`genes`: name, domain, default; a name means one thing within its family) and a stable codec `code`;
  an `OpSpec` holds a family and exactly that family's genes;

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

Differential forms are each family's own (a `differential` gene), not a generic wrapper: attention is the
Differential Transformer's, linear attention two feature maps over one shared value. `layer` (the 0-based depth of
the layer the operator is built for) is there for depth-dependent initialisation such as its lambda_init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Gene:
    """One setting of an operator family: its name, the values it may take (the codec's domain, in order, so
    neighbouring indices are neighbouring values) and its default. A family declares its genes in its own file;
    a name means one thing within its family."""

    name: str
    domain: tuple
    default: object

    def __post_init__(self):
        if self.default not in self.domain:
            raise ValueError(f"gene {self.name}: default {self.default!r} is not in its domain {list(self.domain)}")


# The wrapper gene every token mixer has (PanGu-pi's augmented shortcut, `registry.AugmentedShortcut`).
SHORTCUT = Gene("shortcut", (False, True), False)


class OpSpec:
    """The operator genome of one LIV class: its family and the values of that family's genes.

    `OpSpec("attention", heads=8)` fills the genes it is not given from the family's defaults; reading a gene is
    attribute access (`spec.heads`). A gene the family does not declare is an error, so a spec can only say what
    its family means. Values are not checked here (a genome file may hold anything): `registry.spec_errors`
    reports values outside a gene's domain and cross-gene rules. Specs are immutable, compare and hash by value.
    """

    __slots__ = ("family", "_genes")

    def __init__(self, family: str = "glu", **genes):
        from factory.ops.registry import gene_defaults

        defaults = gene_defaults(family)  # {} for an unknown family: validation names it
        if defaults:
            unknown = sorted(set(genes) - set(defaults))
            if unknown:
                raise ValueError(f"{family} has no gene {unknown[0]!r} (its genes: {', '.join(defaults)})")
            values = tuple((k, genes.get(k, d)) for k, d in defaults.items())
        else:
            values = tuple(sorted(genes.items()))
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "_genes", values)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for k, v in object.__getattribute__(self, "_genes"):
            if k == name:
                return v
        raise AttributeError(f"operator family {self.family!r} has no gene {name!r}")

    def __setattr__(self, name, value):
        raise AttributeError("OpSpec is immutable: use with_()")

    def __eq__(self, other) -> bool:
        return isinstance(other, OpSpec) and (self.family, self._genes) == (other.family, other._genes)

    def __hash__(self) -> int:
        return hash((self.family, self._genes))

    def __repr__(self) -> str:
        return f"OpSpec({self.family!r}, {', '.join(f'{k}={v!r}' for k, v in self._genes)})"

    def __reduce__(self):  # copies and multiprocessing rebuild it from its dict
        return (_spec_from_dict, (self.to_dict(),))

    @property
    def genes(self) -> dict:
        return dict(self._genes)

    def get(self, name: str, default=None):
        """A gene's value, or `default` where the family has no such gene."""
        return dict(self._genes).get(name, default)

    def canonical(self) -> "OpSpec":
        from factory.ops.registry import canonical_spec

        return canonical_spec(self)

    def to_dict(self) -> dict:
        return {"family": self.family, **dict(self._genes)}

    @classmethod
    def from_dict(cls, data: dict) -> "OpSpec":
        data = dict(data)
        return cls(data.pop("family", "glu"), **data)

    def with_(self, **changes) -> "OpSpec":
        """The same family with some genes changed (`family=` starts from the new family's defaults)."""
        if "family" in changes and changes["family"] != self.family:
            family = changes.pop("family")
            return OpSpec(family, **changes)
        changes.pop("family", None)
        return OpSpec(self.family, **{**dict(self._genes), **changes})


def _spec_from_dict(data: dict) -> OpSpec:
    return OpSpec.from_dict(data)


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
    # The family's place in the integer codec: codes are stable (a new family takes the next free one), so a
    # genome's family gene keeps its meaning when families are added.
    code: ClassVar[int] = -1
    # The family's own genes, in codec order (the registry adds `SHORTCUT` to every token mixer).
    genes: ClassVar[tuple[Gene, ...]] = ()
    # Other names for some of the family's forms, {name: genes} (e.g. "short_conv": {"filter": "short"}): a
    # family list (a search space's) may name a form, and older genomes named them as families.
    aliases: ClassVar[dict[str, dict]] = {}
    # The names of the family's forms that differ in kind (the convolution's short_conv and long_conv filters):
    # what reports and the latency model's per-family feature groups tell apart (`form`); () = just the family.
    forms: ClassVar[tuple[str, ...]] = ()
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
    def gene_domain(cls, name: str) -> tuple:
        """The values the family's gene `name` may take."""
        for gene in cls.genes:
            if gene.name == name:
                return gene.domain
        raise ValueError(f"{cls.family} has no gene {name!r}")

    @classmethod
    def relevant(cls, spec: OpSpec) -> tuple[str, ...]:
        """The genes that shape the operator for this spec; `canonical()` resets the others to their defaults (a
        family whose genes depend on a kind, such as the convolution's filter, says which apply)."""
        return tuple(g.name for g in cls.genes)

    @classmethod
    def form(cls, spec: OpSpec) -> str:
        """The name of this spec's form: one of `forms`, or the family's name."""
        return cls.family

    @classmethod
    def horizons(cls, spec: OpSpec) -> tuple[int, ...]:
        """The lengths at which the operator's behaviour changes along time (a sliding window, a filter's taps):
        what parity checks put prompt lengths either side of. () = none."""
        return ()

    @classmethod
    def constraint_errors(cls, d_model: int, spec: OpSpec, context: int) -> list[str]:
        """Cross-field rules beyond `choices` (e.g. heads must divide d_model), each message naming the field."""
        return []

    @classmethod
    def repair(cls, d_model: int, spec: OpSpec, context: int) -> OpSpec:
        """Deterministically fix what `constraint_errors` would report (values are already within the genes'
        domains)."""
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
