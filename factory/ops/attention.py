"""Softmax attention: MHA / GQA / MQA, RoPE / ALiBi / no positions, full causal or sliding window, and the
Differential Transformer's differential attention (Ye et al. 2024, arXiv 2410.05258).

T_ij = softmax_j(C_i B_j / sqrt(dh) + bias_ij) for allowed (i, j): a dense token mixer.

    q = W_q x;  k = W_k x;  v = W_v x   # H query heads of width dh = d / H; H_kv = H / kv_repeat key/value heads,
                                        # query head h reads KV head h // kv_repeat
    RoPE rotates q and k by their absolute positions (interleaved pairs (2i, 2i+1), common.Rotary); ALiBi adds
    bias_ij = -slope_h * (i - j), slopes 2^(-8h/H)
    allowed(i, j) = j <= i, and with window W > 0 also i - W < j (W tokens, the current one included)
    A_h = softmax(q_h k_{h // kv_repeat}^T / sqrt(dh) + bias + mask)
    plain:        y = W_out( concat_h A_h v_{h // kv_repeat} )

Differential (`differential=True`, laid out as transformers' DiffLlamaAttention): the H query heads form H/2
differential heads of width 2 dh; differential head g takes query/key heads g and g + H/2 as its two halves
(Q1 K1, Q2 K2, each dh wide) and the values of both as one 2 dh wide value, V'_g = [v_{g // r} | v_{(g + H/2) // r}]:

    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,   lambda_init = 0.8 - 0.6 exp(-0.3 layer)  (0-based
             layer, = the paper's 0.8 - 0.6 exp(-0.3 (l - 1)) with l 1-based); lq*, lk*: [dh] learned vectors
    o_g = (A_g - lambda A_{g + H/2}) V'_g                          # one matmul against the difference of the softmaxes
    y = W_out( concat_g (1 - lambda_init) * RMSNorm(o_g) )         # RMSNorm over the 2 dh channels, eps 1e-5 inside
                                                                   # the root, no affine weight (DiffLlama's groupnorm)

So keys and values are exactly plain attention's at the same head count (the same cache), H must be even, and the
cost per key is the same as plain attention's: QK^T over H heads of dh and one [H/2, 2 dh] product with V'.

Parallel form, loop-free over time (exports with a dynamic length):
- full attention: q k^T over every key plus an additive causal [T, T] mask ([H, T, T] with the ALiBi bias),
  softmax, A v. Plain attention without ALiBi runs PyTorch's fused SDPA (is_causal), which keeps no [T, T] scores
  in training memory; the exporter decomposes it into the same dense product and mask, which is what `flops`
  counts (torch's own dense SDPA formula, tests/test_ops.py). Differential and ALiBi layers write it out.
- GQA: the parallel form gathers keys/values per query head along the head axis (a broadcast batched matmul would
  guard the exported length); the step makes a KV head's query heads rows of one matmul, so the cache is never
  repeated.
- window W: blocked. Queries are split into blocks of L = min(W, BLOCK) (the length padded up to a multiple of L);
  block c (positions cL .. cL + L - 1) gathers the K = W + L - 1 keys/values at positions cL - W + 1 .. cL + L - 1
  (keys before position 0 are zero padding, masked), so scores are [H, T/L, L, K]: O(T (W + L)), no [T, T] tensor.
  The additive mask ([T/L, L, K], [H, T/L, L, K] with ALiBi: the band, the left padding, the bias) depends on the
  length and the spec only, so layers with the same window and slopes share one in the exported graph.

Decode state (keys stored after RoPE, so a step never re-rotates the cache):
    full attention:   {"key", "value"}: [B, H_kv, T, dh], growing by one along axis 2 each step;
    window W:         {"key", "value"}: [B, H_kv, W, dh], a fixed-size rolling cache of the last W tokens,
                      left-padded with zeros while fewer than W tokens have been seen. The step always rolls
                      (cat + slice) and masks the padding from the position tensor, so the decode graph is static.
A window >= context is kept (not repaired to 0): it computes the same thing as full attention within the
context, but its cache stays a fixed [B, H_kv, W, dh] tensor, bounded for generation past the context (and its
blocked prefill scores K = W + L - 1 keys per query, padding included, which `flops` says).

Feature sharing (`feature_kinds = ("key", "value")`): a producer publishes its post-RoPE keys/values in the
state layout ([B, H_kv, T, dh] from prefill, the updated cache from step); a consumer (`reuse_features=True`,
same spec) has only W_q (+ its lambda vectors) and W_out, keeps no state, and attends over the producer's keys/values.
Featurizer sharing (`featurizer = ("q_proj", "k_proj")`): W_q and W_k, the projections behind the token-mixing
matrix; values, lambdas and W_out stay per layer. A consumer has no k_proj (None), so sharing within a set of
consumers (the genome never mixes producers and consumers in one set) points q_proj at the first member's and sets
None over None.

Costs, with n(i) = keys token i's scores are computed for: T for full attention (every key, then masked), on
average ceil(T / L) L K / T for a window (padding included), W for a windowed step, T + 1 for a full step. Parameters: d^2 (q)
+ 2 d H_kv dh (k, v; none for a consumer) + 4 dh (lambdas, differential) + the output channel mixing. FLOPs per
token: the projections + 4 d n(i) (QK^T: 2 d n; A v or (A_1 - lambda A_2) V': 2 d n).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, Gene, LIVOperator, OpSpec, State
from factory.ops.common import (
    GROUPS, Rotary, alibi_slopes, channel_mix, channel_mix_flops, channel_mix_params, heads_dividing, nearest,
)
from factory.ops.registry import register

BLOCK = 64  # longest query block of the windowed parallel form (blocks are min(W, BLOCK) long)
NORM_EPS = 1e-5  # the differential head norm's epsilon (DiffLlamaConfig.rms_norm_eps)
LAMBDA_STD = 0.1  # init std of the lambda vectors (DiffLlamaConfig.lambda_std_dev)


def lambda_init(layer: int) -> float:
    """The Differential Transformer's depth-dependent lambda_init for the 0-based `layer`."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


def window_blocks(window: int, tokens: int) -> tuple[int, int, int]:
    """(L, K, n) of the blocked windowed form: query block length, keys per block, blocks for `tokens` tokens."""
    block = min(window, BLOCK)
    return block, window + block - 1, -(-max(tokens, 1) // block)


@register
class Attention(LIVOperator):
    family = "attention"
    code = 0
    genes = (
        Gene("heads", (1, 2, 4, 8), 4),  # query heads
        Gene("kv_repeat", (1, 2, 4, 8), 1),  # query heads per key/value head: 1 = MHA, heads = MQA, between = GQA
        Gene("positional", ("rope", "alibi", "none"), "rope"),
        Gene("window", (0, 16, 32, 64, 128, 256), 0),  # sliding window (banded sparsity); 0 = dense
        Gene("channel_mixing", ("dense", "grouped", "diagonal"), "dense"),
        Gene("differential", (False, True), False),  # the Differential Transformer's form
    )
    feature_kinds = ("key", "value")
    featurizer = ("q_proj", "k_proj")

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.heads = spec.heads
        self.rep = spec.kv_repeat
        self.kv_heads = spec.heads // spec.kv_repeat
        self.head_dim = d_model // spec.heads
        self.window = spec.window
        self.differential = spec.differential
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        # A consumer reads a producer's keys/values, so it has no projection for them.
        kv_width = self.kv_heads * self.head_dim
        self.k_proj = None if reuse_features else nn.Linear(d_model, kv_width, bias=False)
        self.v_proj = None if reuse_features else nn.Linear(d_model, kv_width, bias=False)
        self.out = channel_mix(spec.channel_mixing, d_model, d_model)
        self.rotary = Rotary(self.head_dim) if spec.positional == "rope" else None
        if spec.positional == "alibi":
            self.register_buffer("slopes", alibi_slopes(spec.heads), persistent=False)
        else:
            self.slopes = None
        if self.differential:
            self.lambda_init = lambda_init(layer)
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, name, nn.Parameter(torch.randn(self.head_dim) * LAMBDA_STD))

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"d_model={self.d_model}, heads={s.heads}, kv_heads={self.kv_heads}, positional={s.positional}, "
            f"window={s.window}, differential={s.differential}, reuse_features={self.reuse_features}"
        )

    # -- helpers -----------------------------------------------------------------------------------------------
    def _split_heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, self.head_dim).transpose(1, 2)  # [B, heads, T, dh]

    def _queries(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotated, pre-scaled queries [B, H, T, dh]."""
        q = self._split_heads(self.q_proj(x), self.heads)
        if self.rotary is not None:
            q = self.rotary(q, positions)
        return q * self.scale

    def _keys_values(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._split_heads(self.k_proj(x), self.kv_heads)
        v = self._split_heads(self.v_proj(x), self.kv_heads)
        if self.rotary is not None:
            k = self.rotary(k, positions)
        return k, v

    def _lambda(self) -> torch.Tensor:
        lam1 = torch.exp((self.lambda_q1 * self.lambda_k1).sum())
        lam2 = torch.exp((self.lambda_q2 * self.lambda_k2).sum())
        return lam1 - lam2 + self.lambda_init

    def _mask(self, dist: torch.Tensor, allowed: torch.Tensor, heads_shape) -> torch.Tensor:
        """Additive mask: the ALiBi bias -slope_h * dist where allowed, -inf elsewhere. Built from the length and
        the spec alone in the parallel form, so layers with one window and one set of slopes share it in the
        exported graph (one Where per distinct mask, shared_elements); `heads_shape` splits H for the slopes."""
        neg = torch.tensor(float("-inf"), device=dist.device)
        if self.slopes is None:
            return torch.where(allowed, torch.zeros((), device=dist.device), neg)
        slopes = self.slopes.view(*heads_shape, *(1,) * dist.dim())
        return torch.where(allowed, -slopes * dist.to(slopes.dtype), neg)

    def _difference(self, p: torch.Tensor) -> torch.Tensor:
        """A_g - lambda A_{g + H/2} for p with the H heads on axis 1."""
        half = self.heads // 2
        return p[:, :half] - self._lambda().to(p.dtype) * p[:, half:]

    def _head_norm(self, o: torch.Tensor) -> torch.Tensor:
        """The differential heads' RMSNorm over their 2 dh channels and the (1 - lambda_init) scale."""
        return (1.0 - self.lambda_init) * (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + NORM_EPS))

    def _per_head(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys for each query head ([B, H, T, dh]) and values for each output head: [B, H, T, dh] (plain) or
        V'_g = [v_{g // rep} | v_{(g + H/2) // rep}], [B, H/2, T, 2 dh] (differential). Gathers along the head axis,
        so the parallel form's matmuls never broadcast (a broadcast batched matmul reshapes an expanded tensor,
        which guards the exported length)."""
        device = k.device
        heads = torch.arange(self.heads, device=device)
        if self.rep > 1:
            k = k.index_select(1, heads // self.rep)
        if not self.differential:
            return k, (v.index_select(1, heads // self.rep) if self.rep > 1 else v)
        half = torch.arange(self.heads // 2, device=device)
        va = v.index_select(1, half // self.rep)
        vb = v.index_select(1, (half + self.heads // 2) // self.rep)
        return k, torch.cat([va, vb], dim=-1)

    def _read(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """p: probabilities [B, H, *N, Q, K]; v from `_per_head`: [B, H', *N, K, dv] -> [B, H', *N, Q, dv]."""
        if not self.differential:
            return torch.matmul(p, v)
        return self._head_norm(torch.matmul(self._difference(p), v))

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        """[B, H', T, dv] -> [B, T, d]."""
        b, _, t, _ = o.shape
        return o.transpose(1, 2).reshape(b, t, self.d_model)

    # -- parallel form -----------------------------------------------------------------------------------------
    def _dense(self, q, k, v) -> torch.Tensor:
        """Full causal attention; q [B, H, T, dh]; k, v [B, H_kv, T, dh]."""
        t = q.shape[2]
        idx = torch.arange(t, device=q.device)
        dist = idx.unsqueeze(1) - idx.unsqueeze(0)  # [T, T]: i - j
        k, v = self._per_head(k, v)
        if not self.differential and self.slopes is None:
            # PyTorch's fused kernel keeps no [T, T] scores in training memory; the exporter decomposes it into
            # the dense product and causal mask written out below, so the costs are the same dense T x T work.
            return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0))
        mask = self._mask(dist, dist >= 0, (self.heads,))  # [T, T], or [H, T, T] with ALiBi
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + mask.to(q.dtype), dim=-1)  # [B, H, T, T]
        return self._merge(self._read(p, v))

    def _blocked(self, q, k, v) -> torch.Tensor:
        """Sliding-window attention in query blocks of L, each against its K = W + L - 1 keys (module docstring).

        Export notes (see linear_attention.chunked_decay_attention): padding makes contiguous copies, so the block
        split is a plain view; the blocks' keys are one index_select; the padding is dropped by a gather.
        """
        b, _, t, dh = q.shape
        w = self.window
        block, keys = min(w, BLOCK), w + min(w, BLOCK) - 1
        n = (t + block - 1) // block
        pad = n * block - t
        k, v = self._per_head(k, v)
        qb = F.pad(q, (0, 0, 0, pad)).unflatten(2, (n, block))  # [B, H, n, L, dh]
        # Key slot s of block c holds position c L + s - (W - 1): W - 1 zeros on the left, padding to n L on the right.
        start = torch.arange(n, device=q.device) * block
        index = (start.unsqueeze(1) + torch.arange(keys, device=q.device)).flatten()  # [n K]
        kb = F.pad(k, (0, 0, w - 1, pad)).index_select(2, index).unflatten(2, (n, keys))  # [B, H, n, K, dh]
        vb = F.pad(v, (0, 0, w - 1, pad)).index_select(2, index).unflatten(2, (n, keys))  # [B, H', n, K, dv]
        r = torch.arange(block, device=q.device).unsqueeze(1)
        s = torch.arange(keys, device=q.device).unsqueeze(0)
        dist = r - s + (w - 1)  # [L, K]: query position minus key position, the same in every block
        band = (dist >= 0) & (dist < w)
        real = (index >= w - 1).view(n, 1, keys)  # key positions >= 0
        mask = self._mask(dist.unsqueeze(0), band & real, (self.heads,))  # [n, L, K], or [H, n, L, K] with ALiBi
        p = torch.softmax(torch.matmul(qb, kb.transpose(-1, -2)) + mask.to(q.dtype), dim=-1)  # [B, H, n, L, K]
        o = self._read(p, vb).flatten(2, 3)  # [B, H', n L, dv]
        return self._merge(o.index_select(2, torch.arange(t, device=q.device)))

    def prefill(self, x, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        positions = torch.arange(x.shape[1], device=x.device)
        q = self._queries(x, positions)
        if self.reuse_features:
            k, v = reuse["key"], reuse["value"]
        else:
            k, v = self._keys_values(x, positions)
            if publish is not None:
                publish["key"], publish["value"] = k, v
        y = self.out(self._blocked(q, k, v) if self.window > 0 else self._dense(q, k, v))
        if self.reuse_features:
            return y, {}
        if self.window > 0:
            # The rolling cache: the last W keys/values, zero-padded on the left for short prompts.
            k = F.pad(k, (0, 0, self.window, 0))[:, :, -self.window :]
            v = F.pad(v, (0, 0, self.window, 0))[:, :, -self.window :]
        return y, {"key": k, "value": v}

    # -- recurrent form ----------------------------------------------------------------------------------------
    def step(self, x, position, state, publish=None, reuse=None):
        b = x.shape[0]
        q = self._queries(x, position)  # [B, H, 1, dh]
        if self.reuse_features:
            k, v = reuse["key"], reuse["value"]
            new_state: State = {}
        else:
            k_t, v_t = self._keys_values(x, position)
            k = torch.cat([state["key"], k_t], dim=2)
            v = torch.cat([state["value"], v_t], dim=2)
            if self.window > 0:
                k, v = k[:, :, 1:], v[:, :, 1:]  # always roll: the oldest slot drops out
            new_state = {"key": k, "value": v}
            if publish is not None:
                publish["key"], publish["value"] = k, v
        n = k.shape[2]
        # Slot s holds the token (n - 1 - s) positions back; the last slot is the current token.
        dist = torch.arange(n - 1, -1, -1, device=x.device)
        if self.window > 0:
            # Slots before position 0 (left padding of a short prompt) are invalid: tensor ops, no branching.
            allowed = (dist.unsqueeze(0) <= position).view(b, 1, 1, n)
        else:
            allowed = torch.ones((), dtype=torch.bool, device=x.device)
        # The query heads of one KV head become query rows, so the cache is never repeated.
        qg = q.reshape(b, self.kv_heads, self.rep, self.head_dim)
        mask = self._mask(dist, allowed, (self.kv_heads, self.rep))  # [B | 1, H_kv | 1, rep | 1, n]
        p = torch.softmax(torch.matmul(qg, k.transpose(-1, -2)) + mask.to(q.dtype), dim=-1)
        if not self.differential:
            o = torch.matmul(p, v)  # [B, H_kv, rep, dh]
        else:
            # With an even KV head count the first half of the differential heads reads the first half of the KV
            # heads (rep per KV head) and V'_g's second half the second; with one KV head (MQA) it is read twice.
            m = self._difference(p.reshape(b, self.heads, n))  # [B, H/2, n]
            groups = max(self.kv_heads // 2, 1)
            vv = torch.cat([v[:, :groups], v[:, self.kv_heads - groups :]], dim=-1)  # [B, groups, n, 2 dh]
            o = self._head_norm(torch.matmul(m.reshape(b, groups, -1, n), vv))  # [B, groups, H/2 / groups, 2 dh]
        return self.out(o.reshape(b, 1, self.d_model)), new_state

    # -- shapes and costs --------------------------------------------------------------------------------------
    @classmethod
    def state_shapes(cls, d_model, spec, batch, context, reuse_features=False):
        if reuse_features:
            return {}
        length = spec.window if spec.window > 0 else context
        shape = (batch, spec.heads // spec.kv_repeat, length, d_model // spec.heads)
        return {"key": shape, "value": shape}

    @classmethod
    def param_count(cls, d_model, spec, reuse_features=False):
        dh = d_model // spec.heads
        kv = 0 if reuse_features else 2 * d_model * (spec.heads // spec.kv_repeat) * dh
        lambdas = 4 * dh if spec.differential else 0
        return d_model * d_model + kv + lambdas + channel_mix_params(spec.channel_mixing, d_model, d_model)

    @classmethod
    def featurizer_params(cls, d_model, spec, reuse_features=False):
        k = 0 if reuse_features else d_model * (spec.heads // spec.kv_repeat) * (d_model // spec.heads)
        return d_model * d_model + k

    @classmethod
    def prefill_keys(cls, spec, tokens: int) -> float:
        """Keys each prompt token's scores are computed against, averaged over `tokens` (padding included)."""
        tokens = max(tokens, 1)
        if spec.window == 0:
            return float(tokens)
        block, keys, n = window_blocks(spec.window, tokens)
        return n * block * keys / tokens

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        kv_width = 2 * (spec.heads // spec.kv_repeat) * (d_model // spec.heads)
        proj = 2.0 * d_model * d_model + channel_mix_flops(spec.channel_mixing, d_model, d_model)
        if not reuse_features:
            proj += 2.0 * d_model * kv_width
        decode_keys = spec.window if spec.window > 0 else context + 1
        # QK^T and the read-out: 2 * dh FLOPs per key per head each, over H heads of width dh (H * dh = d); the
        # differential read-out is H/2 heads of 2 dh, the same.
        return Flops(proj + 4.0 * d_model * cls.prefill_keys(spec, context), proj + 4.0 * d_model * decode_keys)

    @classmethod
    def _score_elements(cls, spec, tokens: int) -> int:
        """Elements of one [H, queries, keys] score tensor of the parallel form (padding included)."""
        if spec.window == 0:
            return spec.heads * tokens * tokens
        block, keys, n = window_blocks(spec.window, tokens)
        return spec.heads * n * block * keys

    @classmethod
    def _mask_elements(cls, spec, tokens: int) -> int:
        """The mask (and ALiBi bias) the parallel form builds from the length and the spec alone."""
        heads = spec.heads if spec.positional == "alibi" else 1
        if spec.window == 0:
            return heads * tokens * tokens
        block, keys, n = window_blocks(spec.window, tokens)
        return heads * n * block * keys

    @classmethod
    def _gathered_elements(cls, d_model, spec, tokens: int) -> int:
        """The blocks' gathered keys and values (windowed form only)."""
        if spec.window == 0:
            return 0
        _, keys, n = window_blocks(spec.window, tokens)
        return 2 * (spec.heads // spec.kv_repeat) * (d_model // spec.heads) * n * keys

    @classmethod
    def activation_elements(cls, d_model, spec, tokens):
        # The scores and their softmax ([H, T, T] or [H, T/L, L, K] blocks), the mask, the gathered keys/values;
        # the differential difference of softmaxes is another half of the scores.
        scores = cls._score_elements(spec, tokens) * (3 if spec.differential else 2) // 2
        return scores + cls._mask_elements(spec, tokens) + cls._gathered_elements(d_model, spec, tokens) + 4 * tokens * d_model

    @classmethod
    def traffic_elements(cls, d_model, spec, tokens):
        scores = cls._score_elements(spec, tokens) * (3 if spec.differential else 2) // 2
        return scores + cls._gathered_elements(d_model, spec, tokens) + 4 * tokens * d_model  # the mask is shared

    @classmethod
    def shared_elements(cls, d_model, spec, tokens):
        # The mask depends on the length, the window and the ALiBi slopes (set by the head count) only: layers
        # with the same window and slopes use one mask in the exported graph.
        slopes = spec.heads if spec.positional == "alibi" else 0
        return {("attention_mask", slopes, spec.window): cls._mask_elements(spec, tokens)}

    @classmethod
    def horizons(cls, spec):
        return (spec.window,) if spec.window else ()

    @classmethod
    def constraint_errors(cls, d_model, spec, context):
        errors = []
        if d_model % spec.heads:
            errors.append(f"heads: {spec.heads} does not divide d_model {d_model}")
        elif spec.positional == "rope" and (d_model // spec.heads) % 2:
            errors.append(f"heads: rope needs an even head dim, got {d_model} / {spec.heads} = {d_model // spec.heads}")
        if spec.differential and spec.heads % 2:
            errors.append(f"heads: differential attention pairs heads, needs an even count, got {spec.heads}")
        if spec.heads % spec.kv_repeat:
            errors.append(f"kv_repeat: {spec.kv_repeat} does not divide heads {spec.heads}")
        elif spec.differential and spec.heads > spec.kv_repeat and (spec.heads // spec.kv_repeat) % 2:
            errors.append(f"kv_repeat: differential attention needs 1 or an even number of KV heads, got "
                          f"{spec.heads} / {spec.kv_repeat}")
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            errors.append(f"channel_mixing: grouped needs d_model divisible by {GROUPS}, got {d_model}")
        return errors

    @classmethod
    def repair(cls, d_model, spec, context):
        def heads_ok(h, positional, differential):
            return (positional != "rope" or (d_model // h) % 2 == 0) and (not differential or h % 2 == 0)

        changes: dict = {}
        positional, differential = spec.positional, spec.differential
        heads = None
        for positional, differential in ((spec.positional, differential), ("alibi", differential),
                                         (spec.positional, False), ("alibi", False)):
            heads = heads_dividing(d_model, spec.heads, cls.gene_domain("heads"), lambda h: heads_ok(h, positional, differential))
            if heads is not None:  # an odd width leaves rope no even head dim, differential no even head count
                break
        changes["heads"], changes["positional"], changes["differential"] = heads, positional, differential

        def repeat_ok(r):
            kv = heads // r if heads % r == 0 else 0
            return kv > 0 and (not differential or kv == 1 or kv % 2 == 0)

        changes["kv_repeat"] = nearest(cls.gene_domain("kv_repeat"), spec.kv_repeat, repeat_ok)
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            changes["channel_mixing"] = "dense"
        return spec.with_(**changes)
