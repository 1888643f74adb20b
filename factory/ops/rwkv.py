"""RWKV-6 ("Finch") time mixing: data-dependent token shift and per-channel data-dependent decay.

T_ij = r_i diag(w_{i-1} ... w_{j+1}) k_j^T v_j for j < i, plus r_i diag(u) k_i^T v_i at i == j: a semi-separable
token mixer with a matrix-valued state per head. Only the time-mixing block is here; RWKV's channel-mixing block is
a GLU-family operator.

Per token (D = d_model, H = heads, N = d_k = d_v = D / H, R_m / R_w = low ranks, see `ranks`):

    dx   = x_{t-1} - x_t                                        # token shift (x_{-1} = 0)
    x_*  = x_t + dx * (mu_* + tanh((x_t + dx * mu_x) A_*) B_*)   # ddlerp, * in {w, r, k, v, g}, rank R_m each
    r, k, v, g = x_r W_r, x_k W_k, x_v W_v, silu(x_g W_g)
    log w_t = -exp(d + tanh(x_w C) E)                           # per head and key channel, rank R_w
    y_t  = r_t (S_{t-1} + diag(u) k_t^T v_t)                    # per head; u: the bonus of the current token
    S_t  = diag(w_t) S_{t-1} + k_t^T v_t                        # S: [N, N] per head
    out  = W_o( groupnorm_H(y) * g )                            # W_o: channel_mix (dense / grouped / diagonal)

This is RWKV-6's time mixing as in Peng et al. 2024 ("Eagle and Finch", arXiv 2404.05892) and RWKV-LM's
RWKV_Tmix_x060 (its one [D, 5 R_m] ddlerp down-projection with one tanh is the five [D, R_m] ones here; the branch
order differs, nothing else). Two deviations, both immaterial: d + tanh(..) E is clamped to [-20, ln 20], i.e.
log w to [-20, -2e-9] (a decay below e^-20 ~ 2e-9 forgets the state all the same; the other end keeps exp() out
of denormal range, which made a CPU decode step many times slower, and differs from 1 by < 2e-9), and RWKV-LM's
initialisation depends on the layer's relative depth (layer / n_layer), which an operator does not know: every layer is initialised as RWKV-LM's
middle layer.

Parallel form: `gated_chunked` of factory.ops.linear_attention (GLA's chunked form with RWKV's bonus), loop-free
so that it exports with a dynamic length: chunks of 16 tokens in sub-chunks of 4, the exact [4, 4, N] decay tensor
exp(b_{i-1} - b_j) within a sub-chunk and a factored form at sub-chunk ends across them (every exponent <= 0,
masked before exp, so any decay is exact without a clamp), the bonus on the diagonal, and the per-key-channel
decayed prefix of the chunk states across chunks (two levels: [16, 16] matrices inside blocks of 16 chunks, an
[nb, nb] one across blocks).

Featurizer (STAR featurizer sharing): receptance, key and the decay (its LoRA and base d); the token-shift mixes,
value, gate, bonus, norm and output stay each layer's own.

Decode state: "shift" [B, 1, D] (the previous token's input) and "wkv" [B, H, N, N], i.e. D * (N + 1) per sequence.
Parameters: 4 D^2 (r, k, v, g) + channel_mix + 10 D R_m + 2 D R_w + 10 D.
FLOPs per token: decode 8 D^2 + channel_mix + 20 D R_m + 4 D R_w + 4 D N (the rank-1 update k^T v as a matmul and
the readout r S); prefill the same projections plus `gated_chunked_flops`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, Gene, LIVOperator, OpSpec, State
from factory.ops.common import channel_mix, channel_mix_flops, channel_mix_params, with_heads_dividing
from factory.ops.linear_attention import gated_chunked, gated_chunked_flops, gated_elements
from factory.ops.registry import register

# clamp of d + tanh(x_w C) E, the log of -log w (see the module docstring): log w in [-20, -e^-20]
DECAY_EXP_MIN, DECAY_EXP_MAX = -20.0, math.log(20.0)
NORM_EPS = 64e-5  # RWKV-6's ln_x eps (1e-5 * head_size_divisor**2, divisor 8)
N_MIX = 5  # ddlerp branches, in order: w, r, k, v, g


def ranks(d_model: int) -> tuple[int, int]:
    """Low ranks of the ddlerp (R_m) and decay (R_w) projections: RWKV-6 uses 32 / 64 at width 768+."""
    return max(8, min(32, d_model // 16)), max(16, min(64, d_model // 8))


@register
class RWKV(LIVOperator):
    family = "rwkv"
    code = 2
    genes = (
        Gene("heads", (1, 2, 4, 8), 4),
        Gene("channel_mixing", ("dense", "grouped", "diagonal"), "dense"),
    )
    featurizer = ("receptance", "key", "decay", "decay_down", "decay_up")

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        d, h = d_model, spec.heads
        self.heads, self.head_dim = h, d // h
        rm, rw = ranks(d)
        # RWKV-6 initialisation for a middle layer (the relative depth layer / n_layer is not known here).
        depth, shallow = 0.5, 0.5  # ratio_0_to_1, ratio_1_to_almost0
        ddd = torch.arange(d, dtype=torch.float32) / d
        self.mix_x = nn.Parameter(1.0 - ddd.pow(shallow))
        self.mix = nn.Parameter(
            torch.stack(
                [
                    1.0 - ddd.pow(shallow),  # w
                    1.0 - ddd.pow(0.5 * shallow),  # r
                    1.0 - ddd.pow(shallow),  # k
                    1.0 - (ddd.pow(shallow) + 0.3 * depth),  # v
                    1.0 - ddd.pow(0.5 * shallow),  # g
                ]
            )
        )
        # Low-rank ddlerp and decay branches: zero first factor, so they start at zero but still get gradients.
        # One nn.Linear per weight (not stacked tensors): each exports as a constant MatMul weight, which the int8
        # quantizer needs, and a batched [5, B, T, R] matmul would make the exporter specialise on T == 1.
        self.mix_down = nn.ModuleList(nn.Linear(d, rm, bias=False) for _ in range(N_MIX))
        self.mix_up = nn.ModuleList(nn.Linear(rm, d, bias=False) for _ in range(N_MIX))
        n = torch.arange(d, dtype=torch.float32)
        # Decay speeds spread over channels: log w from -exp(-6) (long memory) to -exp(-1).
        self.decay = nn.Parameter(-6.0 + 5.0 * (n / max(d - 1, 1)).pow(0.7 + 1.3 * depth))
        self.decay_down = nn.Linear(d, rw, bias=False)
        self.decay_up = nn.Linear(rw, d, bias=False)
        self.bonus = nn.Parameter(
            (depth * (1.0 - n / max(d - 1, 1)) + ((n + 1) % 3 - 1) * 0.1).reshape(h, self.head_dim)
        )
        self.receptance, self.key, self.value, self.gate = (nn.Linear(d, d, bias=False) for _ in range(4))
        with torch.no_grad():
            for lin in (*self.mix_down, self.decay_down):
                lin.weight.zero_()
            for lin in (*self.mix_up, self.decay_up):
                lin.weight.uniform_(-0.01, 0.01)
            for lin, scale in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.gate, 0.1)):
                lin.weight.normal_(std=scale / math.sqrt(d))  # small k and g, as in RWKV-LM
        self.norm_weight = nn.Parameter(torch.ones(d))
        self.norm_bias = nn.Parameter(torch.zeros(d))
        self.out = channel_mix(spec.channel_mixing, d, d)

    # -- shared by both forms ----------------------------------------------------------------------------------
    def _featurize(self, x: torch.Tensor, prev: torch.Tensor):
        """x, prev: [B, T, D] (prev = the previous token's input) -> r, k, v, g, log w, each [B, T, D]."""
        dx = prev - x
        xx = x + dx * self.mix_x
        branches = zip(self.mix, self.mix_down, self.mix_up)
        xw, xr, xk, xv, xg = (x + dx * (mu + up(torch.tanh(down(xx)))) for mu, down, up in branches)
        r, k, v, g = self.receptance(xr), self.key(xk), self.value(xv), self.gate(xg)
        w = self.decay + self.decay_up(torch.tanh(self.decay_down(xw)))
        # Clamped to log w in [-20, -e^-20]: see the module docstring.
        logw = -torch.exp(w.clamp(min=DECAY_EXP_MIN, max=DECAY_EXP_MAX))
        return r, k, v, F.silu(g), logw

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        return z.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # [B, T, D] -> [B, H, T, N]

    def _output(self, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """y: [B, T, H, N] -> group norm per head (per token), SiLU gate, output projection."""
        mu = y.mean(-1, keepdim=True)
        yc = y - mu
        y = yc * torch.rsqrt(yc.pow(2).mean(-1, keepdim=True) + NORM_EPS)
        y = y.flatten(2) * self.norm_weight + self.norm_bias
        return self.out(y * g)

    # -- parallel form -----------------------------------------------------------------------------------------
    def prefill(self, x, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        t = x.shape[1]
        padded = F.pad(x, (0, 0, 1, 0))  # x_{t-1} for every t, zero before the first token
        r, k, v, g, logw = self._featurize(x, padded[:, :t])
        y, wkv = gated_chunked(self._heads(r), self._heads(k), self._heads(v), self._heads(logw), self.bonus)
        return self._output(y, g), {"shift": padded[:, t:], "wkv": wkv}  # last input (zeros if t == 0)

    # -- recurrent form ----------------------------------------------------------------------------------------
    def step(self, x, position, state, publish=None, reuse=None):
        r, k, v, g, logw = self._featurize(x, state["shift"])
        r, k, v, logw = (self._heads(z).squeeze(2) for z in (r, k, v, logw))  # [B, H, N]
        kv = k.unsqueeze(-1) @ v.unsqueeze(-2)  # [B, H, N, V], the rank-1 update as a matmul
        s = state["wkv"]
        y = (r.unsqueeze(-2) @ (s + self.bonus.unsqueeze(-1) * kv)).transpose(1, 2)  # [B, 1, H, V]
        new = torch.exp(logw).unsqueeze(-1) * s + kv
        return self._output(y, g), {"shift": x.clone(), "wkv": new}  # a new tensor, not the input

    # -- shapes and costs --------------------------------------------------------------------------------------
    @classmethod
    def state_shapes(cls, d_model, spec, batch, context, reuse_features=False):
        n = d_model // spec.heads
        return {"shift": (batch, 1, d_model), "wkv": (batch, spec.heads, n, n)}

    @classmethod
    def param_count(cls, d_model, spec, reuse_features=False):
        d = d_model
        rm, rw = ranks(d)
        return (
            4 * d * d  # r, k, v, g
            + (1 + N_MIX) * d + 2 * N_MIX * rm * d  # ddlerp
            + d + 2 * rw * d  # decay
            + d  # bonus
            + 2 * d  # group norm
            + channel_mix_params(spec.channel_mixing, d, d)
        )

    @classmethod
    def _projection_flops(cls, d: int, spec: OpSpec) -> float:
        rm, rw = ranks(d)
        return 2.0 * (4 * d * d + 2 * N_MIX * rm * d + 2 * rw * d) + channel_mix_flops(spec.channel_mixing, d, d)

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        d, n = d_model, d_model // spec.heads
        proj = cls._projection_flops(d, spec)
        decode = proj + 4.0 * d * n  # r S readout + rank-1 state update
        return Flops(proj + gated_chunked_flops(context, spec.heads, n, n), decode)

    @classmethod
    def featurizer_params(cls, d_model, spec, reuse_features=False):
        d = d_model
        return 2 * d * d + d + 2 * ranks(d)[1] * d  # receptance, key; decay base and LoRA

    @classmethod
    def activation_elements(cls, d_model, spec, tokens):
        d, h = d_model, spec.heads
        # ddlerp branches and projections, then the chunked core's intermediates
        return 10 * (tokens + 16) * d + gated_elements(h, d // h, d // h, tokens)

    @classmethod
    def constraint_errors(cls, d_model, spec, context):
        # (grouped channel mixing needing d_model % GROUPS == 0 is checked by the registry for every family)
        errors = []
        if d_model % spec.heads:
            errors.append(f"heads: {spec.heads} does not divide d_model {d_model}")
        return errors

    @classmethod
    def repair(cls, d_model, spec, context):
        spec = with_heads_dividing(spec, d_model, cls.gene_domain("heads"))
        return spec
