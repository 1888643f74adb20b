"""Gated short convolution (LFM2 / Hyena-style gating with a short causal depthwise filter).

T_ij = C_i K_{i-j} B_j for 0 <= i - j < k: a scaled Toeplitz token mixer with a k-tap filter.

    B, C, v = split(W_in x)          # featurizers
    y = W_out( C * conv_k(B * v) )   # conv_k: causal depthwise, kernel k (2..8)

Decode state: the last k-1 gated inputs B*v, shape [B, k-1, d] ("conv"), rolled every step.
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
    conv_step,
    make_activation,
)
from factory.ops.registry import register


@register
class ShortConv(LIVOperator):
    family = "short_conv"
    choices = {
        "kernel": (2, 3, 4, 5, 6, 7, 8),
        "nonlinearity": ("identity", "sigmoid", "swish"),
        "channel_mixing": ("dense", "grouped", "diagonal"),
    }
    defaults = {"kernel": 3, "nonlinearity": "identity", "channel_mixing": "dense"}

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.k = spec.kernel
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.filter = nn.Parameter(torch.randn(d_model, self.k) / math.sqrt(self.k))
        self.gate = make_activation(spec.nonlinearity, d_model)
        self.out = channel_mix(spec.channel_mixing, d_model, d_model)

    def _featurize(self, x):
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        return self.gate(b) * v, self.gate(c)

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
