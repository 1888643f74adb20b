"""Linear attention: plain (Katharopoulos), RetNet retention, Gated Linear Attention, Mamba-2-style scalar decay,
each with an optional differential form.

T_ij = C_i A_{i-1}...A_{j+1} B_j with a diagonal (or scalar) decay: a low-rank token mixer whose rank is the key dim
d_k. Per head h, with feature map phi on queries and keys ("identity" in the papers of the decayed kinds):

    q, k = phi(x W_q), phi(x W_k)                  # [H, d_k] each (W_q, W_k: the featurizer)
    v, g = x W_v, x W_g                            # v: [H, d_v = d/H];  g: [d] output gate
    S_t = Diag(a_t) S_{t-1} + k_t^T v_t            # [d_k, d_v] per head
    o_t = q_t S_t  = sum_{j<=t} q_t Diag(prod_{s=j+1..t} a_s) k_j^T v_j
    y   = W_out( norm_H(o) * silu(g) )             # W_out: dense | grouped | diagonal channel mixing

decay (`spec.decay`):
- "none": Katharopoulos et al. 2020: a = 1 and a normaliser z_t = z_{t-1} + k_t, o_t <- o_t / (q_t . z_t + eps), so
  phi must be positive ("relu", "elu" = elu+1, "sigmoid"); no output norm (the normaliser plays its part).
- "retnet": RetNet's retention (Sun et al. 2023, arXiv 2307.08621), as torchscale's MultiScaleRetention: q and k
  rotated by e^{i n theta} (theta_m = 10000^{-m/(d_k/2-1)}, m = 0..d_k/2-1, each applied to a pair of adjacent
  channels: `theta_shift`), scores scaled by d_k^-1/2 (torchscale scales k, here q), a fixed decay per head gamma_h = 1 - 2^(-5-h) (a buffer), the
  per-head RMS (group) norm and the swish gate. torchscale also divides each row of the decayed scores by a positive
  per-(token, head) factor (the decay-mask and |score| normalisations); the group norm cancels any such factor up
  to its epsilon, so they are left out here. v is d/H wide, not RetNet's 2d/H.
- "gla": Gated Linear Attention (Yang et al. 2023, arXiv 2312.06635): a data-dependent gate per key channel,
  a_t = sigmoid(x_t W_a1 W_a2 + b)^(1/16) (rank 16, tau = 16 as in the paper), i.e. log a_t = logsigmoid(.)/16;
  q scaled by d_k^-1/2 (as flash-linear-attention), the per-head RMS norm (fla's; the paper writes LayerNorm) and
  the swish gate.
- "scalar": Mamba-2-style scalar data-dependent decay, one per head: log a_t = -softplus(x_t . w_h + b_h), b_h
  initialised so softplus(b_h) is log-uniform in [1e-3, 1e-1] (Mamba-2's dt range); q scaled by d_k^-1/2 and the
  per-head RMS norm.

Differential form (`differential`, the Differential Transformer's (Ye et al. 2024, arXiv 2410.05258) subtraction
applied to linear attention): q and k are split into two halves of the key dim, [q1 | q2], [k1 | k2] (d_k/2 each);
two linear attentions over the same v, o = o1 - lambda o2 with o_i = q_i S_i (S_i the state of half i, the same
decay as the plain form, so the state is the plain form's [d_k, d_v]); then the per-head RMS norm (eps 1e-5, as
the Differential Transformer's subln) and a (1 - lambda_init) scale. lambda = exp(lq1 . lk1) - exp(lq2 . lk2) +
lambda_init, lq*, lk* in R^{d_k/2} ~ N(0, 0.1^2), lambda_init = 0.8 - 0.6 exp(-0.3 l) for the 0-based depth l.
q is scaled by (d_k/2)^-1/2; "retnet" rotates each half on its own (theta over d_k/2). With a decay, o1 - lambda o2 = [q1, -lambda q2] S: one pass with a sign-scaled q.
With decay "none" each half has its own normaliser (o_i = q_i S_i / (q_i . z_i)), run as 2H heads of d_k/2.

Parallel forms, loop-free over time so they export with a dynamic length:
- "none", "retnet", "scalar" (`chunked_decay_attention`): Mamba-2's SSD "minimal discrete" algorithm: T is padded
  to a multiple of CHUNK with zero keys/values and zero log-decay; inside a chunk the masked quadratic form with
  the decay matrix exp(segsum(log a)), across chunks one [n, n] decay matrix applied to the per-chunk states.
- "gla" (`gated_chunked`, also RWKV-6's core): chunks of GATED_CHUNK = 16 tokens with GLA's secondary chunking
  inside (sub-chunks of SUB = 4): within a sub-chunk the exact [SUB, SUB, d_k] decay tensor exp(b_i - b_j) (b the
  within-chunk cumsum of log a, masked to -inf above the diagonal before exp), contracted as one [1, d_k] x
  [d_k, SUB] matmul per query; across sub-chunks p > r the factored form (q_i exp(b_i - e_r)) . (k_j exp(e_r - b_j))
  with e_r the cumsum at the end of sub-chunk r, both exponents <= 0, so no exp of a positive number anywhere and
  no clamp on the decay; across chunks the per-key-channel decayed prefix of the chunk states (`decayed_prefix`,
  two levels, exponents <= 0).

Decode state: "kv" [B, H, d_k, d_v] (+ "norm" [B, H, d_k] for decay "none"), the same for the differential form.

Costs (matmul FLOPs per token): projections 2d(2 H d_k + 2d) (+ 2dH for "scalar", + 2*16*(d + H d_k) for "gla") +
output mixing; decode adds 4 H d_k d_v' (state update as an outer-product matmul, read-out; d_v' = d_v + 1 with the
normaliser column); prefill adds the chunked terms of `chunked_flops` / `gated_chunked_flops` (the differential
"none" form runs 2H heads of d_k/2, so its intra-chunk scores multiply v twice). The per-head norm has a learned
per-channel weight [d]. Featurizer (STAR featurizer sharing): W_q, W_k and the decay's projection ("scalar":
decay_proj; "gla": gate_down, gate_up); W_v, W_g, lambda, the norm and W_out stay each layer's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, Gene, LIVOperator, OpSpec, State
from factory.ops.common import GROUPS, channel_mix, channel_mix_flops, channel_mix_params, with_heads_dividing
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


# -- per-key-channel decay: GLA and RWKV-6 --------------------------------------------------------------------------
GATED_CHUNK = 16  # tokens per chunk of `gated_chunked`
SUB = 4  # tokens per sub-chunk of `gated_chunked` (its exact intra-sub-chunk decay tensor is [SUB, SUB, d_k])
BLOCK = 16  # chunks per block of `decayed_prefix`


def gated_chunks(t):
    """Chunks after padding: at least one padding token, so n >= 1 even for t == 0 (export never sees n == 0)."""
    return t // GATED_CHUNK + 1


def prefix_blocks(n):
    """Blocks after padding: at least one padding block, so nb >= 2 (export never specialises on nb == 1)."""
    return (n + BLOCK - 1) // BLOCK + 1


def decayed_prefix(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Inclusive decayed prefix sum P_n = sum_{m <= n} exp(g_{m+1} + ... + g_n) * U_m, loop-free.

    u: [B, H, n, N, V] (chunk contributions); g: [B, H, n, N] (chunk log decays, <= 0, per key channel).
    Two levels keep memory linear in n for practical lengths: exact [BLOCK, BLOCK] decay matrices inside blocks of
    BLOCK chunks, then an [nb, nb] one across blocks. Returns P zero-padded to nb * BLOCK chunks; padding (zero U,
    zero g) leaves the prefix unchanged, so P[:, :, -1] is the state after the last real chunk.
    """
    bsz, heads, n, dk, dv = u.shape
    nb = prefix_blocks(n)
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


def gated_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor, bonus: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention with a per-key-channel decay, from a zero state, chunked and loop-free.

    q, k, log_a: [B, H, T, N] (log_a <= 0); v: [B, H, T, V]. Returns y [B, T, H, V] and the final state [B, H, N, V].
    bonus None (GLA): y_t = q_t S_t, S_t = Diag(a_t) S_{t-1} + k_t^T v_t.
    bonus u [H, N] (RWKV-6): y_t = q_t (S_{t-1} + Diag(u) k_t^T v_t), the same S.
    """
    bsz, heads, t, dk = q.shape
    c = GATED_CHUNK
    n = gated_chunks(t)
    q, k, v, log_a = (F.pad(z, (0, 0, 0, n * c - t)).reshape(bsz, heads, n, c, z.shape[-1]) for z in (q, k, v, log_a))
    b = log_a.cumsum(-2)  # inclusive log decay from the chunk start
    bi = b if bonus is None else b - log_a  # the decay the query at i sees: S_i (GLA) or S_{i-1} (RWKV)
    # Secondary chunking (GLA's): sub-chunks of SUB tokens. Every exponent below is <= 0, masked before exp.
    ns = c // SUB
    qs, ks, vs, bs, bis = (z.unflatten(-2, (ns, SUB)) for z in (q, k, v, b, bi))  # [B, H, n, ns, SUB, X]
    # within a sub-chunk: the exact [SUB, SUB, N] decay tensor exp(bi_i - b_j)
    mask = torch.ones(SUB, SUB, dtype=torch.bool, device=q.device).tril(0 if bonus is None else -1)
    decay = torch.exp(torch.where(mask.unsqueeze(-1), bis.unsqueeze(-2) - bs.unsqueeze(-3), float("-inf")))
    diag = (qs.unsqueeze(-2) @ (ks.unsqueeze(-3) * decay).transpose(-1, -2)).squeeze(-2)  # [.., ns, SUB, SUB]
    # across sub-chunks p > r, factored at the end of sub-chunk r (e_r): exp(bi_i - b_j) = exp(bi_i - e_r) *
    # exp(e_r - b_j), both <= 1; the query factor depends on the pair: [.., ns_p, ns_r, SUB, N].
    e = bs[..., -1, :]  # [B, H, n, ns, N]
    earlier = torch.ones(ns, ns, dtype=torch.bool, device=q.device).tril(-1)[:, :, None, None]
    q_pair = qs.unsqueeze(-3) * torch.exp(
        torch.where(earlier, bis.unsqueeze(-3) - e.unsqueeze(-2).unsqueeze(-4), float("-inf"))
    )
    k_end = ks * torch.exp(e.unsqueeze(-2) - bs)  # [.., ns, SUB, N]
    att = q_pair @ k_end.unsqueeze(-4).transpose(-1, -2)  # [.., ns_p, ns_r, SUB, SUB]; zero where p <= r
    att = att + torch.eye(ns, device=q.device)[:, :, None, None] * diag.unsqueeze(-3)
    y = (att @ vs.unsqueeze(-4)).sum(-3).flatten(-3, -2)  # [B, H, n, C, V]
    if bonus is not None:
        y = y + (q * bonus.unsqueeze(1).unsqueeze(1) * k).sum(-1, keepdim=True) * v

    g = b[..., -1, :]  # [B, H, n, N]: each chunk's total log decay
    contrib = (k * torch.exp(g.unsqueeze(-2) - b)).transpose(-1, -2) @ v  # [B, H, n, N, V], decayed to chunk end
    after = decayed_prefix(contrib, g)  # state after each chunk (padded)
    # Unpad by index_select, not by slicing: a slice's size min(n, 16 * nb) defeats the exporter's shape algebra.
    before = torch.cat([torch.zeros_like(after[:, :, :1]), after], dim=2)
    before = before.index_select(2, torch.arange(n, device=q.device))  # state entering each chunk
    y = y + (q * torch.exp(bi)) @ before
    # Back to [B, T, H, V] while still chunked: transposing a [B, H, T, V] tensor makes the exporter guard T != 1.
    y = y.permute(0, 2, 3, 1, 4).reshape(bsz, n * c, heads, v.shape[-1])
    return y.index_select(1, torch.arange(t, device=q.device)), after[:, :, -1]  # index_select: see above


def gated_chunked_flops(context: int, heads: int, dk: int, dv: int) -> float:
    """Matmul FLOPs per prompt token of `gated_chunked` (padding included, averaged over `context`)."""
    t = max(1, context)
    n = gated_chunks(t)
    nb = prefix_blocks(n)
    c = GATED_CHUNK
    # intra-chunk scores (across and within sub-chunks), their product with v; chunk states, read-out
    total = n * (2.0 * c * c * dk + 2.0 * c * SUB * dk + 2.0 * c * c * dv + 4.0 * c * dk * dv)
    total += 2.0 * nb * BLOCK * BLOCK * dk * dv + 2.0 * nb * nb * dk * dv  # prefix within and across blocks
    return heads * total / t


def gated_elements(heads: int, dk: int, dv: int, tokens: int) -> int:
    """Largest live intermediates of `gated_chunked`: the within-sub-chunk decay tensor and its product with k, the
    pairwise query factors, the chunk states (two copies) and the within-block decay matrices."""
    n = gated_chunks(max(1, tokens))
    nb = prefix_blocks(n)
    ns = GATED_CHUNK // SUB
    per_chunk = 2 * GATED_CHUNK * SUB * dk + GATED_CHUNK * ns * dk
    return heads * (n * per_chunk + 2 * nb * BLOCK * dk * dv + nb * BLOCK * BLOCK * dk)


def outer_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: S = decay * S + k^T v (an outer-product matmul), o = q S.

    q, k [B, H, dk]; v [B, H, dv]; decay None, [B, H, 1, 1] (per head) or [B, H, dk, 1] (per key channel)."""
    update = k.unsqueeze(-1) @ v.unsqueeze(-2)  # [B, H, dk, dv]
    new = state + update if decay is None else decay * state + update
    return (q.unsqueeze(-2) @ new).squeeze(-2), new


# -- RetNet's rotation ----------------------------------------------------------------------------------------------
def retnet_angles(dk: int) -> torch.Tensor:
    """torchscale RetNetRelPos: theta = 1 / 10000^linspace(0, 1, dk/2), each repeated for a pair of channels."""
    angle = 1.0 / (10000 ** torch.linspace(0, 1, dk // 2))
    return angle.unsqueeze(-1).repeat(1, 2).flatten()


def theta_shift(x: torch.Tensor, position: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """x [B, T, ..., r] rotated by e^{i n theta} on adjacent channel pairs (torchscale's theta_shift: x cos +
    rotate_every_two(x) sin); position: [T] or [B, T] absolute positions; angle [r]."""
    ang = position.to(x.dtype).unsqueeze(-1) * angle  # [(B,) T, r]
    if ang.dim() == 2:
        ang = ang.unsqueeze(0)
    for _ in range(x.dim() - 3):
        ang = ang.unsqueeze(-2)  # broadcast over heads (and the differential halves)
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * torch.cos(ang) + rot * torch.sin(ang)


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


def lambda_init(layer: int) -> float:
    """The Differential Transformer's lambda_init for the 0-based depth `layer`: 0.8 - 0.6 exp(-0.3 layer)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


GATE_RANK = 16  # GLA's low-rank gate projection
GATE_TAU = 16.0  # GLA's gate temperature: log a = logsigmoid(.) / tau


@register
class LinearAttention(LIVOperator):
    family = "linear_attention"
    code = 1
    genes = (
        Gene("heads", (1, 2, 4, 8), 4),
        Gene("decay", ("none", "retnet", "gla", "scalar"), "gla"),  # gla: per key channel; scalar: per head
        Gene("nonlinearity", ("identity", "relu", "elu", "swish", "sigmoid"), "identity"),  # the feature map
        Gene("key_dim", (8, 16, 32, 64), 16),  # key (feature) width per head, d_k
        Gene("channel_mixing", ("dense", "grouped", "diagonal"), "dense"),
        Gene("differential", (False, True), False),  # two feature maps over one shared value
    )
    # STAR featurizer: the projections that compute the input-dependent part of T (q, k and the decay's projection;
    # a name the spec does not build is None). v, the output gate and the output projection stay each layer's own.
    featurizer = ("q_proj", "k_proj", "decay_proj", "gate_down", "gate_up")
    # Normaliser and RMS norm epsilon. The per-head norm divides an output that can nearly cancel (phi(q) . phi(k)
    # ~ 0 with signed feature maps) by its own RMS: with 1e-6, float32 rounding in such a head grew past 1e-4 in
    # the logits of a six-layer stack; 1e-5, as Mamba-2's gated norm and the Differential Transformer's subln,
    # bounds that gain.
    EPS = 1e-5

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.h, self.dk = spec.heads, spec.key_dim
        self.dv = d_model // spec.heads
        self.decay = spec.decay
        self.diff = spec.differential
        self.phi = FEATURE_MAPS[spec.nonlinearity]
        hk = self.h * self.dk
        self.q_proj = nn.Linear(d_model, hk, bias=False)
        self.k_proj = nn.Linear(d_model, hk, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.g_proj = nn.Linear(d_model, d_model, bias=False)
        self.decay_proj = self.gate_down = self.gate_up = None  # featurizer names the spec does not build
        if spec.decay == "scalar":
            self.decay_proj = nn.Linear(d_model, self.h, bias=True)
            with torch.no_grad():
                self.decay_proj.bias.copy_(inverse_softplus(log_uniform(self.h, 1e-3, 1e-1)))
        if spec.decay == "gla":
            self.gate_down = nn.Linear(d_model, GATE_RANK, bias=False)
            self.gate_up = nn.Linear(GATE_RANK, hk, bias=True)
        if spec.decay == "retnet":
            gamma = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(self.h, dtype=torch.float32)))
            self.register_buffer("log_gamma", gamma, persistent=False)
            self.register_buffer("angle", retnet_angles(self.dk // 2 if self.diff else self.dk), persistent=False)
        if self.diff:
            half = self.dk // 2
            self.lambda_init = lambda_init(layer)
            self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
                nn.Parameter(torch.randn(half) * 0.1) for _ in range(4)
            )
        if self._normed(spec):
            self.norm_weight = nn.Parameter(torch.ones(d_model))
        self.out = channel_mix(spec.channel_mixing, d_model, d_model)

    @staticmethod
    def _normed(spec) -> bool:
        return spec.decay != "none" or spec.differential

    def _lambda(self) -> torch.Tensor:
        return (
            torch.exp((self.lambda_q1 * self.lambda_k1).sum())
            - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
            + self.lambda_init
        )

    def _featurize(self, x: torch.Tensor, position: torch.Tensor):
        """x [B, T, D], position [T] or [B, T] -> q, k [B, T, H, dk] (feature-mapped, scaled, rotated, sign-scaled
        for the differential form with a decay), v [B, T, H, dv], gate [B, T, D], log decay [B, T, H] or
        [B, T, H, dk] (gla) or None."""
        b, t, _ = x.shape
        q = self.phi(self.q_proj(x).unflatten(-1, (self.h, self.dk)))
        k = self.phi(self.k_proj(x).unflatten(-1, (self.h, self.dk)))
        v = self.v_proj(x).unflatten(-1, (self.h, self.dv))
        g = self.g_proj(x)
        log_a = None
        if self.decay == "scalar":
            log_a = -F.softplus(self.decay_proj(x))
        elif self.decay == "gla":
            log_a = (F.logsigmoid(self.gate_up(self.gate_down(x))) / GATE_TAU).unflatten(-1, (self.h, self.dk))
        elif self.decay == "retnet":
            log_a = self.log_gamma.expand(b, t, self.h)
        if self.decay == "retnet":
            if self.diff:  # each half rotated on its own, as each of the Differential Transformer's two maps
                q = theta_shift(q.unflatten(-1, (2, self.dk // 2)), position, self.angle).flatten(-2)
                k = theta_shift(k.unflatten(-1, (2, self.dk // 2)), position, self.angle).flatten(-2)
            else:
                q, k = theta_shift(q, position, self.angle), theta_shift(k, position, self.angle)
        if self.decay != "none":
            q = q * (self.dk // 2 if self.diff else self.dk) ** -0.5  # unit-scale sums; "none" divides it away
            if self.diff:  # o1 - lambda o2 = [q1, -lambda q2] S: the second half's queries carry -lambda
                half = self.dk // 2
                sign = torch.cat([torch.ones(half, device=x.device), -self._lambda().expand(half)])
                q = q * sign
        return q, k, v, g, log_a

    def _output(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, dv] (already normalised for decay "none") -> y [B, T, D]."""
        if self._normed(self.spec):
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.EPS)  # per-head RMS (group) norm
        o = o.flatten(-2)
        if self._normed(self.spec):
            o = o * self.norm_weight
        if self.diff:
            o = o * (1.0 - self.lambda_init)
        return self.out(o * F.silu(g))

    # "none": the normaliser rides along as one more value column of ones (z_t = sum_j phi(k_j)); the differential
    # form runs its two halves as 2H heads of dk/2 over the same v (each half its own normaliser).
    def _split_halves(self, z: torch.Tensor) -> torch.Tensor:  # [..., H, dk] -> [..., 2H, dk/2]
        return z.unflatten(-1, (2, self.dk // 2)).flatten(-3, -2)

    def _join_halves(self, s: torch.Tensor) -> torch.Tensor:
        """[B, 2H, dk/2, X] -> [B, H, dk, X], the halves' states stacked. A concatenation, not a flatten: the final
        state is a strided view of the per-chunk states, and flattening it guards on the chunk count when exported."""
        s = s.unflatten(1, (self.h, 2))
        return torch.cat([s[:, :, 0], s[:, :, 1]], dim=2)

    def _plain_values(self, v: torch.Tensor) -> torch.Tensor:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        return torch.stack([v, v], dim=-2).flatten(-3, -2) if self.diff else v  # stack: a contiguous copy

    def _plain_out(self, o: torch.Tensor) -> torch.Tensor:
        if self.diff:  # unflatten before slicing: an unflatten of a sliced view guards on the length when exported
            o = o.unflatten(-2, (self.h, 2))
        o = o[..., : self.dv] / (o[..., self.dv :] + self.EPS)
        if self.diff:
            o = o[..., 0, :] - self._lambda() * o[..., 1, :]
        return o

    def prefill(self, x, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        q, k, v, g, log_a = self._featurize(x, torch.arange(x.shape[1], device=x.device))
        if self.decay == "none":
            if self.diff:
                q, k = self._split_halves(q), self._split_halves(k)
            o, s = chunked_decay_attention(q, k, self._plain_values(v), None)
            if self.diff:
                s = self._join_halves(s)
            return self._output(self._plain_out(o), g), {"kv": s[..., : self.dv], "norm": s[..., self.dv]}
        if self.decay == "gla":
            o, s = gated_chunked(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_a.transpose(1, 2))
        else:
            o, s = chunked_decay_attention(q, k, v, log_a)
        return self._output(o, g), {"kv": s}

    def step(self, x, position, state, publish=None, reuse=None):
        q, k, v, g, log_a = self._featurize(x, position)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        if self.decay == "none":
            s = torch.cat([state["kv"], state["norm"].unsqueeze(-1)], dim=-1)
            if self.diff:
                q, k = self._split_halves(q), self._split_halves(k)
                s = s.unflatten(2, (2, self.dk // 2)).flatten(1, 2)
            o, s = outer_step(q, k, self._plain_values(v), None, s)
            if self.diff:
                s = self._join_halves(s)
            o = self._plain_out(o.unsqueeze(1))
            return self._output(o, g), {"kv": s[..., : self.dv], "norm": s[..., self.dv]}
        decay = torch.exp(log_a[:, 0]).unsqueeze(-1)  # [B, H, dk, 1] (gla) or [B, H, 1]
        if self.decay != "gla":
            decay = decay.unsqueeze(-1)
        o, s = outer_step(q, k, v, decay, state["kv"])
        return self._output(o.unsqueeze(1), g), {"kv": s}

    # -- shapes and costs ----------------------------------------------------------------------------------------
    @classmethod
    def state_shapes(cls, d_model, spec, batch, context, reuse_features=False):
        shapes = {"kv": (batch, spec.heads, spec.key_dim, d_model // spec.heads)}
        if spec.decay == "none":
            shapes["norm"] = (batch, spec.heads, spec.key_dim)
        return shapes

    @classmethod
    def _featurizer_params(cls, d_model, spec) -> int:
        hk = spec.heads * spec.key_dim
        n = 2 * d_model * hk  # W_q, W_k
        if spec.decay == "scalar":
            n += d_model * spec.heads + spec.heads
        if spec.decay == "gla":
            n += d_model * GATE_RANK + GATE_RANK * hk + hk
        return n

    @classmethod
    def featurizer_params(cls, d_model, spec, reuse_features=False):
        return cls._featurizer_params(d_model, spec)

    @classmethod
    def param_count(cls, d_model, spec, reuse_features=False):
        n = cls._featurizer_params(d_model, spec) + 2 * d_model * d_model  # + W_v, W_g
        if cls._normed(spec):
            n += d_model  # output norm weight
        if spec.differential:
            n += 2 * spec.key_dim  # lambda_q1, lambda_k1, lambda_q2, lambda_k2
        return n + channel_mix_params(spec.channel_mixing, d_model, d_model)

    @classmethod
    def _projection_flops(cls, d_model, spec) -> float:
        hk = spec.heads * spec.key_dim
        f = 2.0 * d_model * (2 * hk + 2 * d_model)
        if spec.decay == "scalar":
            f += 2.0 * d_model * spec.heads
        if spec.decay == "gla":
            f += 2.0 * GATE_RANK * (d_model + hk)
        return f + channel_mix_flops(spec.channel_mixing, d_model, d_model)

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        h, dk, dv = spec.heads, spec.key_dim, d_model // spec.heads
        common = cls._projection_flops(d_model, spec)
        if spec.decay == "none":
            hh, kk = (2 * h, dk // 2) if spec.differential else (h, dk)
            prefill = chunked_flops(context, hh, kk, dv + 1, decay=False)
            decode = 4.0 * hh * kk * (dv + 1)
        elif spec.decay == "gla":
            prefill = gated_chunked_flops(context, h, dk, dv)
            decode = 4.0 * h * dk * dv
        else:
            prefill = chunked_flops(context, h, dk, dv)
            decode = 4.0 * h * dk * dv
        return Flops(common + prefill, common + decode)

    @classmethod
    def activation_elements(cls, d_model, spec, tokens):
        h, dk, dv = spec.heads, spec.key_dim, d_model // spec.heads
        proj = 2 * h * dk + 2 * d_model + (h * dk if spec.decay == "gla" else h)
        if spec.decay == "gla":
            padded = gated_chunks(max(1, tokens)) * GATED_CHUNK
            return padded * proj + gated_elements(h, dk, dv, tokens)
        padded = -(-max(1, tokens) // CHUNK) * CHUNK
        n = padded // CHUNK
        hh = 2 * h if spec.differential and spec.decay == "none" else h
        # projections, the per-chunk score and decay matrices, the per-chunk states (and their decayed copy)
        return padded * proj + 2 * hh * padded * CHUNK + 2 * (n + 1) * h * dk * (dv + 1)

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
        spec = with_heads_dividing(spec, d_model, cls.gene_domain("heads"))
        if spec.decay == "none" and spec.nonlinearity not in POSITIVE_MAPS:
            spec = spec.with_(nonlinearity="elu")
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            spec = spec.with_(channel_mixing="dense")
        return spec
