"""RWKV-6 ("Finch") time mixing: data-dependent token shift and per-channel data-dependent decay.

T_ij = r_i diag(w_{i-1} ... w_{j+1}) k_j^T v_j for j < i, plus r_i diag(u) k_i^T v_i at i == j: a semi-separable
token mixer with a matrix-valued state per head. Only the time-mixing block is here; RWKV's channel-mixing block is
a GLU-family operator.

Per token (D = d_model, H = heads, N = d_k = d_v = D / H, R_m / R_w = low ranks, see `ranks`):

    dx   = x_{t-1} - x_t                                        # token shift (x_{-1} = 0)
    x_*  = x_t + dx * (mu_* + tanh((x_t + dx * mu_x) A_*) B_*)   # ddlerp, * in {w, r, k, v, g}, rank R_m each
    r, k, v, g = x_r W_r, x_k W_k, x_v W_v, silu(x_g W_g)
    log w_t = -exp(min(d + tanh(x_w C) E, ln 5))                # in [-5, 0): per head and key channel, rank R_w
    y_t  = r_t (S_{t-1} + diag(u) k_t^T v_t)                    # per head; u: the bonus of the current token
    S_t  = diag(w_t) S_{t-1} + k_t^T v_t                        # S: [N, N] per head
    out  = W_o( groupnorm_H(y) * g )                            # W_o: channel_mix (dense / grouped / diagonal)

The clamp log w >= -5 (w >= 0.0067: at most ~99.3% forgotten in one step) is part of the model and applied the same
way in `prefill` and `step`. It bounds a chunk's log decay to 5 * CHUNK, which keeps the factored exponentials of
the chunked form finite in fp32 and bf16 (|exponent| <= 40). In fp16 they would overflow: keep the chunked core
(`wkv_chunked`) in fp32 in a float16 graph.

Parallel form, loop-free so that it exports with a dynamic length (GLA-style chunks of CHUNK = 16 tokens):
  - T is zero-padded to n = T // 16 + 1 chunks (zero r/k/v and zero log decay: the final state is unchanged).
  - intra-chunk: with b = the within-chunk cumsum of log w and c = b at the middle of the chunk,
    A_ij = (r_i * exp(b_{i-1} - c)) . (k_j * exp(c - b_j)) for j < i, the bonus on the diagonal; y = A v.
  - chunk summaries: U_m = sum_j (k_j * exp(b_end - b_j))^T v_j and the chunk's log decay g_m (exact, <= 0).
  - inter-chunk: the state after every chunk, P_n = sum_{m <= n} exp(g_{m+1} + ... + g_n) U_m per key channel,
    in two levels: exact masked [16, 16] decay matrices inside blocks of BLOCK = 16 chunks, then a masked
    [nb, nb] one across blocks (exponents <= 0; masked entries are -inf before exp). y += (r_i * exp(b_{i-1})) P_{n-1}.
  The only quadratic term is the block level: (T / 256)^2 per channel, negligible below ~64K tokens.
The padding always adds at least one token and one block: the exporter then never sees a size that may be 0 or 1.

Decode state: "shift" [B, 1, D] (the previous token's input) and "wkv" [B, H, N, N], i.e. D * (N + 1) per sequence.
Parameters: 4 D^2 (r, k, v, g) + channel_mix + 10 D R_m + 2 D R_w + 10 D.
FLOPs per token: decode 8 D^2 + channel_mix + 20 D R_m + 4 D R_w + 4 D N (readout r S and the rank-1 update);
prefill the same projections plus about 4 * CHUNK * D + 4 D N for the chunked recurrence (see `flops`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, LIVOperator, OpSpec, State
from factory.ops.common import channel_mix, channel_mix_flops, channel_mix_params
from factory.ops.registry import register

CHUNK = 16  # tokens per chunk of the parallel form
BLOCK = 16  # chunks per block of the inter-chunk state passing
LOG_DECAY_MIN = -5.0  # clamp of log w per step (see the module docstring)
NORM_EPS = 64e-5  # RWKV-6's ln_x eps (1e-5 * head_size_divisor**2, divisor 8)
N_MIX = 5  # ddlerp branches, in order: w, r, k, v, g


def ranks(d_model: int) -> tuple[int, int]:
    """Low ranks of the ddlerp (R_m) and decay (R_w) projections: RWKV-6 uses 32 / 64 at width 768+."""
    return max(8, min(32, d_model // 16)), max(16, min(64, d_model // 8))


def _chunks(t):
    """Chunks after padding: at least one padding token, so n >= 1 even for t == 0 (export never sees n == 0)."""
    return t // CHUNK + 1


def _blocks(n):
    """Blocks after padding: at least one padding block, so nb >= 2 (export never specialises on nb == 1)."""
    return (n + BLOCK - 1) // BLOCK + 1


def _decayed_prefix(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Inclusive decayed prefix sum P_n = sum_{m <= n} exp(g_{m+1} + ... + g_n) * U_m, loop-free.

    u: [B, H, n, N, V] (chunk contributions); g: [B, H, n, N] (chunk log decays, <= 0, per key channel).
    Two levels keep memory linear in n for practical lengths: exact [BLOCK, BLOCK] decay matrices inside blocks of
    BLOCK chunks, then an [nb, nb] one across blocks. Returns P zero-padded to nb * BLOCK chunks; padding (zero U,
    zero g) leaves the prefix unchanged, so P[:, :, -1] is the state after the last real chunk.
    """
    bsz, heads, n, dk, dv = u.shape
    nb = _blocks(n)
    u = F.pad(u, (0, 0, 0, 0, 0, nb * BLOCK - n)).reshape(bsz, heads, nb, BLOCK, dk, dv)
    g = F.pad(g, (0, 0, 0, nb * BLOCK - n)).reshape(bsz, heads, nb, BLOCK, dk)
    lg = g.cumsum(3).transpose(-1, -2)  # [B, H, nb, N, BLOCK]: log decay from the block start, inclusive
    incl = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=u.device).tril()
    # Mask before exp (not after): the upper triangle would overflow and poison gradients with inf * 0.
    within = torch.exp(torch.where(incl, lg.unsqueeze(-1) - lg.unsqueeze(-2), float("-inf")))
    q = within @ u.transpose(3, 4)  # [B, H, nb, N, BLOCK, V]: prefix within each block

    gb = lg[..., -1]  # [B, H, nb, N]: total log decay of each block
    gb_incl = gb.cumsum(2).transpose(-1, -2)  # [B, H, N, nb]
    gb_excl = gb_incl - gb.transpose(-1, -2)
    idx = torch.arange(nb, device=u.device)
    before = idx.unsqueeze(1) > idx.unsqueeze(0)  # strictly earlier blocks: [nb, nb]
    across = torch.exp(torch.where(before, gb_excl.unsqueeze(-1) - gb_incl.unsqueeze(-2), float("-inf")))
    start = across @ q[..., -1, :].transpose(2, 3)  # [B, H, N, nb, V]: state entering each block
    p = q + torch.exp(lg).unsqueeze(-1) * start.transpose(2, 3).unsqueeze(-2)
    return p.transpose(3, 4).reshape(bsz, heads, nb * BLOCK, dk, dv)


def wkv_chunked(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logw: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RWKV-6 recurrence from a zero state, chunked and loop-free.

    r, k, logw: [B, H, T, N]; v: [B, H, T, V]; u: [H, N]. Returns y [B, T, H, V] and the final state [B, H, N, V].
    """
    bsz, heads, t, dk = r.shape
    n = _chunks(t)
    r, k, v, logw = (
        F.pad(z, (0, 0, 0, n * CHUNK - t)).reshape(bsz, heads, n, CHUNK, z.shape[-1]) for z in (r, k, v, logw)
    )
    b = logw.cumsum(-2)  # inclusive log decay from the chunk start
    bq = b - logw  # exclusive: the decay r_i sees (S_{i-1})
    ref = b[..., CHUNK // 2 - 1 : CHUNK // 2, :]  # mid-chunk reference: every factor's exponent within +-40
    att = (r * torch.exp(bq - ref)) @ (k * torch.exp(ref - b)).transpose(-1, -2)  # [B, H, n, C, C]
    strict = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=r.device).tril(-1)
    att = att.masked_fill(~strict, 0.0)  # where, not multiply: masked entries may be huge
    y = att @ v + (r * u.unsqueeze(1).unsqueeze(1) * k).sum(-1, keepdim=True) * v

    g = b[..., -1, :]  # [B, H, n, N]
    contrib = (k * torch.exp(g.unsqueeze(-2) - b)).transpose(-1, -2) @ v  # [B, H, n, N, V], decayed to chunk end
    after = _decayed_prefix(contrib, g)  # state after each chunk (padded)
    # Unpad by index_select, not by slicing: a slice's size min(n, 16 * nb) defeats the exporter's shape algebra.
    before = torch.cat([torch.zeros_like(after[:, :, :1]), after], dim=2)
    before = before.index_select(2, torch.arange(n, device=r.device))  # state entering each chunk
    y = y + (r * torch.exp(bq)) @ before
    # Back to [B, T, H, V] while still chunked: transposing a [B, H, T, V] tensor makes the exporter guard T != 1.
    y = y.permute(0, 2, 3, 1, 4).reshape(bsz, n * CHUNK, heads, v.shape[-1])
    return y.index_select(1, torch.arange(t, device=r.device)), after[:, :, -1]  # index_select: see above


@register
class RWKV(LIVOperator):
    family = "rwkv"
    choices = {
        "heads": (1, 2, 4, 8),
        "channel_mixing": ("dense", "grouped", "diagonal"),
    }
    defaults = {"heads": 4, "channel_mixing": "dense"}

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        d, h = d_model, spec.heads
        self.heads, self.head_dim = h, d // h
        rm, rw = ranks(d)
        # RWKV-6 initialisation for a middle layer (the layer index is not known here).
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
        # The lower clamp keeps exp() out of denormal range (e^-20 ~ 2e-9 is still "no decay"): denormals made
        # a CPU decode step ~50x slower.
        logw = -torch.exp(w.clamp(min=-20.0, max=math.log(-LOG_DECAY_MIN)))  # in [LOG_DECAY_MIN, 0)
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
        y, wkv = wkv_chunked(self._heads(r), self._heads(k), self._heads(v), self._heads(logw), self.bonus)
        return self._output(y, g), {"shift": padded[:, t:], "wkv": wkv}  # last input (zeros if t == 0)

    # -- recurrent form ----------------------------------------------------------------------------------------
    def step(self, x, position, state, publish=None, reuse=None):
        r, k, v, g, logw = self._featurize(x, state["shift"])
        r, k, v, logw = (self._heads(z).squeeze(2) for z in (r, k, v, logw))  # [B, H, N]
        kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, N, V]
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
        t = max(context, 1)
        chunks = _chunks(t)
        blocks = _blocks(chunks)
        tp = chunks * CHUNK
        core = (
            4.0 * CHUNK * d * tp  # intra-chunk scores and their product with v
            + 4.0 * d * n * tp  # chunk contributions k^T v and the inter-chunk readout r S
            + 2.0 * blocks * BLOCK * BLOCK * d * n  # prefix within blocks
            + 2.0 * blocks * blocks * d * n  # across blocks
        )
        return Flops(proj + core / t, decode)

    @classmethod
    def activation_elements(cls, d_model, spec, tokens):
        d, h = d_model, spec.heads
        n = d // h
        chunks = _chunks(tokens)
        blocks = _blocks(chunks)
        tp = chunks * CHUNK
        # Summed, as they are live together: ddlerp branches and projections, chunk scores, per-chunk states (two
        # copies), the decay matrices within and across blocks.
        return (
            10 * tp * d
            + h * tp * CHUNK
            + 2 * blocks * BLOCK * d * n
            + blocks * BLOCK * BLOCK * d
            + blocks * blocks * d
        )

    @classmethod
    def constraint_errors(cls, d_model, spec, context):
        # (grouped channel mixing needing d_model % GROUPS == 0 is checked by the registry for every family)
        errors = []
        if d_model % spec.heads:
            errors.append(f"heads: {spec.heads} does not divide d_model {d_model}")
        return errors

    @classmethod
    def repair(cls, d_model, spec, context):
        if d_model % spec.heads:
            fits = [h for h in cls.choices["heads"] if d_model % h == 0]  # 1 always fits
            spec = spec.with_(heads=min(fits, key=lambda h: (abs(h - spec.heads), -h)))
        return spec
