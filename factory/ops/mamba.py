"""Mamba-2 (SSD): a selective state-space recurrence with a scalar-times-identity A per head.

T_ij = C_i A_{i-1}...A_{j+1} B_j (semi-separable). Inner width E = expansion * d, H heads of P = E/H channels,
state size N, one B/C group shared by all heads (Mamba-2's ngroups = 1):

    z, x = W_zx u;  B, C = W_bc u;  dt = W_dt u     # Mamba-2's in_proj [z, xBC, dt], split by role
    x, B, C = silu(conv_k([x, B, C]))              # causal depthwise conv (kernel k, with bias) on x, B and C
    dt = softplus(dt + dt_bias);  a = exp(-exp(A_log) * dt)          # per head, per token
    h_t = a_t h_{t-1} + (dt_t x_t) B_t^T           # [P, N] per head
    y_t = h_t C_t + D x_t
    out = W_out( rmsnorm(y * silu(z)) )            # gated RMS norm over E (Mamba-2's RMSNormGated), then mixing

A_log is initialised to log U[1, 16] and dt to log-uniform [1e-3, 1e-1] through dt_bias (Mamba-2's defaults), so
the initial memories span ~1..1000 tokens. The gated output norm is always on (the genome has no field for it; it
is what keeps the un-normalised SSM sums at a steady scale, as in Mamba-2).

Parallel form: `chunked_decay_attention` from factory.ops.linear_attention with q = C, k = B (shared over heads),
v = dt * x, log a = -exp(A_log) * dt: Mamba-2's ssd_minimal_discrete, loop-free with zero padding up to a multiple
of the chunk length (zero inputs and zero log-decay leave the final state unchanged), so it exports with a dynamic
sequence length.

Featurizer (STAR featurizer sharing): the projections and short-conv channels producing B and C, and the dt
projection (`bc_proj`, `bc_conv`, `dt_proj`); x, z, A, dt_bias, D, the norm and the output stay each layer's own.
The conv runs as one Conv1d over [x, B, C] with the two filters concatenated.

Checked against transformers' Mamba2Mixer (torch_forward, n_groups 1) in tests/test_reference_conv.py.

Decode state: "conv" [B, k-1, E + 2N] (the last k-1 pre-conv inputs, rolled every step) and "ssm" [B, H, P, N];
E*N + (E + 2N)(k-1) elements.

Costs (matmul FLOPs per token): projections 2d(2E + 2N + H), conv 2(E + 2N)k, out mixing; decode adds 4 E N
(the state update's outer product and the read-out, both MatMuls); prefill adds the chunked terms (C.B scores computed once for all heads).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, Gene, LIVOperator, OpSpec, State
from factory.ops.common import (
    GROUPS,
    causal_depthwise_conv,
    channel_mix,
    channel_mix_flops,
    channel_mix_params,
    conv_state_from_prefill,
    with_heads_dividing,
)
from factory.ops.linear_attention import CHUNK, chunked_decay_attention, chunked_flops, inverse_softplus, log_uniform
from factory.ops.conv import ShortFilter, conv_step
from factory.ops.registry import register


@register
class Mamba(LIVOperator):
    family = "mamba"
    code = 3
    genes = (
        Gene("expansion", (1, 2), 2),  # inner width E = expansion * d_model
        Gene("state_size", (8, 16, 32, 64), 16),  # the SSM state size N
        Gene("kernel", (2, 3, 4), 4),  # the causal conv's kernel
        Gene("heads", (1, 2, 4, 8), 4),
        Gene("channel_mixing", ("dense", "grouped", "diagonal"), "dense"),
    )
    EPS = 1e-5  # gated RMS norm epsilon
    featurizer = ("bc_proj", "bc_conv", "dt_proj")

    @staticmethod
    def inner(d_model: int, spec: OpSpec) -> int:
        return spec.expansion * d_model

    @classmethod
    def mix_width(cls, d_model: int, spec: OpSpec) -> int:
        return cls.inner(d_model, spec)

    @classmethod
    def conv_channels(cls, d_model: int, spec: OpSpec) -> int:
        return cls.inner(d_model, spec) + 2 * spec.state_size

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.e, self.n, self.h, self.k = self.inner(d_model, spec), spec.state_size, spec.heads, spec.kernel
        self.p = self.e // self.h
        self.zx_proj = nn.Linear(d_model, 2 * self.e, bias=False)  # z, x
        self.bc_proj = nn.Linear(d_model, 2 * self.n, bias=False)  # B, C
        self.dt_proj = nn.Linear(d_model, self.h, bias=False)
        self.x_conv = ShortFilter(self.e, self.k)
        self.bc_conv = ShortFilter(2 * self.n, self.k)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.h).uniform_(1.0, 16.0)))
        self.dt_bias = nn.Parameter(inverse_softplus(log_uniform(self.h, 1e-3, 1e-1)))
        self.D = nn.Parameter(torch.ones(self.h))
        self.norm_weight = nn.Parameter(torch.ones(self.e))
        self.out = channel_mix(spec.channel_mixing, self.e, d_model)

    def _split_in(self, u: torch.Tensor):
        zx = self.zx_proj(u)
        xbc = torch.cat([zx[..., self.e :], self.bc_proj(u)], dim=-1)
        return zx[..., : self.e], xbc, self.dt_proj(u)  # z, xBC, dt

    def _conv(self):
        return (torch.cat([self.x_conv.weight, self.bc_conv.weight]), torch.cat([self.x_conv.bias, self.bc_conv.bias]))

    def _ssm_inputs(self, xbc: torch.Tensor, dt_raw: torch.Tensor):
        """Post-conv xBC [B, T, E+2N] and raw dt [B, T, H] -> x [B,T,H,P], B and C [B,T,1,N], dt, log a [B,T,H]."""
        b, t, _ = xbc.shape
        xbc = F.silu(xbc)
        x = xbc[..., : self.e].unflatten(-1, (self.h, self.p))  # not reshape: see linear_attention
        bm = xbc[..., self.e : self.e + self.n].unsqueeze(2)
        cm = xbc[..., self.e + self.n :].unsqueeze(2)
        dt = F.softplus(dt_raw + self.dt_bias)
        log_a = -torch.exp(self.A_log) * dt
        return x, bm, cm, dt, log_a

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """SSM output y [B, T, H, P] + D skip, gated RMS norm, output mixing."""
        y = (y + x * self.D.unsqueeze(-1)).flatten(-2) * F.silu(z)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.EPS) * self.norm_weight
        return self.out(y)

    def prefill(self, u, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        z, xbc_in, dt_raw = self._split_in(u)
        weight, bias = self._conv()
        xbc = causal_depthwise_conv(xbc_in, weight) + bias
        x, bm, cm, dt, log_a = self._ssm_inputs(xbc, dt_raw)
        y, s = chunked_decay_attention(cm, bm, x * dt.unsqueeze(-1), log_a)  # s: [B, H, N, P]
        state = {"conv": conv_state_from_prefill(xbc_in, self.k), "ssm": s.transpose(-1, -2)}
        return self._output(y, x, z), state

    def step(self, u, position, state, publish=None, reuse=None):
        z, xbc_in, dt_raw = self._split_in(u)
        weight, bias = self._conv()
        xbc, conv = conv_step(xbc_in, state["conv"], weight)
        x, bm, cm, dt, log_a = self._ssm_inputs(xbc + bias, dt_raw)
        x, bm, cm, dt, log_a = x[:, 0], bm[:, 0, 0], cm[:, 0, 0], dt[:, 0], log_a[:, 0]  # drop the time axis
        xdt = x * dt.unsqueeze(-1)  # [B, H, P]
        ssm = torch.exp(log_a)[..., None, None] * state["ssm"] + xdt.unsqueeze(-1) @ bm[:, None, None, :]  # outer product
        y = (ssm @ cm[:, None, :, None]).squeeze(-1)  # [B, H, P]; a MatMul, not an ONNX Einsum (slow on ORT CPU)
        return self._output(y.unsqueeze(1), x.unsqueeze(1), z), {"conv": conv, "ssm": ssm}

    # -- shapes and costs ----------------------------------------------------------------------------------------
    @classmethod
    def state_shapes(cls, d_model, spec, batch, context, reuse_features=False):
        e = cls.inner(d_model, spec)
        return {
            "conv": (batch, spec.kernel - 1, cls.conv_channels(d_model, spec)),
            "ssm": (batch, spec.heads, e // spec.heads, spec.state_size),
        }

    @classmethod
    def featurizer_params(cls, d_model, spec, reuse_features=False):
        n, h = spec.state_size, spec.heads
        return d_model * (2 * n + h) + 2 * n * (spec.kernel + 1)

    @classmethod
    def param_count(cls, d_model, spec, reuse_features=False):
        e, n, h = cls.inner(d_model, spec), spec.state_size, spec.heads
        conv_dim = cls.conv_channels(d_model, spec)
        return (
            d_model * (2 * e + 2 * n + h)  # in_proj
            + conv_dim * (spec.kernel + 1)  # conv filter and bias
            + 3 * h  # A_log, dt_bias, D
            + e  # norm weight
            + channel_mix_params(spec.channel_mixing, e, d_model)
        )

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        e, n, h = cls.inner(d_model, spec), spec.state_size, spec.heads
        common = (
            2.0 * d_model * (2 * e + 2 * n + h)
            + 2.0 * cls.conv_channels(d_model, spec) * spec.kernel
            + channel_mix_flops(spec.channel_mixing, e, d_model)
        )
        prefill = common + chunked_flops(context, h, n, e // h, shared_qk=True)
        decode = common + 4.0 * e * n
        return Flops(prefill, decode)

    @classmethod
    def activation_elements(cls, d_model, spec, tokens):
        e, n, h = cls.inner(d_model, spec), spec.state_size, spec.heads
        padded = -(-max(1, tokens) // CHUNK) * CHUNK
        chunks = padded // CHUNK
        # in_proj output and conv output, the per-chunk score/decay matrices, the per-chunk states
        return 2 * padded * (2 * e + 2 * n + h) + 2 * h * padded * CHUNK + 2 * (chunks + 1) * e * n

    @classmethod
    def horizons(cls, spec):
        return (spec.kernel,)

    @classmethod
    def constraint_errors(cls, d_model, spec, context):
        e = cls.inner(d_model, spec)
        errors = []
        if e % spec.heads:
            errors.append(f"heads: {spec.heads} does not divide the inner width {e} (expansion {spec.expansion})")
        if spec.channel_mixing == "grouped" and (e % GROUPS or d_model % GROUPS):
            errors.append(f"channel_mixing: grouped needs d_model and the inner width divisible by {GROUPS}")
        if spec.channel_mixing == "diagonal" and e != d_model:
            # channel_mix would silently build a dense projection: two specs for one operator.
            errors.append(f"channel_mixing: diagonal needs the inner width equal to d_model (expansion 1), got {e}")
        return errors

    @classmethod
    def repair(cls, d_model, spec, context):
        e = cls.inner(d_model, spec)
        spec = with_heads_dividing(spec, e, cls.gene_domain("heads"))
        if spec.channel_mixing == "grouped" and (e % GROUPS or d_model % GROUPS):
            spec = spec.with_(channel_mixing="dense")
        if spec.channel_mixing == "diagonal" and e != d_model:
            spec = spec.with_(channel_mixing="dense")
        return spec
