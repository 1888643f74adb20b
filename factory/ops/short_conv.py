"""LFM2's gated short convolution (Lfm2ShortConv in transformers' modeling_lfm2.py), with an optional gate
nonlinearity.

T_ij = C_i K_{i-j} B_j for 0 <= i - j < k: a scaled Toeplitz token mixer with a k-tap filter.

    B, C = W_g x                     # the gates: the featurizer (gate_proj)
    v    = W_v x
    y    = W_out( act(C) * conv_k(act(B) * v) )   # conv_k: causal depthwise, kernel k (2..8), no bias

With act = identity (the default) this is LFM2's block exactly (conv_bias False, in/out projections without bias;
LFM2's fused in_proj is split into gate_proj [B; C] and value_proj so that the featurizer is exactly the gates'
weights); sigmoid or swish on the gates are this project's variants.

Decode state: the last k-1 gated inputs act(B)*v, shape [B, k-1, d] ("conv"), rolled every step; a step is the
dot product of the window with the filter, a MatMul.
Costs (matmul FLOPs per token): projections 2 d (3d), the filter 2 d k, the output mixing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from factory.ops.base import Flops, LIVOperator, OpSpec, State
from factory.ops.common import (
    causal_depthwise_conv,
    depthwise_conv_traffic,
    channel_mix,
    channel_mix_flops,
    channel_mix_params,
    conv_state_from_prefill,
    make_activation,
)
from factory.ops.registry import register


def window_dot(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j window[:, j, c] * weight[c, j] as a batched MatMul ([B, C, 1, k] @ [C, k, 1]) -> [B, 1, C].

    One token of a causal depthwise convolution over its last k inputs (oldest first)."""
    y = window.transpose(1, 2).unsqueeze(-2) @ weight.unsqueeze(-1)  # [B, C, 1, 1]
    return y.squeeze(-1).transpose(1, 2)


def conv_step(x_t: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of `causal_depthwise_conv`: x_t [B, 1, C], conv_state [B, k-1, C] -> (y_t [B, 1, C], new state).
    The state always rolls (no branch on position)."""
    window = torch.cat([conv_state, x_t], dim=1)  # [B, k, C]
    return window_dot(window, weight), window[:, 1:]


@register
class ShortConv(LIVOperator):
    family = "short_conv"
    choices = {
        "kernel": (2, 3, 4, 5, 6, 7, 8),
        "nonlinearity": ("identity", "sigmoid", "swish"),
        "channel_mixing": ("dense", "grouped", "diagonal"),
    }
    defaults = {"kernel": 3, "nonlinearity": "identity", "channel_mixing": "dense"}
    featurizer = ("gate_proj",)

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.k = spec.kernel
        self.gate_proj = nn.Linear(d_model, 2 * d_model, bias=False)  # B, C
        self.value_proj = nn.Linear(d_model, d_model, bias=False)
        self.filter = nn.Parameter(torch.randn(d_model, self.k) / math.sqrt(self.k))
        self.gate = make_activation(spec.nonlinearity, d_model)
        self.out = channel_mix(spec.channel_mixing, d_model, d_model)

    def _featurize(self, x):
        b, c = self.gate_proj(x).chunk(2, dim=-1)
        return self.gate(b) * self.value_proj(x), self.gate(c)

    def prefill(self, x, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        bv, c = self._featurize(x)
        y = self.out(c * causal_depthwise_conv(bv, self.filter))
        return y, {"conv": conv_state_from_prefill(bv, self.k)}

    def forward(self, x, publish=None, reuse=None):
        bv, c = self._featurize(x)
        return self.out(c * causal_depthwise_conv(bv, self.filter))

    def step(self, x, position, state, publish=None, reuse=None):
        bv, c = self._featurize(x)
        y, conv = conv_step(bv, state["conv"], self.filter)
        return self.out(c * y), {"conv": conv}

    @classmethod
    def state_shapes(cls, d_model, spec, batch, context, reuse_features=False):
        return {"conv": (batch, spec.kernel - 1, d_model)}

    @classmethod
    def featurizer_params(cls, d_model, spec, reuse_features=False):
        return 2 * d_model * d_model

    @classmethod
    def param_count(cls, d_model, spec, reuse_features=False):
        return 3 * d_model * d_model + d_model * spec.kernel + channel_mix_params(spec.channel_mixing, d_model, d_model)

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        f = 2.0 * d_model * 3 * d_model + 2.0 * d_model * spec.kernel + channel_mix_flops(
            spec.channel_mixing, d_model, d_model
        )
        return Flops(f, f)

    @classmethod
    def traffic_elements(cls, d_model, spec, tokens):
        return cls.activation_elements(d_model, spec, tokens) + depthwise_conv_traffic(tokens, spec.kernel, d_model)
