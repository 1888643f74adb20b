"""Perceiver-AR latent causal cross-attention (a global structure, not a registry family).

With N latents, the last N positions of the sequence are latents: one causal cross-attention lets each latent
(at absolute position p) read every input at positions <= p, then the remaining layers run on the N latents only.

Exact decoding: the inputs' keys/values are cached ("key", "value", growing like a KV cache) and so are the raw
input embeddings ("inputs", growing), because the latent window slides with every new token and the latent stack
is recomputed on the last N positions each step (cost O(N * T + L_lat * N^2) a token, the price of the design).

Heads, KV-head repeat, positional scheme and output channel mixing come from layer 0's attention class.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from factory.ops.base import Flops, OpSpec
from factory.ops.common import Rotary, alibi_slopes, channel_mix, channel_mix_flops, channel_mix_params


def _dims(d_model: int, spec: OpSpec) -> tuple[int, int, int]:
    heads = spec.heads
    kv_heads = heads // spec.kv_repeat
    return heads, kv_heads, d_model // heads


class LatentCrossAttention(nn.Module):
    def __init__(self, d_model: int, spec: OpSpec, latents: int):
        super().__init__()
        self.latents = latents
        self.heads, self.kv_heads, self.head_dim = _dims(d_model, spec)
        self.q = nn.Linear(d_model, self.heads * self.head_dim, bias=False)
        self.kv = nn.Linear(d_model, 2 * self.kv_heads * self.head_dim, bias=False)
        self.out = channel_mix(spec.channel_mixing, self.heads * self.head_dim, d_model)
        self.rotary = Rotary(self.head_dim) if spec.positional == "rope" else None
        slopes = alibi_slopes(self.heads) if spec.positional == "alibi" else torch.zeros(self.heads)
        self.register_buffer("slopes", slopes, persistent=False)

    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, self.head_dim).transpose(1, 2)

    def _keys_values(self, h: torch.Tensor, positions: torch.Tensor):
        k, v = self.kv(h).chunk(2, dim=-1)
        k, v = self._split(k, self.kv_heads), self._split(v, self.kv_heads)
        if self.rotary is not None:
            k = self.rotary(k, positions)
        return k, v

    def _attend(self, hq: torch.Tensor, q_pos: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """hq: [B, n, D] latent inputs at absolute positions q_pos ([n] or [B, n]); key/value: [B, Hkv, T, dh]."""
        q = self._split(self.q(hq), self.heads)
        if self.rotary is not None:
            q = self.rotary(q, q_pos)
        rep = self.heads // self.kv_heads
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
        scores = q @ key.transpose(-1, -2) / math.sqrt(self.head_dim)  # [B, H, n, T]
        k_pos = torch.arange(key.shape[2], device=hq.device)
        qp = q_pos if q_pos.dim() == 2 else q_pos.unsqueeze(0)  # [B|1, n]
        distance = (qp.unsqueeze(-1) - k_pos).unsqueeze(1).to(scores.dtype)  # [B|1, 1, n, T]
        scores = scores - self.slopes.view(1, -1, 1, 1) * distance
        scores = scores.masked_fill(distance < 0, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ value  # [B, H, n, dh]
        b, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    def prefill(self, h: torch.Tensor):
        """h: normed inputs [B, T, D] -> (latent outputs [B, min(T, N), D], {"key", "value"})."""
        t = h.shape[1]
        positions = torch.arange(t, device=h.device)
        key, value = self._keys_values(h, positions)
        q_pos = positions[-self.latents :]
        return self._attend(h[:, -self.latents :], q_pos, key, value), {"key": key, "value": value}

    def step(self, window: torch.Tensor, new: torch.Tensor, position: torch.Tensor, key, value):
        """window: normed latent inputs [B, n, D] ending with the new token; new: [B, 1, D]; position: [B, 1]."""
        k_new, v_new = self._keys_values(new, position)
        key, value = torch.cat([key, k_new], dim=2), torch.cat([value, v_new], dim=2)
        n = window.shape[1]
        q_pos = position - (n - 1) + torch.arange(n, device=window.device)  # [B, n]
        return self._attend(window, q_pos, key, value), {"key": key, "value": value}

    # -- costs -------------------------------------------------------------------------------------------------
    @staticmethod
    def param_count(d_model: int, spec: OpSpec) -> int:
        heads, kv_heads, dh = _dims(d_model, spec)
        return d_model * heads * dh + 2 * d_model * kv_heads * dh + channel_mix_params(
            spec.channel_mixing, heads * dh, d_model
        )

    @staticmethod
    def state_shapes(d_model: int, spec: OpSpec, batch: int, context: int) -> dict[str, tuple[int, ...]]:
        _, kv_heads, dh = _dims(d_model, spec)
        return {
            "key": (batch, kv_heads, context, dh),
            "value": (batch, kv_heads, context, dh),
            "inputs": (batch, context, d_model),
        }

    @staticmethod
    def flops(d_model: int, spec: OpSpec, context: int, latents: int) -> Flops:
        """Prefill: keys/values for every token, queries and scores for the latents. Decode: one token's K/V,
        then all n = min(context, N) latent queries against context keys (the latent window is recomputed)."""
        heads, kv_heads, dh = _dims(d_model, spec)
        n = min(context, latents)
        kv = 2.0 * d_model * 2 * kv_heads * dh
        q_and_out = 2.0 * d_model * heads * dh + channel_mix_flops(spec.channel_mixing, heads * dh, d_model)
        scores = 2.0 * 2 * heads * dh * context  # QK^T and AV for one query over `context` keys
        prefill = kv + n * (q_and_out + scores) / context
        decode = kv + n * (q_and_out + scores)
        return Flops(prefill, decode)
