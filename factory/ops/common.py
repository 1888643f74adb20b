"""Small building blocks shared by operator files: norms, projections, activations, positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 4  # block count of a "grouped" channel-mixing projection


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(d)
    if kind == "layernorm":
        return nn.LayerNorm(d)
    raise ValueError(f"unknown norm {kind!r}")


def norm_params(kind: str, d: int) -> int:
    return d if kind == "rmsnorm" else 2 * d


# -- channel mixing: the output projection of an operator ---------------------------------------------------------
class GroupedLinear(nn.Module):
    """Block-diagonal linear map: GROUPS independent dense blocks (STAR's 'grouped' channel mixing)."""

    def __init__(self, d_in: int, d_out: int, groups: int = GROUPS):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, d_in // groups, d_out // groups))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_in // groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        xg = x.reshape(*shape, self.groups, -1)
        y = torch.einsum("...gi,gio->...go", xg, self.weight)
        return y.reshape(*shape, -1)


class DiagonalLinear(nn.Module):
    """Per-channel scale (STAR's 'diagonal' channel mixing); needs d_in == d_out."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def channel_mix(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "dense" or (kind == "diagonal" and d_in != d_out):
        return nn.Linear(d_in, d_out, bias=False)
    if kind == "grouped":
        return GroupedLinear(d_in, d_out)
    if kind == "diagonal":
        return DiagonalLinear(d_in)
    raise ValueError(f"unknown channel mixing {kind!r}")


def channel_mix_params(kind: str, d_in: int, d_out: int) -> int:
    if kind == "dense" or (kind == "diagonal" and d_in != d_out):
        return d_in * d_out
    if kind == "grouped":
        return d_in * d_out // GROUPS
    return d_in


def channel_mix_flops(kind: str, d_in: int, d_out: int) -> float:
    return 2.0 * channel_mix_params(kind, d_in, d_out) if kind != "diagonal" or d_in != d_out else 0.0


def channel_mix_traffic(kind: str, d_in: int, d_out: int, tokens: int) -> int:
    """Elements the projection moves beyond its output: the grouped einsum exports as a batched MatMul between two
    Transposes (groups first, then back), so its input and output are each copied once more. Dense and diagonal
    run in place of a single MatMul or Mul."""
    return tokens * (d_in + d_out) if kind == "grouped" else 0


# -- activations -------------------------------------------------------------------------------------------------
class SeriesActivation(nn.Module):
    """PanGu-pi's series-informed activation: sum_i a_i * relu(x + b_i), learnable per channel (n terms)."""

    terms = 2

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((self.terms, channels), 1.0 / self.terms))
        self.bias = nn.Parameter(torch.linspace(-0.5, 0.5, self.terms).unsqueeze(1).repeat(1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scale[0] * F.relu(x + self.bias[0])
        for i in range(1, self.terms):
            out = out + self.scale[i] * F.relu(x + self.bias[i])
        return out


_ELEMENTWISE = {
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


class Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = _ELEMENTWISE[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def make_activation(name: str, channels: int) -> nn.Module:
    if name == "series":
        return SeriesActivation(channels)
    if name in _ELEMENTWISE:
        return Activation(name)
    raise ValueError(f"unknown nonlinearity {name!r}")


def activation_params(name: str, channels: int) -> int:
    return 2 * SeriesActivation.terms * channels if name == "series" else 0


# -- positions ----------------------------------------------------------------------------------------------------
class Rotary(nn.Module):
    """Rotary position embedding computed from explicit positions (no length-dependent buffers, export-safe)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, dh]; positions: [B, T] or [T] (int64)."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [..., T, dh/2]
        if angles.dim() == 3:
            angles = angles.unsqueeze(1)  # [B, 1, T, dh/2]
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x[..., ::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi per-head slopes 2^(-8h/H), h = 1..H."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution along time as one grouped Conv1d (exports to a plain ONNX Conv, no FFT).

    x: [B, T, C]; weight: [C, K] with weight[:, -1] applied to the current token.
    """
    channels, k = weight.shape
    y = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight.unsqueeze(1), groups=channels)
    return y.transpose(1, 2)


def depthwise_conv_traffic(tokens: int, taps: int, channels: int) -> int:
    """Elements onnxruntime's CPU Conv writes for `causal_depthwise_conv`: it unrolls each channel's input into a
    [taps, tokens] matrix (im2col) before a GEMM, one channel at a time, so long filters cost far more than their
    FLOPs (bench/bench_latency.py compares prefill predictions with and without this term)."""
    return tokens * taps * channels


def conv_state_from_prefill(x: torch.Tensor, k: int) -> torch.Tensor:
    """The last k-1 inputs of a prompt ([B, T, C] -> [B, k-1, C]), zero-padded on the left for short prompts."""
    padded = F.pad(x, (0, 0, k - 1, 0))
    return padded[:, padded.shape[1] - (k - 1) :]


def conv_step(x_t: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of `causal_depthwise_conv`: x_t [B, 1, C], conv_state [B, k-1, C] -> (y_t [B, 1, C], new state).

    The state always rolls (no branch on position), which keeps the decode graph static.
    """
    window = torch.cat([conv_state, x_t], dim=1)  # [B, k, C]
    y = (window * weight.t().unsqueeze(0)).sum(dim=1, keepdim=True)  # Mul + ReduceSum: no ONNX Einsum
    return y, window[:, 1:]


# -- repair rules shared by families -----------------------------------------------------------------------------
def nearest(allowed, value, ok=lambda a: True):
    """The allowed value nearest to `value` (ties to the smaller) that satisfies `ok`, or None."""
    valid = [a for a in allowed if ok(a)]
    return min(valid, key=lambda a: (abs(a - value), a)) if valid else None


def heads_dividing(width: int, heads: int, allowed, ok=lambda h: True):
    """The one rule for "heads divides the width": the accepted head count nearest to `heads` (ties to the
    smaller) that divides `width` and satisfies `ok`; None when none does."""
    return nearest(allowed, heads, lambda h: width % h == 0 and ok(h))


def with_heads_dividing(spec, width: int, allowed):
    """`spec` with its heads repaired by `heads_dividing` where they do not divide `width` (1 if nothing does)."""
    if width % spec.heads == 0:
        return spec
    return spec.with_(heads=heads_dividing(width, spec.heads, allowed) or 1)
