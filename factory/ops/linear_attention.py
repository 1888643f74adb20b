"""Linear attention with optional decay: plain (Katharopoulos), fixed decay (RetNet), data-dependent decay (GLA).

T_ij = C_i A_{i-1}...A_{j+1} B_j restricted to a scalar decay per head: a low-rank token mixer whose rank is the key
dim d_k. Per head h, with feature map phi on queries and keys and a decay a_t in (0, 1]:

    q, k, v, g = split(W_in x)                     # q, k: [H, d_k];  v: [H, d_v = d/H];  g: [d] output gate
    S_t = a_t S_{t-1} + phi(k_t) v_t^T             # [d_k, d_v] per head
    o_t = phi(q_t)^T S_t  = sum_{j<=t} (prod_{s=j+1..t} a_s) (phi(q_t) . phi(k_j)) v_j

- decay "none": a_t = 1 and a normaliser z_t = z_{t-1} + phi(k_t) ([d_k] per head), o_t <- o_t / (phi(q_t).z_t + eps),
  so phi must be positive ("relu", "elu" = elu+1, "sigmoid"); no output norm (the normaliser plays its part).
- decay "fixed": log a_h = log(1 - 2^-e_h), e_h evenly spread over [5, 12] across heads (RetNet's values at 8 heads;
  e = 8 for a single head); a buffer, not learned. q is scaled by d_k^-1/2 and the output gets a per-head RMS (group)
  norm with a learned scale.
- decay "data": log a_{t,h} = -softplus(w_h . x_t + b_h), b_h initialised so softplus(b_h) is log-uniform in
  [1e-3, 1e-1] (Mamba-2's dt range: memories of ~10..1000 tokens); per-head RMS norm as for "fixed".

    y = W_out( norm(o) * silu(g) )                 # W_out: dense | grouped | diagonal channel mixing

Parallel form (`chunked_decay_attention`): Mamba-2's SSD "minimal discrete" algorithm, loop-free over time so it
exports with a dynamic length: T is padded up to a multiple of CHUNK with zero keys/values and zero log-decay (so
the final state is unchanged); inside a chunk the quadratic masked form with decay matrix exp(segsum(log a)), across
chunks one [n, n] decay matrix (a segsum of the chunk totals) applied to the per-chunk states. Memory is
O(T * CHUNK) per head, not O(T^2). It exports with torch.onnx.export(dynamo=True) and a dynamic T in [1, 4096]; the
way it is written (matmul on contiguous chunks, unflatten not reshape, a gather to drop the padding) is what keeps
torch.export from pinning T, see the comments in `chunked_decay_attention`.

Decode state: "kv" [B, H, d_k, d_v] (+ "norm" [B, H, d_k] for decay "none"); H*d_k*d_v (+ H*d_k) elements,
independent of the context length.

Costs (matmul FLOPs per token): projections 2d(2 H d_k + 2d [+ H]) + output mixing; decode adds 4 H d_k d_v
(state update + read-out, +4 H d_k for the normaliser); prefill adds the chunked terms of `chunked_flops`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, LIVOperator, OpSpec, State
from factory.ops.common import GROUPS, channel_mix, channel_mix_flops, channel_mix_params
from factory.ops.registry import register

CHUNK = 64  # chunk length of the parallel form (ssd_minimal style); 64 keeps the per-chunk matrices small on CPU


# -- the shared loop-free chunked scan (also used by factory.ops.mamba) ------------------------------------------------
def segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L] with out[i, j] = sum_{s=j+1..i} x[s] for j <= i and -inf above the diagonal.

    Computed as a cumulative sum of a masked copy rather than a difference of cumulative sums, so long stretches
    of strong decay do not lose precision to cancellation (Mamba-2's stable `segsum`).
    """
    n = x.size(-1)
    xx = x.unsqueeze(-1).expand(*x.shape, n)  # xx[..., s, j] = x[s]
    strict = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)  # s > j
    xx = xx.masked_fill(~strict, 0.0)
    out = torch.cumsum(xx, dim=-2)  # out[..., i, j] = sum_{j < s <= i} x[s]
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(0)
    return out.masked_fill(~lower, float("-inf"))


def chunked_decay_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor | None, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """o_t = sum_{j<=t} exp(sum_{s=j+1..t} log_a_s) (q_t . k_j) v_j and the final state S_T = sum_j decay_j k_j v_j^T.

    q, k: [B, T, Hq, dk] with Hq == H or 1 (shared across heads, as Mamba-2's B and C); v: [B, T, H, dv];
    log_a: [B, T, H] (<= 0) or None for no decay. Returns o [B, T, H, dv] and S [B, H, dk, dv].
    No Python loop over time or chunks: padding and chunk count are computed from the (symbolic) length.
    Export note: with a dynamic length, any reshape of a non-contiguous view whose shape involves the chunk count n
    makes torch.export guard on n == 1 (pinning T <= CHUNK or T > CHUNK). Hence matmul on contiguous
    [B, H, n, C, X] chunks rather than einsum (its internal reshapes) or permuted views, and a shift by
    concatenation rather than slicing an [n+1, n+1] product.
    """
    b, t, h, dv = v.shape
    n = (t + chunk - 1) // chunk
    pad = n * chunk - t

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, X] -> [B, H, n, C, X], zero-padded in time
        # Heads first, then pad: the padded copy is contiguous in [B, H, T, X], so the chunk split is a plain view
        # and every matmul below sees standard strides (matmuls on permuted views guard on n == 1 when exported).
        x = F.pad(x.transpose(1, 2), (0, 0, 0, pad))
        return x.reshape(b, x.shape[1], n, chunk, x.shape[3])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    scores = qc @ kc.transpose(-1, -2)  # [B, Hq, n, C, C]
    if log_a is None:
        # No decay: a causal mask, and the states of earlier chunks carry over unscaled (a running sum).
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril(0)
        y = scores.masked_fill(~causal, 0.0) @ vc  # [B, H, n, C, dv]
        states = torch.cumsum(kc.transpose(-1, -2) @ vc, dim=2)  # state at the end of each chunk [B, H, n, dk, dv]
        final = states[:, :, -1]
        prev = torch.cat([torch.zeros_like(states[:, :, :1]), states[:, :, :-1]], dim=2)  # entering each chunk
        y = y + qc @ prev
    else:
        la = F.pad(log_a.transpose(1, 2), (0, pad)).reshape(b, h, n, chunk)  # [B, H, n, C], contiguous
        cs = torch.cumsum(la, dim=-1)
        # 1. within each chunk: the quadratic form with the decay matrix exp(segsum).
        y = (scores * torch.exp(segsum(la))) @ vc  # [B, H, n, C, dv]
        # 2. each chunk's own contribution to the state at its end.
        k_decayed = kc * torch.exp(cs[..., -1:] - cs).unsqueeze(-1)  # [B, H, n, C, dk]
        states = k_decayed.transpose(-1, -2) @ vc  # [B, H, n, dk, dv]
        # 3. across chunks: the state at the end of chunk z is sum_{c<=z} decay(c -> z) states_c, an [n, n] segsum
        #    of the chunk totals; the state entering chunk z is the one at the end of chunk z-1. (Shifting by a
        #    concatenation, not an [n+1, n+1] matrix and a slice, keeps the matmuls free of n == 1 shape guards.)
        chunk_decay = torch.exp(segsum(cs[..., -1]))  # [B, H, n, n]
        states = (chunk_decay @ states.flatten(-2)).unflatten(-1, states.shape[-2:])  # [B, H, n, dk, dv]
        final = states[:, :, -1]
        prev = torch.cat([torch.zeros_like(states[:, :, :1]), states[:, :, :-1]], dim=2)
        # 4. read the entering state out, decayed to each position.
        y = y + (qc * torch.exp(cs).unsqueeze(-1)) @ prev
    # Drop the padding with a gather, not a slice: y[:, :t] makes the exporter prove min(t, n*chunk) == t, which it
    # cannot, and later views of a slice guard on t != 1. The gather returns a fresh [B, t, H, dv] tensor.
    y = y.permute(0, 2, 3, 1, 4).reshape(b, n * chunk, h, dv)
    return y.index_select(1, torch.arange(t, device=y.device)), final


def chunked_flops(
    context: int, heads: int, dk: int, dv: int, chunk: int = CHUNK, shared_qk: bool = False, decay: bool = True
) -> float:
    """Matmul FLOPs per prompt token of `chunked_decay_attention` (padding included, averaged over `context`)."""
    context = max(1, context)
    n = -(-context // chunk)
    hq = 1 if shared_qk else heads
    per_chunk = 2.0 * chunk * chunk * (hq * dk + heads * dv)  # scores, then scores @ v
    per_chunk += 2.0 * 2 * chunk * heads * dk * dv  # chunk states, read-out of the entering state
    total = n * per_chunk
    if decay:
        total += 2.0 * n * n * heads * dk * dv  # the [n, n] inter-chunk decay matrix applied to the states
    return total / context


def scan_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: q, k [B, Hq, dk]; v [B, H, dv]; log_a [B, H] or None; state [B, H, dk, dv]."""
    update = k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, dk, dv]
    new = state + update if log_a is None else torch.exp(log_a)[..., None, None] * state + update
    out = torch.einsum("bhn,bhnp->bhp", q.expand(-1, v.shape[1], -1), new)
    return out, new


# -- feature maps --------------------------------------------------------------------------------------------------
def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


FEATURE_MAPS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "elu": _elu1,  # elu(x) + 1 (Katharopoulos et al.): positive and smooth
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
}
POSITIVE_MAPS = ("elu", "relu", "sigmoid")  # usable with the normaliser of plain linear attention


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def log_uniform(n: int, low: float, high: float) -> torch.Tensor:
    return torch.exp(torch.rand(n) * (math.log(high) - math.log(low)) + math.log(low))


@register
class LinearAttention(LIVOperator):
    family = "linear_attention"
    choices = {
        "heads": (1, 2, 4, 8),
        "decay": ("none", "fixed", "data"),
        "nonlinearity": ("identity", "relu", "elu", "swish", "sigmoid"),
        "state_size": (8, 16, 32, 64),
        "channel_mixing": ("dense", "grouped", "diagonal"),
    }
    defaults = {"heads": 4, "decay": "data", "nonlinearity": "identity", "state_size": 16, "channel_mixing": "dense"}
    # Normaliser and RMS norm epsilon. The per-head norm divides an output that can nearly cancel (phi(q) . phi(k)
    # ~ 0 with signed feature maps) by its own RMS: with 1e-6, float32 rounding in such a head grew past 1e-4 in
    # the logits of a six-layer stack; 1e-5, as Mamba-2's gated norm, bounds that gain.
    EPS = 1e-5

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.h, self.dk = spec.heads, spec.state_size
        self.dv = d_model // spec.heads
        self.decay = spec.decay
        self.phi = FEATURE_MAPS[spec.nonlinearity]
        extra = self.h if spec.decay == "data" else 0
        self.in_proj = nn.Linear(d_model, 2 * self.h * self.dk + 2 * d_model + extra, bias=False)
        if spec.decay == "data":
            self.decay_bias = nn.Parameter(inverse_softplus(log_uniform(self.h, 1e-3, 1e-1)))
        if spec.decay == "fixed":
            e = torch.linspace(5.0, 12.0, self.h) if self.h > 1 else torch.tensor([8.0])
            self.register_buffer("log_gamma", torch.log1p(-torch.pow(2.0, -e)), persistent=False)
        if spec.decay != "none":
            self.norm_weight = nn.Parameter(torch.ones(d_model))
        self.out = channel_mix(spec.channel_mixing, d_model, d_model)

    def _featurize(self, x: torch.Tensor):
        """x [B, T, D] -> phi(q), phi(k) [B, T, H, dk], v [B, T, H, dv], gate [B, T, D], log_a [B, T, H] or None."""
        b, t, _ = x.shape
        hk = self.h * self.dk
        proj = self.in_proj(x)
        # unflatten, not reshape: reshaping a slice guards on T != 1 when exported with a dynamic length
        q = self.phi(proj[..., :hk].unflatten(-1, (self.h, self.dk)))
        k = self.phi(proj[..., hk : 2 * hk].unflatten(-1, (self.h, self.dk)))
        v = proj[..., 2 * hk : 2 * hk + self.d_model].unflatten(-1, (self.h, self.dv))
        g = proj[..., 2 * hk + self.d_model : 2 * hk + 2 * self.d_model]
        log_a = None
        if self.decay == "data":
            log_a = -F.softplus(proj[..., 2 * hk + 2 * self.d_model :] + self.decay_bias)
        elif self.decay == "fixed":
            log_a = self.log_gamma.expand(b, t, self.h)
        if self.decay != "none":
            q = q * self.dk**-0.5  # keeps the un-normalised sums at unit scale; "none" divides it away
        return q, k, v, g, log_a

    def _output(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, dv] (already normalised for decay "none") -> y [B, T, D]."""
        if self.decay != "none":
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.EPS)  # per-head RMS (group) norm
        o = o.flatten(-2)
        if self.decay != "none":
            o = o * self.norm_weight
        return self.out(o * F.silu(g))

    def prefill(self, x, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        q, k, v, g, log_a = self._featurize(x)
        if self.decay == "none":
            # The normaliser rides along as one more value column of ones: z_t = sum_j phi(k_j).
            ones = torch.ones_like(v[..., :1])
            o, s = chunked_decay_attention(q, k, torch.cat([v, ones], dim=-1), None)
            o = o[..., : self.dv] / (o[..., self.dv :] + self.EPS)
            return self._output(o, g), {"kv": s[..., : self.dv], "norm": s[..., self.dv]}
        o, s = chunked_decay_attention(q, k, v, log_a)
        return self._output(o, g), {"kv": s}

    def step(self, x, position, state, publish=None, reuse=None):
        q, k, v, g, log_a = self._featurize(x)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        if self.decay == "none":
            s = torch.cat([state["kv"], state["norm"].unsqueeze(-1)], dim=-1)
            o, s = scan_step(q, k, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1), None, s)
            o = o[..., : self.dv] / (o[..., self.dv :] + self.EPS)
            return self._output(o.unsqueeze(1), g), {"kv": s[..., : self.dv], "norm": s[..., self.dv]}
        o, s = scan_step(q, k, v, log_a[:, 0], state["kv"])
        return self._output(o.unsqueeze(1), g), {"kv": s}

    # -- shapes and costs ----------------------------------------------------------------------------------------
    @classmethod
    def state_shapes(cls, d_model, spec, batch, context, reuse_features=False):
        shapes = {"kv": (batch, spec.heads, spec.state_size, d_model // spec.heads)}
        if spec.decay == "none":
            shapes["norm"] = (batch, spec.heads, spec.state_size)
        return shapes

    @classmethod
    def _proj_width(cls, d_model, spec) -> int:
        return 2 * spec.heads * spec.state_size + 2 * d_model + (spec.heads if spec.decay == "data" else 0)

    @classmethod
    def param_count(cls, d_model, spec, reuse_features=False):
        n = d_model * cls._proj_width(d_model, spec)
        if spec.decay == "data":
            n += spec.heads  # decay bias
        if spec.decay != "none":
            n += d_model  # output norm weight
        return n + channel_mix_params(spec.channel_mixing, d_model, d_model)

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        h, dk, dv = spec.heads, spec.state_size, d_model // spec.heads
        dv_eff = dv + 1 if spec.decay == "none" else dv  # the normaliser column
        common = 2.0 * d_model * cls._proj_width(d_model, spec) + channel_mix_flops(
            spec.channel_mixing, d_model, d_model
        )
        prefill = common + chunked_flops(context, h, dk, dv_eff, decay=spec.decay != "none")
        decode = common + 4.0 * h * dk * dv_eff
        return Flops(prefill, decode)

    @classmethod
    def activation_elements(cls, d_model, spec, tokens):
        h, dk, dv = spec.heads, spec.state_size, d_model // spec.heads
        padded = -(-max(1, tokens) // CHUNK) * CHUNK
        n = padded // CHUNK
        # projections, the per-chunk score and decay matrices, the per-chunk states (and their decayed copy)
        return padded * cls._proj_width(d_model, spec) + 2 * h * padded * CHUNK + 2 * (n + 1) * h * dk * (dv + 1)

    @classmethod
    def constraint_errors(cls, d_model, spec, context):
        errors = []
        if d_model % spec.heads:
            errors.append(f"heads: {spec.heads} does not divide d_model {d_model}")
        if spec.decay == "none" and spec.nonlinearity not in POSITIVE_MAPS:
            errors.append(
                f"nonlinearity: plain linear attention (decay 'none') divides by phi(q).sum(phi(k)) and needs a "
                f"positive feature map ({', '.join(POSITIVE_MAPS)}), not {spec.nonlinearity!r}"
            )
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            errors.append(f"channel_mixing: grouped needs d_model divisible by {GROUPS}, got {d_model}")
        return errors

    @classmethod
    def repair(cls, d_model, spec, context):
        if d_model % spec.heads:
            ok = [h for h in cls.choices["heads"] if d_model % h == 0]
            spec = spec.with_(heads=max([h for h in ok if h <= spec.heads] or ok or [1]))
        if spec.decay == "none" and spec.nonlinearity not in POSITIVE_MAPS:
            spec = spec.with_(nonlinearity="elu")
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            spec = spec.with_(channel_mixing="dense")
        return spec
