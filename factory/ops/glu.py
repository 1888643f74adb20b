"""Memoryless channel mixers: GLU and its variants (SwiGLU, GEGLU, ReGLU) and PanGu-pi's series activation.

T_ij = sigma(C_i) if i == j else 0: a diagonal token-mixing structure, so the decode form is the parallel form
applied to one token and there is no state.

    y = W_out( act(W_gate x) * (W_up x) ),   hidden = expansion * d_model
"""

from __future__ import annotations

import torch
from torch import nn

from factory.ops.base import Flops, Gene, LIVOperator, OpSpec
from factory.ops.common import activation_params, channel_mix, channel_mix_flops, channel_mix_params, make_activation
from factory.ops.registry import register


@register
class GLU(LIVOperator):
    family = "glu"
    mixes_tokens = False
    code = 5
    genes = (
        Gene("nonlinearity", ("swish", "gelu", "relu", "sigmoid", "series"), "swish"),  # the gate's activation
        Gene("expansion", (1, 2, 3, 4), 3),  # hidden width multiple
        Gene("channel_mixing", ("dense", "grouped"), "dense"),
    )

    @staticmethod
    def hidden(d_model: int, spec: OpSpec) -> int:
        return spec.expansion * d_model

    @classmethod
    def mix_width(cls, d_model: int, spec: OpSpec) -> int:
        return cls.hidden(d_model, spec)

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        h = self.hidden(d_model, spec)
        self.gate_up = nn.Linear(d_model, 2 * h, bias=False)  # one matmul for both branches
        self.act = make_activation(spec.nonlinearity, h)
        self.out = channel_mix(spec.channel_mixing, h, d_model)

    def forward(self, x: torch.Tensor, publish=None, reuse=None) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out(self.act(gate) * up)

    def prefill(self, x, publish=None, reuse=None):
        return self.forward(x), {}

    def step(self, x, position, state, publish=None, reuse=None):
        return self.forward(x), {}

    @classmethod
    def param_count(cls, d_model: int, spec: OpSpec, reuse_features: bool = False) -> int:
        h = cls.hidden(d_model, spec)
        return 2 * d_model * h + activation_params(spec.nonlinearity, h) + channel_mix_params(spec.channel_mixing, h, d_model)

    @classmethod
    def flops(cls, d_model: int, spec: OpSpec, context: int, reuse_features: bool = False) -> Flops:
        h = cls.hidden(d_model, spec)
        f = 2.0 * d_model * 2 * h + channel_mix_flops(spec.channel_mixing, h, d_model)
        return Flops(f, f)

    @classmethod
    def activation_elements(cls, d_model: int, spec: OpSpec, tokens: int) -> int:
        return 3 * tokens * cls.hidden(d_model, spec)
