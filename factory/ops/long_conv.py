"""Gated long convolution (Hyena-style) with an implicit filter capped at W taps.

T_ij = C_i h_{i-j} B_j for 0 <= i - j < W: a scaled Toeplitz token mixer whose filter h is generated, not stored.

    B, C, v = split(W_in x)                          # featurizers; B and C pass through the gate nonlinearity
    h[tau] = MLP(z(tau)) * decay(tau),  tau = 0..W-1 # z: [tau / (W-1), cos(2 pi f tau / W), -sin(2 pi f tau / W)]
    y = W_out( C * conv_W(B * v, h) )                # conv_W: causal depthwise (one grouped Conv1d, no FFT)

The filter MLP (Hyena's implicit filter: Linear -> sin -> Linear -> sin -> Linear to d channels) reads fixed
positional features; decay is Hyena's exponential modulation exp(-|delta_c| tau / (W-1)), fast to slow across
channels, normalised to unit energy per channel so the filter gain does not grow with W. The filter is computed
from the parameters in every call; in an exported graph it depends on initializers only, and the exporter's
constant folding turns it into the Conv weight (no filter-MLP nodes remain).

The cap W is `spec.window` (16..256): short_conv's `kernel` domain (2..8) is too small for a long filter. A W
above the context is valid (the far taps only ever see the zero padding) and is not repaired.
Decode state: the last W-1 gated inputs B*v, {"conv": [B, W-1, d]}, bounded whatever the context, rolled every
step. Costs: parameters 3 d^2 + the filter MLP (independent of W) + the output channel mixing; FLOPs per token
6 d^2 + 2 d W + the output mixing (the filter MLP runs once per call, not per token, and is not counted).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from factory.ops.base import Flops, LIVOperator, OpSpec, State
from factory.ops.common import (
    GROUPS,
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

FILTER_BANDS = 4  # sinusoid frequencies of the positional features
FILTER_FEATURES = 1 + 2 * FILTER_BANDS  # t, then cos and sin per band
FILTER_HIDDEN = 32  # width of the implicit filter MLP
# Hyena's exponential modulation: per-channel decay rates spread so the filter falls to TARGET over 30%..150%
# of the window.
DECAY_TARGET, DECAY_FAST, DECAY_SLOW = 1e-2, 0.3, 1.5


def filter_features(window: int) -> torch.Tensor:
    """Positional features [W, FILTER_FEATURES] in Conv1d tap order: row k describes lag W-1-k."""
    lag = torch.arange(window - 1, -1, -1, dtype=torch.float32)
    freqs = torch.linspace(1e-4, FILTER_BANDS - 1, FILTER_BANDS)
    angle = 2 * math.pi * lag.unsqueeze(1) * freqs / window
    return torch.cat([(lag / (window - 1)).unsqueeze(1), angle.cos(), -angle.sin()], dim=1)


def filter_decay(window: int, channels: int) -> torch.Tensor:
    """Exponential modulation [W, C] in Conv1d tap order, unit energy per channel."""
    lag = torch.arange(window - 1, -1, -1, dtype=torch.float32) / (window - 1)
    rates = torch.linspace(math.log(DECAY_TARGET) / DECAY_FAST, math.log(DECAY_TARGET) / DECAY_SLOW, channels).abs()
    decay = torch.exp(-lag.unsqueeze(1) * rates)
    return decay / decay.square().sum(0, keepdim=True).sqrt()


@register
class LongConv(LIVOperator):
    family = "long_conv"
    choices = {
        "window": (16, 32, 64, 128, 256),
        "nonlinearity": ("identity", "sigmoid", "swish"),
        "channel_mixing": ("dense", "grouped", "diagonal"),
    }
    defaults = {"window": 64, "nonlinearity": "identity", "channel_mixing": "dense"}

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.w = spec.window
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.filter_mlp = nn.ModuleList(
            [
                nn.Linear(FILTER_FEATURES, FILTER_HIDDEN),
                nn.Linear(FILTER_HIDDEN, FILTER_HIDDEN),
                nn.Linear(FILTER_HIDDEN, d_model, bias=False),
            ]
        )
        # Fixed inputs and window of the filter MLP: buffers, so they follow .to() but are not parameters.
        self.register_buffer("features", filter_features(self.w), persistent=False)
        self.register_buffer("decay", filter_decay(self.w, d_model), persistent=False)
        self.gate = make_activation(spec.nonlinearity, d_model)
        self.out = channel_mix(spec.channel_mixing, d_model, d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, window={self.w}, nonlinearity={self.spec.nonlinearity}"

    def filter(self) -> torch.Tensor:
        """The generated filter [d, W] with the current token's tap last (causal_depthwise_conv's layout)."""
        first, hidden, last = self.filter_mlp
        z = torch.sin(hidden(torch.sin(first(self.features))))
        return (last(z) * self.decay).transpose(0, 1)

    def _featurize(self, x):
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        return self.gate(b) * v, self.gate(c)

    def forward(self, x, publish=None, reuse=None):
        bv, c = self._featurize(x)
        return self.out(c * causal_depthwise_conv(bv, self.filter()))

    def prefill(self, x, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        bv, c = self._featurize(x)
        y = self.out(c * causal_depthwise_conv(bv, self.filter()))
        return y, {"conv": conv_state_from_prefill(bv, self.w)}

    def step(self, x, position, state, publish=None, reuse=None):
        bv, c = self._featurize(x)
        y, conv = conv_step(bv, state["conv"], self.filter())
        return self.out(c * y), {"conv": conv}

    @classmethod
    def state_shapes(cls, d_model, spec, batch, context, reuse_features=False):
        return {"conv": (batch, spec.window - 1, d_model)}

    @classmethod
    def filter_params(cls, d_model: int) -> int:
        return (FILTER_FEATURES + 1) * FILTER_HIDDEN + (FILTER_HIDDEN + 1) * FILTER_HIDDEN + FILTER_HIDDEN * d_model

    @classmethod
    def param_count(cls, d_model, spec, reuse_features=False):
        return 3 * d_model * d_model + cls.filter_params(d_model) + channel_mix_params(spec.channel_mixing, d_model, d_model)

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        f = 2.0 * d_model * 3 * d_model + 2.0 * d_model * spec.window + channel_mix_flops(
            spec.channel_mixing, d_model, d_model
        )
        return Flops(f, f)

    @classmethod
    def traffic_elements(cls, d_model, spec, tokens):
        return cls.activation_elements(d_model, spec, tokens) + depthwise_conv_traffic(tokens, spec.window, d_model)

    @classmethod
    def constraint_errors(cls, d_model, spec, context):
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            return [f"channel_mixing: grouped needs d_model divisible by {GROUPS}, got {d_model}"]
        return []

    @classmethod
    def repair(cls, d_model, spec, context):
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            return spec.with_(channel_mixing="dense")
        return spec
