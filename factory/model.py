"""Compile a genome into one PyTorch module.

    ids -> embedding -> [ x + op_i(norm_i(x)) for each layer ] -> final norm -> lm head -> logits

Three entry points:
- `forward(ids)` for training (parallel forms);
- `prefill(ids) -> (logits, state)`: the parallel forms that also return the decode state;
- `step(ids, positions, state) -> (logits, state)`: one token per sequence with the state as a flat dict of plain
  tensors keyed `<layer>.<kind>` (what ONNX export turns into `past.<layer>.<kind>` / `present.<layer>.<kind>`).

Whole-operator tying keeps one module per tie set; featurizer sharing points a set's later members at the first
member's featurizer submodules (e.g. W_q, W_k); feature sharing passes a layer's
published features (e.g. keys/values) to the later layers that reuse them. With Perceiver-AR latents, layer 0 is
a latent cross-attention and the other layers run on the latents only (see ops/perceiver.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from factory.genome import Genome
from factory.ops import registry
from factory.ops.common import make_norm
from factory.ops.perceiver import LatentCrossAttention

State = dict[str, torch.Tensor]


class LIVModel(nn.Module):
    def __init__(self, genome: Genome):
        super().__init__()
        genome = genome.validate()
        self.genome = genome
        d = genome.d_model
        self.latents = genome.latents
        self.embed = nn.Embedding(genome.vocab_size, d)
        self.norms = nn.ModuleList(make_norm(genome.norm, d) for _ in genome.layers)
        self.final_norm = make_norm(genome.norm, d)
        self.lm_head = None if genome.tie_embeddings else nn.Linear(d, genome.vocab_size, bias=False)

        owner = genome.weight_owner()
        self.feature_source = genome.feature_source()
        self.publishers = genome.publishers()
        # One module per tie set; layer i runs self.ops[self.op_of_layer[i]].
        self.ops = nn.ModuleList()
        self.op_of_layer: list[int] = []
        module_of_owner: dict[int, int] = {}
        for i in range(genome.n_layers):
            if owner[i] not in module_of_owner:
                spec = genome.layer_spec(i)
                if self.latents and i == 0:
                    op = LatentCrossAttention(d, spec, self.latents)
                else:
                    op = registry.build_operator(d, spec, reuse_features=self.feature_source[i] is not None, layer=i)
                module_of_owner[owner[i]] = len(self.ops)
                self.ops.append(op)
            self.op_of_layer.append(module_of_owner[owner[i]])
        self.apply(_init_weights)
        # Featurizer sharing: a later member of a set uses the first member's featurizer submodules (one set of
        # weights, registered under both layers; checkpoints store it once, see train.save_checkpoint).
        for i, first in enumerate(genome.featurizer_owner()):
            if first != i:
                mine, theirs = registry.featurizer_module(self.op(i)), registry.featurizer_module(self.op(first))
                for name in type(mine).featurizer:
                    setattr(mine, name, getattr(theirs, name))

    # -- helpers -----------------------------------------------------------------------------------------------
    def op(self, i: int) -> nn.Module:
        return self.ops[self.op_of_layer[i]]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed.weight)
        return self.lm_head(x)

    def _layer_io(self, i: int, buses: dict[int, dict]):
        publish = {} if i in self.publishers else None
        source = self.feature_source[i]
        reuse = buses[source] if source is not None else None
        return publish, reuse

    def _stack(self, x: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Parallel form of layers first.. (no state)."""
        buses: dict[int, dict] = {}
        for i in range(first, self.genome.n_layers):
            publish, reuse = self._layer_io(i, buses)
            x = x + self.op(i)(self.norms[i](x), publish=publish, reuse=reuse)
            if publish is not None:
                buses[i] = publish
        return x

    # -- entry points ------------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (Perceiver-AR: logits of the last min(T, N) positions)."""
        x = self.embed(ids)
        if self.latents:
            y, _ = self.ops[self.op_of_layer[0]].prefill(self.norms[0](x))
            return self._logits(self._stack(x[:, -self.latents :] + y, first=1))
        return self._logits(self._stack(x))

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, State]:
        x = self.embed(ids)
        state: State = {}
        if self.latents:
            y, s = self.ops[self.op_of_layer[0]].prefill(self.norms[0](x))
            state = {"0.key": s["key"], "0.value": s["value"], "0.inputs": x}
            return self._logits(self._stack(x[:, -self.latents :] + y, first=1)), state
        buses: dict[int, dict] = {}
        for i in range(self.genome.n_layers):
            publish, reuse = self._layer_io(i, buses)
            y, s = self.op(i).prefill(self.norms[i](x), publish=publish, reuse=reuse)
            x = x + y
            state.update({f"{i}.{k}": v for k, v in s.items()})
            if publish is not None:
                buses[i] = publish
        return self._logits(x), state

    def step(self, ids: torch.Tensor, positions: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """ids [B, 1], positions [B, 1] (absolute position of the new token) -> (logits [B, 1, V], new state)."""
        x = self.embed(ids)
        if self.latents:
            return self._perceiver_step(x, positions, state)
        new_state: State = {}
        buses: dict[int, dict] = {}
        for i in range(self.genome.n_layers):
            prefix = f"{i}."
            layer_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            publish, reuse = self._layer_io(i, buses)
            y, s = self.op(i).step(self.norms[i](x), positions, layer_state, publish=publish, reuse=reuse)
            x = x + y
            new_state.update({f"{prefix}{k}": v for k, v in s.items()})
            if publish is not None:
                buses[i] = publish
        return self._logits(x), new_state

    def _perceiver_step(self, x: torch.Tensor, positions: torch.Tensor, state: State):
        inputs = torch.cat([state["0.inputs"], x], dim=1)
        window = inputs[:, -self.latents :]
        norm0 = self.norms[0]
        y, s = self.ops[self.op_of_layer[0]].step(norm0(window), norm0(x), positions, state["0.key"], state["0.value"])
        latents = self._stack(window + y, first=1)
        new_state = {"0.key": s["key"], "0.value": s["value"], "0.inputs": inputs}
        return self._logits(latents[:, -1:]), new_state

    # -- introspection -----------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_shapes(self, batch: int, context: int) -> dict[str, tuple[int, ...]]:
        from factory.genome.metrics import state_shapes

        return state_shapes(self.genome, batch, context)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
