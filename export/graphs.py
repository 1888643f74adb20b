"""The two exported graphs and the decode-state layout they share.

Export knows nothing of any operator's internals: it drives `LIVModel.prefill` / `LIVModel.step` and reads the
state dict they return (`<layer>.<kind>` -> tensor). The genome's static metrics (`state_shapes`) say which state
tensors exist and which of their axes grow with the context, so the graphs get fixed, named inputs and outputs:

    prefill:  input_ids [batch, sequence]                    -> logits, present.<layer>.<kind>...
    decode:   input_ids [batch, 1], position_ids [batch, 1],
              past.<layer>.<kind>...                          -> logits, present.<layer>.<kind>...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from factory.errors import FactoryError
from factory.genome import Genome
from factory.genome.metrics import state_shapes
from factory.model import LIVModel
from factory.threads import torch_threads  # re-exported: tracing runs with few threads (latency-bound)

BATCH = "batch"
SEQUENCE = "sequence"
PAST_SEQUENCE = "past_sequence"


@dataclass(frozen=True)
class StateTensor:
    """One decode-state tensor: its key in the model's state dict and its shape with symbolic axes."""

    name: str  # "<layer>.<kind>"
    shape: tuple  # ints, with "batch" on axis 0 and "past_sequence" on the growing axis, if any

    @property
    def layer(self) -> int:
        return int(self.name.split(".", 1)[0])

    @property
    def kind(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def grows(self) -> bool:
        return PAST_SEQUENCE in self.shape

    @property
    def growing_axis(self) -> int | None:
        return self.shape.index(PAST_SEQUENCE) if self.grows else None

    def concrete(self, batch: int, past: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else past if d == PAST_SEQUENCE else d for d in self.shape)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "dtype": "float32",
            "shape": list(self.shape),
            "grows": self.grows,
        }


def state_layout(genome: Genome) -> list[StateTensor]:
    """The decode state, in layer order, with growing axes found by comparing the shapes at two contexts.

    The contexts are past the genome's context (and so past every window and filter cap), where only caches that
    keep every token still change size; such an axis must grow by exactly one per token.
    """
    c1 = 2 * genome.context + 3
    c2 = c1 + 5
    at1, at2 = state_shapes(genome, 3, c1), state_shapes(genome, 3, c2)
    layout = []
    for name, s1 in at1.items():
        s2 = at2[name]
        if s1[0] != 3:
            raise FactoryError(f"state {name}: metrics.state_shapes puts {s1[0]} on axis 0, expected the batch")
        changed = [i for i, (a, b) in enumerate(zip(s1, s2)) if a != b]
        if len(changed) > 1 or (changed and (s1[changed[0]] != c1 or s2[changed[0]] != c2)):
            raise FactoryError(
                f"state {name}: shape {s1} at context {c1} vs {s2} at {c2}: only one axis may grow, one per token"
            )
        shape = [BATCH, *s1[1:]]
        if changed:
            shape[changed[0]] = PAST_SEQUENCE
        layout.append(StateTensor(name, tuple(shape)))
    return layout


def check_state_matches(layout: list[StateTensor], state: dict[str, torch.Tensor], batch: int, past: int, where: str) -> None:
    """The operators' contract: what prefill/step return matches metrics.state_shapes (names and shapes)."""
    expected = {s.name: s.concrete(batch, past) for s in layout}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(expected) != set(got):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        raise FactoryError(f"{where}: state keys disagree with metrics.state_shapes (missing {missing}, extra {extra})")
    for name, shape in expected.items():
        if got[name] != shape:
            raise FactoryError(f"{where}: state {name} has shape {got[name]}, metrics.state_shapes says {shape}")
        if state[name].dtype != torch.float32:
            raise FactoryError(f"{where}: state {name} is {state[name].dtype}, expected float32")


class PrefillGraph(nn.Module):
    """forward(input_ids) -> (logits, *present) in `layout` order."""

    def __init__(self, model: LIVModel, layout: list[StateTensor]):
        super().__init__()
        self.model = model
        self.names = [s.name for s in layout]

    def forward(self, input_ids: torch.Tensor):
        logits, state = self.model.prefill(input_ids)
        return (logits, *(state[n] for n in self.names))


class DecodeGraph(nn.Module):
    """forward(input_ids, position_ids, *past) -> (logits, *present) in `layout` order."""

    def __init__(self, model: LIVModel, layout: list[StateTensor]):
        super().__init__()
        self.model = model
        self.names = [s.name for s in layout]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        logits, state = self.model.step(input_ids, position_ids, dict(zip(self.names, past)))
        return (logits, *(state[n] for n in self.names))


def input_names(layout: list[StateTensor], graph: str) -> list[str]:
    if graph == "prefill":
        return ["input_ids"]
    return ["input_ids", "position_ids", *(f"past.{s.name}" for s in layout)]


def output_names(layout: list[StateTensor]) -> list[str]:
    return ["logits", *(f"present.{s.name}" for s in layout)]
