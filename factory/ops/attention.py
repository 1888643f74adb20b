"""Softmax attention: MHA / GQA / MQA, RoPE / ALiBi / no positions, full causal or sliding window.

T_ij = softmax_j(C_i B_j / sqrt(dh) + bias_ij) for allowed (i, j): a dense token mixer.

    q = W_q x                    # H query heads of width dh = d / H
    k, v = W_kv x                # H_kv = H / kv_repeat key/value heads; query head h reads KV head h // kv_repeat
    RoPE rotates q and k by their absolute positions; ALiBi adds bias_ij = -slope_h * (i - j), slopes 2^(-8h/H)
    allowed(i, j) = j <= i, and with window W > 0 also i - W < j (W tokens, the current one included)
    y = W_out( concat_h softmax(q_h k^T / sqrt(dh) + bias + mask) v )

Decode state (keys stored after RoPE, so a step never re-rotates the cache):
    full attention:   {"key", "value"}: [B, H_kv, T, dh], growing by one along axis 2 each step;
    window W:         {"key", "value"}: [B, H_kv, W, dh], a fixed-size rolling cache of the last W tokens,
                      left-padded with zeros while fewer than W tokens have been seen. The step always rolls
                      (cat + slice) and masks the padding from the position tensor, so the decode graph is static.
A window >= context is kept (not repaired to 0): it computes the same thing as full attention within the
context, but its cache stays a fixed [B, H_kv, W, dh] tensor, bounded for generation past the context.

Feature sharing (`feature_kinds = ("key", "value")`): a producer publishes its post-RoPE keys/values in the
state layout ([B, H_kv, T, dh] from prefill, the updated cache from step); a consumer (`reuse_features=True`,
same spec) has only W_q and W_out, keeps no state, and attends over the producer's keys/values.

Costs, with n(i) = keys token i attends to (i + 1, capped at W): parameters d^2 (q) + 2 d H_kv dh (kv, none for a
consumer) + the output channel mixing; FLOPs per token: the projections + 4 d n(i) for QK^T and AV.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, LIVOperator, OpSpec, State
from factory.ops.common import GROUPS, Rotary, alibi_slopes, channel_mix, channel_mix_flops, channel_mix_params
from factory.ops.registry import register


def _closest(allowed, value, ok) -> int | None:
    """The accepted value nearest to `value` (ties to the smaller) that satisfies `ok`, or None."""
    valid = [a for a in allowed if ok(a)]
    return min(valid, key=lambda a: (abs(a - value), a)) if valid else None


@register
class Attention(LIVOperator):
    family = "attention"
    choices = {
        "heads": (1, 2, 4, 8),
        "kv_repeat": (1, 2, 4, 8),
        "positional": ("rope", "alibi", "none"),
        "window": (0, 16, 32, 64, 128, 256),
        "channel_mixing": ("dense", "grouped", "diagonal"),
    }
    defaults = {"heads": 4, "kv_repeat": 1, "positional": "rope", "window": 0, "channel_mixing": "dense"}
    feature_kinds = ("key", "value")

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.heads = spec.heads
        self.rep = spec.kv_repeat
        self.kv_heads = spec.heads // spec.kv_repeat
        self.head_dim = d_model // spec.heads
        self.window = spec.window
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        # A consumer reads a producer's keys/values, so it has no projection for them.
        self.kv_proj = None if reuse_features else nn.Linear(d_model, 2 * self.kv_heads * self.head_dim, bias=False)
        self.out = channel_mix(spec.channel_mixing, d_model, d_model)
        self.rotary = Rotary(self.head_dim) if spec.positional == "rope" else None
        if spec.positional == "alibi":
            self.register_buffer("slopes", alibi_slopes(spec.heads), persistent=False)
        else:
            self.slopes = None

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"d_model={self.d_model}, heads={s.heads}, kv_heads={self.kv_heads}, positional={s.positional}, "
            f"window={s.window}, reuse_features={self.reuse_features}"
        )

    # -- helpers -----------------------------------------------------------------------------------------------
    def _split_heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, self.head_dim).transpose(1, 2)  # [B, heads, T, dh]

    def _keys_values(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        k, v = self._split_heads(k, self.kv_heads), self._split_heads(v, self.kv_heads)
        if self.rotary is not None:
            k = self.rotary(k, positions)
        return k, v

    def _parallel_mask(self, t: int, device, dtype) -> torch.Tensor | None:
        """Additive float mask [1, H, T, T] or [T, T] for window / ALiBi; None means plain causal (is_causal).

        A 3-D mask would send SDPA to its slow math kernel on CPU; 2-D and 4-D masks take the fused one.
        """
        if self.window == 0 and self.slopes is None:
            return None
        idx = torch.arange(t, device=device)
        dist = idx.unsqueeze(1) - idx.unsqueeze(0)  # i - j
        allowed = dist >= 0
        if self.window > 0:
            allowed = allowed & (dist < self.window)
        bias = torch.zeros((), device=device, dtype=dtype)
        if self.slopes is not None:
            bias = -self.slopes.to(dtype).view(1, -1, 1, 1) * dist.to(dtype)  # [1, H, T, T]
        return torch.where(allowed, bias, torch.tensor(float("-inf"), device=device, dtype=dtype))

    # -- parallel form -----------------------------------------------------------------------------------------
    def prefill(self, x, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        b, t, _ = x.shape
        positions = torch.arange(t, device=x.device)
        q = self._split_heads(self.q_proj(x), self.heads)
        if self.rotary is not None:
            q = self.rotary(q, positions)
        if self.reuse_features:
            k, v = reuse["key"], reuse["value"]
        else:
            k, v = self._keys_values(x, positions)
            if publish is not None:
                publish["key"], publish["value"] = k, v
        # GQA: repeat each KV head for its query heads (head h reads KV head h // rep).
        kq, vq = k, v
        if self.rep > 1:
            kq = k.unsqueeze(2).expand(b, self.kv_heads, self.rep, t, self.head_dim).reshape(b, self.heads, t, -1)
            vq = v.unsqueeze(2).expand(b, self.kv_heads, self.rep, t, self.head_dim).reshape(b, self.heads, t, -1)
        mask = self._parallel_mask(t, x.device, q.dtype)
        if mask is None:
            o = F.scaled_dot_product_attention(q, kq, vq, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, kq, vq, attn_mask=mask)
        y = self.out(o.transpose(1, 2).reshape(b, t, self.d_model))
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
        q = self._split_heads(self.q_proj(x), self.heads)  # [B, H, 1, dh]
        if self.rotary is not None:
            q = self.rotary(q, position)
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
        # The query heads of one KV head become query rows, so the cache is never repeated.
        qg = q.reshape(b, self.kv_heads, self.rep, self.head_dim)
        scores = torch.matmul(qg, k.transpose(-1, -2)) * self.scale  # [B, H_kv, rep, n]
        if self.slopes is not None:
            scores = scores - self.slopes.to(scores.dtype).view(self.kv_heads, self.rep, 1) * dist.to(scores.dtype)
        if self.window > 0:
            # Slots before position 0 (left padding of a short prompt) are invalid: tensor ops, no branching.
            valid = dist.unsqueeze(0) <= position  # [B, n]
            scores = scores.masked_fill(~valid.view(b, 1, 1, n), float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H_kv, rep, dh]
        y = self.out(o.reshape(b, 1, self.d_model))
        return y, new_state

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
        kv = 0 if reuse_features else 2 * d_model * (spec.heads // spec.kv_repeat) * (d_model // spec.heads)
        return d_model * d_model + kv + channel_mix_params(spec.channel_mixing, d_model, d_model)

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        kv_width = 2 * (spec.heads // spec.kv_repeat) * (d_model // spec.heads)
        proj = 2.0 * d_model * d_model + channel_mix_flops(spec.channel_mixing, d_model, d_model)
        if not reuse_features:
            proj += 2.0 * d_model * kv_width
        w = spec.window if 0 < spec.window < context else context
        # Token i of the prompt attends to min(i + 1, w) keys; average over the prompt.
        mean_keys = (w * (w + 1) / 2 + (context - w) * w) / context
        decode_keys = min(context + 1, spec.window) if spec.window > 0 else context + 1
        # QK^T and AV: 2 * dh FLOPs per key per head each, over H heads of width dh (H * dh = d).
        return Flops(proj + 4.0 * d_model * mean_keys, proj + 4.0 * d_model * decode_keys)

    @staticmethod
    def _mask_heads(spec) -> int:
        """Heads of the float mask the parallel form builds: one [T, T] for a window, [H, T, T] with ALiBi."""
        return spec.heads if spec.positional == "alibi" else (1 if spec.window > 0 else 0)

    @classmethod
    def activation_elements(cls, d_model, spec, tokens):
        # The parallel form materialises the scores [H, T, T], plus the float mask when window/ALiBi need one.
        return (spec.heads + cls._mask_heads(spec)) * tokens * tokens + 4 * tokens * d_model

    @classmethod
    def traffic_elements(cls, d_model, spec, tokens):
        return spec.heads * tokens * tokens + 4 * tokens * d_model  # the mask is shared_elements

    @classmethod
    def shared_elements(cls, d_model, spec, tokens):
        # The mask depends on the length, the window and the ALiBi slopes (set by the head count) only: layers
        # with the same window and slopes use one mask in the exported graph.
        heads = cls._mask_heads(spec)
        if not heads:
            return {}
        slopes = spec.heads if spec.positional == "alibi" else 0
        return {("attention_mask", slopes, spec.window): heads * tokens * tokens}

    @classmethod
    def constraint_errors(cls, d_model, spec, context):
        errors = []
        if d_model % spec.heads:
            errors.append(f"heads: {spec.heads} does not divide d_model {d_model}")
        elif spec.positional == "rope" and (d_model // spec.heads) % 2:
            errors.append(f"heads: rope needs an even head dim, got {d_model} / {spec.heads} = {d_model // spec.heads}")
        if spec.heads % spec.kv_repeat:
            errors.append(f"kv_repeat: {spec.kv_repeat} does not divide heads {spec.heads}")
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            errors.append(f"channel_mixing: grouped needs d_model divisible by {GROUPS}, got {d_model}")
        return errors

    @classmethod
    def repair(cls, d_model, spec, context):
        def heads_ok(h, positional):
            return d_model % h == 0 and (positional != "rope" or (d_model // h) % 2 == 0)

        changes: dict = {}
        positional = spec.positional
        heads = _closest(cls.choices["heads"], spec.heads, lambda h: heads_ok(h, positional))
        if heads is None:  # odd width: no head count gives rope an even head dim
            positional = "alibi"
            heads = _closest(cls.choices["heads"], spec.heads, lambda h: heads_ok(h, positional))
        changes["heads"], changes["positional"] = heads, positional
        changes["kv_repeat"] = _closest(cls.choices["kv_repeat"], spec.kv_repeat, lambda r: heads % r == 0)
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            changes["channel_mixing"] = "dense"
        return spec.with_(**changes)
