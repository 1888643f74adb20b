"""The gated convolution family: LFM2's short convolution and Hyena's implicit long convolution, one structure.

Both are y = W_out( act(C) * (conv_h(act(B) * v) + D * act(B) * v) ): two input-dependent gates B and C (the
featurizer), a value v, and a causal depthwise filter h between them; they differ in the filter (`filter` gene):

- `short` (LFM2's gated short convolution, Lfm2ShortConv in transformers' modeling_lfm2.py): an explicit filter
  of `kernel` taps (2..8), no skip (D = 0), projections without bias; [B; C] = gate_proj x, v = value_proj x.
  T_ij = C_i K_{i-j} B_j for 0 <= i - j < k: a scaled Toeplitz token mixer. With act = identity (the default) this
  is LFM2's block exactly (conv_bias False; LFM2's fused in_proj is split into gate_proj [B; C] and value_proj so
  that the featurizer is exactly the gates' weights); sigmoid or swish on the gates are this project's variants.
- `implicit` (Hyena, Poli et al. 2023, arXiv 2302.10866, order 2): a generated filter of `length` taps, the
  genome's context (repair sets it: an operator is built from d_model and its spec alone, so the spec carries the
  filter length, safari's l_max), a learned skip D, projections with bias followed by Hyena's short filters:

      x0, x1 = shortconv_3(W_g x + b_g)                # the gates (C = x0, B = x1): featurizer (gate_proj, gate_conv)
      v      = shortconv_3(W_v x + b_v)
      y      = W_out( act(x0) * (conv_L(u, h) + D * u) ),  u = act(x1) * v   # act = identity in the paper

  W_out is the genome's channel mixing, without safari's out_proj bias (the one difference from safari's
  HyenaOperator with order 2, one head, one block; tests/test_reference_conv.py checks against a port of it).
  shortconv_3 is a causal depthwise Conv1d of kernel 3 with bias over the projections (safari `short_filter`, one
  Conv1d over all three; here split into the gates' and the value's so the featurizer is exactly the gates'
  weights). The implicit filter, as safari's HyenaFilter defines it:

      z(t)  = [t/(L-1), Re exp(-i f_b w_t), Im exp(-i f_b w_t)],  w_t = 2 pi t / L, f_b = linspace(1e-4, nb-1, nb)
      h(t)  = FFN(z(t)) * exp(-|delta_c| t/(L-1))      # FFN: Linear -> Sin -> (Linear -> Sin) x 2 -> Linear (no bias)
      Sin(x) = sin(freq * x), one learnable freq [K] shared by the three Sin (safari reuses one module; init w = 1,
      HyenaFilter's default); delta_c = linspace(ln(1e-2)/1.5, ln(1e-2)/0.3, d)

  The decay is safari's ExponentialModulation (fast_decay_pct 0.3, slow_decay_pct 1.5, target 1e-2), with no
  normalisation, as safari's default. Sizes: nb = 4 bands (E = 9 positional features, safari's emb_dim) and an FFN
  of width K = 32 (safari's filter_order; its configs use emb_dim 3 or 33 and width 64: the sizes are this
  project's choice, the structure is safari's).

  Parallel form (`blocked_causal_conv`): a blocked causal convolution, loop-free with a dynamic length. The prompt
  is cut into n = ceil(T/C) chunks of C = 64 tokens; chunk i of the output is sum_{m<=i} Toeplitz_m X_{i-m}, one
  batched MatMul of the gathered chunks [B, d, n, n*C] by the gathered filter blocks [d, n*C, C] (the pairs m > i
  multiply zero chunks: 2 d T^2 FLOPs at T = n C, twice the causal half's). FFT through ONNX DFT
  (`fft_causal_conv`, safari's fftconv) computes the same; bench/bench_hyena.py measures both exported forms in
  onnxruntime (results in bench/results/hyena_conv.md). The blocked form is used (PARALLEL_FORM): in that
  benchmark it is faster than or level with FFT at the contexts targets use, its work is MatMuls that
  FlopCounterMode counts, and export/onnx_export.py refuses DFT graphs (no CUDA kernel; float16 targets).

  The filter depends on the parameters only: an exported graph computes it from initializers, so constant folding
  leaves no filter-FFN nodes in it. In PyTorch, prefill generates it in every call (training needs its gradients)
  and a decode step reuses the one generated last while the parameters are unchanged (`decode_filter`: no
  gradients, not tracing; the key is each parameter's storage and version counter), as the exported decode does.

Decode state: the inputs the filter still reaches, zeros before position 0 (exactly the parallel form's left
padding, so a state of zeros is the empty state and no position mask is needed). `short`: "conv" [B, k-1, d], the
last k-1 gated inputs act(B) v. `implicit`: "value" [B, L-1, d], the last L-1 gated inputs u, and "short"
[B, 2, 3d], the last two pre-conv projections of the short filters. A step is the dot product of the window with
the filter, a MatMul; `extend` runs a chunk of T >= 1 tokens as one depthwise convolution over the state and the
chunk (no token loop).

Costs (matmul FLOPs per token, what FlopCounterMode counts of the PyTorch forms), shared by both filters: the
projections 2 d (3d), the depthwise filters 2 c k over c channels of k taps (`short`: d channels of `kernel` taps;
`implicit`: the short filters, 3d channels of 3 taps), the output mixing. The implicit filter's prefill adds the
blocked convolution 2 d n^2 C^2 / context and the filter FFN's 2 L (E K + 2 K^2 + K d) / context; its decode adds
2 d L (a step after a prefill, whose filter it reuses).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, Gene, LIVOperator, OpSpec, State
from factory.ops.common import (
    channel_mix,
    channel_mix_flops,
    channel_mix_params,
    causal_depthwise_conv,
    conv_state_from_prefill,
    depthwise_conv_traffic,
    make_activation,
)
from factory.ops.registry import register

CONTEXTS = (64, 128, 256, 512, 1024, 2048, 4096)  # the implicit filter's lengths: the genome's contexts


def window_dot(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j window[:, j, c] * weight[c, j] as a batched MatMul ([B, C, 1, k] @ [C, k, 1]) -> [B, 1, C].

    One token of a causal depthwise convolution over its last k inputs (oldest first)."""
    y = window.transpose(1, 2).unsqueeze(-2) @ weight.unsqueeze(-1)  # [B, C, 1, 1]
    return y.squeeze(-1).transpose(1, 2)


def conv_step(x_t: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of `causal_depthwise_conv`: x_t [B, 1, C], conv_state [B, k-1, C] -> (y_t [B, 1, C], new state).
    The state always rolls (no branch on position)."""
    window = torch.cat([conv_state, x_t], dim=1)  # [B, k, C]
    return window_dot(window, weight), window[:, 1:]


def conv_extend(x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """T >= 1 tokens of `causal_depthwise_conv` after the inputs in `tail`: x [B, T, C], tail [B, k-1, C] (oldest
    first, zeros before position 0) -> (y [B, T, C], the new tail). One unpadded depthwise Conv1d over tail + x."""
    window = torch.cat([tail, x], dim=1)  # [B, k-1+T, C]
    y = F.conv1d(window.transpose(1, 2), weight.unsqueeze(1), bias, groups=weight.shape[0]).transpose(1, 2)
    return y, window[:, window.shape[1] - tail.shape[1]:]


def depthwise_params(channels: int, taps: int, bias: bool) -> int:
    return channels * (taps + (1 if bias else 0))


def depthwise_flops(channels: int, taps: int) -> float:
    return 2.0 * channels * taps


FILTER_EMB = 9  # positional features: t, then cos and sin of FILTER_BANDS frequencies (safari's emb_dim, odd)
FILTER_BANDS = (FILTER_EMB - 1) // 2
FILTER_ORDER = 32  # width of the filter FFN (safari's filter_order)
FILTER_INNER = 2  # inner Linear -> Sin blocks (safari's num_inner_mlps)
DECAY_TARGET, DECAY_FAST, DECAY_SLOW = 1e-2, 0.3, 1.5  # safari's ExponentialModulation defaults
SHORT_KERNEL = 3  # Hyena's short filters on the projections
CHUNK = 64  # tokens per block of the blocked causal convolution
PARALLEL_FORM = "blocked"  # or "fft": see the module docstring (implicit filter)


class Sin(nn.Module):
    """safari's Sin activation: sin(freq * x) with a learnable frequency per feature."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


class ShortFilter(nn.Module):
    """Causal depthwise Conv1d of kernel k with bias (Hyena's short filter). weight[:, -1] meets the current token."""

    def __init__(self, channels: int, k: int = SHORT_KERNEL):
        super().__init__()
        bound = 1.0 / math.sqrt(k)  # nn.Conv1d's default init for a depthwise filter
        self.weight = nn.Parameter(torch.empty(channels, k).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x):  # [B, T, C]
        k = self.weight.shape[1]
        y = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), self.weight.unsqueeze(1), self.bias, groups=x.shape[-1])
        return y.transpose(1, 2)

    def step(self, window):  # window: [B, k, C], the last k inputs -> [B, 1, C]
        return window_dot(window, self.weight) + self.bias


def positional_features(length: int) -> torch.Tensor:
    """safari's PositionalEmbedding z [L, FILTER_EMB] and the normalised time t [L, 1], lag 0 first."""
    t = torch.linspace(0, 1, length).unsqueeze(1)
    w = 2 * math.pi * torch.arange(length, dtype=torch.float32).unsqueeze(1) / length
    f = torch.linspace(1e-4, FILTER_BANDS - 1, FILTER_BANDS).unsqueeze(0)
    return torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=1), t


def decay_rates(channels: int) -> torch.Tensor:
    """|delta_c| of safari's ExponentialModulation, slow to fast across channels."""
    return torch.linspace(math.log(DECAY_TARGET) / DECAY_SLOW, math.log(DECAY_TARGET) / DECAY_FAST, channels).abs()


def blocked_causal_conv(u: torch.Tensor, h: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """y[:, t] = sum_{s=0..min(t, L-1)} h[:, s] * u[:, t-s]; u [B, T, d], h [d, L] (lag 0 first). Loop-free.

    Chunks of `chunk` tokens: Y_i = sum_{m=0..i} G_m X_{i-m} with G_m[a, b] = h[m*chunk + a - b] (zero outside
    0..L-1). Both gathers use index tensors built from the (symbolic) chunk count, so T may exceed L."""
    b, t, d = u.shape
    length = h.shape[1]
    n = (t + chunk - 1) // chunk
    hp = F.pad(h, (chunk, chunk))  # hp[j] = h[j - chunk]; zero before lag 0 and from lag L on
    a = torch.arange(chunk, device=u.device)
    lag_in_block = a.unsqueeze(0) - a.unsqueeze(1) + chunk  # [b (input), a (output)]: a - b + chunk
    m = torch.arange(n, device=u.device)
    idx = (m[:, None, None] * chunk + lag_in_block).clamp(max=length + 2 * chunk - 1)  # [n, C(b), C(a)]
    blocks = hp[:, idx.flatten()].reshape(d, n * chunk, chunk)  # [d, (m, b), a]
    xc = F.pad(u.transpose(1, 2), (0, n * chunk - t)).reshape(b, d, n, chunk)  # [B, d, n, C]
    src = (m.unsqueeze(1) - m.unsqueeze(0) + 1).clamp(min=0)  # [i, m] -> chunk i-m, shifted; 0 = a zero chunk
    xs = F.pad(xc, (0, 0, 1, 0))[:, :, src]  # [B, d, n(i), n(m), C]
    y = xs.reshape(b, d, n, n * chunk) @ blocks  # [B, d, n, C]
    # Drop the padding with a gather, not a slice: [..., :t] has length min(t, n*chunk), which export cannot prove
    # equal to t (as in linear_attention's chunked_decay_attention).
    return y.reshape(b, d, n * chunk).transpose(1, 2).index_select(1, torch.arange(t, device=u.device))


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The same through FFT (safari's fftconv without the skip): irfft(rfft(u) * rfft(h))[:T], length 2T."""
    t = u.shape[1]
    hf = torch.fft.rfft(F.pad(h, (0, t))[:, :t], n=2 * t)  # pad first: no min(T, L) in the traced shapes
    uf = torch.fft.rfft(u.transpose(1, 2), n=2 * t)
    return torch.fft.irfft(uf * hf, n=2 * t)[..., :t].transpose(1, 2)


def blocked_conv_flops(d_model: int, tokens: int, chunk: int = CHUNK) -> float:
    """MatMul FLOPs of `blocked_causal_conv` over `tokens` positions (all of them, not per token)."""
    n = -(-tokens // chunk)
    return 2.0 * d_model * n * n * chunk * chunk


# -- the family ----------------------------------------------------------------------------------------------------
@register
class Conv(LIVOperator):
    """The family: its genes, its shared gated structure and cost formulas. Building it builds the filter's
    kind (`ShortConv` or `ImplicitConv`), each holding exactly its own weights under the names checkpoints use."""

    family = "conv"
    code = 4
    genes = (
        Gene("filter", ("short", "implicit"), "short"),  # explicit k-tap filter (LFM2) | generated (Hyena)
        Gene("kernel", (2, 3, 4, 5, 6, 7, 8), 3),  # short: the filter's taps
        Gene("length", CONTEXTS, 256),  # implicit: the filter's taps, the genome's context (repair sets it)
        Gene("nonlinearity", ("identity", "sigmoid", "swish"), "identity"),  # on the gates; identity = the papers'
        Gene("channel_mixing", ("dense", "grouped", "diagonal"), "dense"),
    )
    featurizer = ("gate_proj",)
    aliases = {"short_conv": {"filter": "short"}, "long_conv": {"filter": "implicit"}}  # their old family names
    forms = ("short_conv", "long_conv")  # a k-tap filter and a context-long one cost nothing alike
    _KIND_GENES = {"short": "kernel", "implicit": "length"}

    def __new__(cls, d_model: int | None = None, spec: OpSpec | None = None, *args, **kwargs):
        if cls is Conv:  # (copies and unpickling call the kind's __new__ with no arguments)
            cls = ImplicitConv if spec.filter == "implicit" else ShortConv
        return super().__new__(cls)

    def _gated(self, b: torch.Tensor, c: torch.Tensor, v: torch.Tensor, conv) -> tuple[torch.Tensor, torch.Tensor]:
        """W_out(act(C) * conv(u)), u = act(B) * v: the structure both filters share. Returns (y, u)."""
        u = self.act(b) * v
        return self.out(self.act(c) * conv(u)), u

    # -- genes and rules -----------------------------------------------------------------------------------------
    @classmethod
    def relevant(cls, spec):
        other = [g for kind, g in cls._KIND_GENES.items() if kind != spec.filter]
        return tuple(g.name for g in cls.genes if g.name not in other)

    @classmethod
    def taps(cls, spec) -> int:
        return spec.length if spec.filter == "implicit" else spec.kernel

    @classmethod
    def form(cls, spec):
        return "long_conv" if spec.filter == "implicit" else "short_conv"

    @classmethod
    def horizons(cls, spec):
        return (cls.taps(spec),)

    @classmethod
    def constraint_errors(cls, d_model, spec, context):
        if spec.filter == "implicit" and spec.length != context:
            return [f"length: Hyena's filter spans the context ({context} taps), got {spec.length}"]
        return []

    @classmethod
    def repair(cls, d_model, spec, context):
        if spec.filter == "implicit" and context in CONTEXTS:
            spec = spec.with_(length=context)
        return spec

    # -- shapes and costs: the shared terms, then each filter's own ----------------------------------------------
    @classmethod
    def empty_state_shapes(cls, d_model, spec, batch, reuse_features=False):
        """Every state is a fixed-size tail (zeros before position 0): the same shapes at any context."""
        if spec.filter == "implicit":
            return {"value": (batch, spec.length - 1, d_model), "short": (batch, SHORT_KERNEL - 1, 3 * d_model)}
        return {"conv": (batch, spec.kernel - 1, d_model)}

    @classmethod
    def state_shapes(cls, d_model, spec, batch, context, reuse_features=False):
        return cls.empty_state_shapes(d_model, spec, batch, reuse_features)

    @classmethod
    def _filters(cls, d_model, spec) -> tuple[int, int, bool]:
        """(channels, taps, bias) of the depthwise filters that run per token (the implicit filter's long
        convolution aside): the explicit filter over the value, or Hyena's short filters over the projections."""
        return (3 * d_model, SHORT_KERNEL, True) if spec.filter == "implicit" else (d_model, spec.kernel, False)

    @classmethod
    def featurizer_params(cls, d_model, spec, reuse_features=False):
        bias = spec.filter == "implicit"
        gates = 2 * d_model * (d_model + (1 if bias else 0))
        return gates + (depthwise_params(2 * d_model, SHORT_KERNEL, True) if bias else 0)

    @classmethod
    def param_count(cls, d_model, spec, reuse_features=False):
        bias = spec.filter == "implicit"
        channels, taps, _ = cls._filters(d_model, spec)
        n = 3 * d_model * d_model + (3 * d_model if bias else 0) + depthwise_params(channels, taps, bias)
        if bias:
            n += filter_params(d_model) + d_model  # the implicit filter's FFN and the skip D
        return n + channel_mix_params(spec.channel_mixing, d_model, d_model)

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        channels, taps, _ = cls._filters(d_model, spec)
        per_token = (2.0 * d_model * 3 * d_model + depthwise_flops(channels, taps)
                     + channel_mix_flops(spec.channel_mixing, d_model, d_model))
        if spec.filter != "implicit":
            return Flops(per_token, per_token)
        ffn = 2.0 * spec.length * filter_macs(d_model)  # once per prompt
        prefill = per_token + (blocked_conv_flops(d_model, context) + ffn) / context
        return Flops(prefill, per_token + depthwise_flops(d_model, spec.length))

    @classmethod
    def activation_elements(cls, d_model, spec, tokens):
        if spec.filter != "implicit":
            return super().activation_elements(d_model, spec, tokens)
        n = -(-max(1, tokens) // CHUNK)
        # projections and short-filter outputs, the gathered chunks and filter blocks
        return 8 * tokens * d_model + d_model * n * CHUNK * (n + CHUNK)

    @classmethod
    def traffic_elements(cls, d_model, spec, tokens):
        # the live intermediates and onnxruntime's im2col of the per-token depthwise Conv (`depthwise_conv_traffic`)
        channels, taps, _ = cls._filters(d_model, spec)
        return cls.activation_elements(d_model, spec, tokens) + depthwise_conv_traffic(tokens, taps, channels)


class ShortConv(Conv):
    """`filter = short`: LFM2's gated short convolution."""

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.k = spec.kernel
        self.gate_proj = nn.Linear(d_model, 2 * d_model, bias=False)  # B, C
        self.value_proj = nn.Linear(d_model, d_model, bias=False)
        self.filter = nn.Parameter(torch.randn(d_model, self.k) / math.sqrt(self.k))
        self.act = make_activation(spec.nonlinearity, d_model)
        self.out = channel_mix(spec.channel_mixing, d_model, d_model)

    def _featurize(self, x):
        b, c = self.gate_proj(x).chunk(2, dim=-1)
        return b, c, self.value_proj(x)

    def forward(self, x, publish=None, reuse=None):
        return self._gated(*self._featurize(x), lambda u: causal_depthwise_conv(u, self.filter))[0]

    def prefill(self, x, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        y, u = self._gated(*self._featurize(x), lambda u: causal_depthwise_conv(u, self.filter))
        return y, {"conv": conv_state_from_prefill(u, self.k)}

    def step(self, x, position, state, publish=None, reuse=None):
        new = {}

        def conv(u):
            y, new["conv"] = conv_step(u, state["conv"], self.filter)
            return y

        return self._gated(*self._featurize(x), conv)[0], new

    def extend(self, x, positions, state, publish=None, reuse=None):
        """T >= 1 tokens after `state` (zeros before position 0 are the convolution's own padding)."""
        new = {}

        def conv(u):
            y, new["conv"] = conv_extend(u, state["conv"], self.filter)
            return y

        return self._gated(*self._featurize(x), conv)[0], new


class ImplicitConv(Conv):
    """`filter = implicit`: Hyena order 2 with its implicit long filter."""

    featurizer = ("gate_proj", "gate_conv")

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.length = spec.length
        self.gate_proj = nn.Linear(d_model, 2 * d_model)  # x0, x1
        self.gate_conv = ShortFilter(2 * d_model)
        self.value_proj = nn.Linear(d_model, d_model)
        self.value_conv = ShortFilter(d_model)
        sin = Sin(FILTER_ORDER)  # one module (one frequency vector) for every Sin of the FFN, as in safari
        layers: list[nn.Module] = [nn.Linear(FILTER_EMB, FILTER_ORDER), sin]
        for _ in range(FILTER_INNER):
            layers += [nn.Linear(FILTER_ORDER, FILTER_ORDER), sin]
        layers.append(nn.Linear(FILTER_ORDER, d_model, bias=False))
        self.filter_ffn = nn.Sequential(*layers)
        self.D = nn.Parameter(torch.randn(d_model))  # safari's HyenaFilter.bias
        z, t = positional_features(self.length)
        # Fixed inputs of the filter: buffers, so they follow .to() but are not parameters.
        self.register_buffer("z", z, persistent=False)
        self.register_buffer("decay", torch.exp(-t * decay_rates(d_model)), persistent=False)  # [L, d]
        self.act = make_activation(spec.nonlinearity, d_model)
        self.out = channel_mix(spec.channel_mixing, d_model, d_model)
        self._filter_cache: tuple | None = None  # (parameter versions, filter): see decode_filter

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, length={self.length}, nonlinearity={self.spec.nonlinearity}"

    def filter(self) -> torch.Tensor:
        """The implicit filter h [d, L], lag 0 first, generated from the parameters."""
        h = (self.filter_ffn(self.z) * self.decay).transpose(0, 1)
        if self._cacheable():
            self._filter_cache = (self._filter_key(), h)
        return h

    def decode_filter(self) -> torch.Tensor:
        """The filter for a decode step: the one the last call generated while the parameters are unchanged, as an
        exported decode graph holds it folded into a constant; generated again otherwise (and always with
        gradients on or while tracing, so a traced graph computes it from the parameters)."""
        cache = self._filter_cache
        if self._cacheable() and cache is not None and cache[0] == self._filter_key():
            return cache[1]
        return self.filter()

    @staticmethod
    def _cacheable() -> bool:
        return not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _filter_key(self) -> tuple:
        tensors = [*self.filter_ffn.parameters(), self.z, self.decay]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    def _project(self, x):
        return torch.cat([self.gate_proj(x), self.value_proj(x)], dim=-1)  # [.., 3d]: x0, x1, v before the filters

    def _mix(self, uc, conv):
        """Split the short-filtered projections into (C = x0, B = x1, v) and apply the gated structure with the
        skip D."""
        d = self.d_model
        x0, x1, v = uc[..., :d], uc[..., d : 2 * d], uc[..., 2 * d :]
        return self._gated(x1, x0, v, lambda u: conv(u) + u * self.D)

    def prefill(self, x, publish=None, reuse=None) -> tuple[torch.Tensor, State]:
        d = self.d_model
        pre = self._project(x)
        uc = torch.cat([self.gate_conv(pre[..., : 2 * d]), self.value_conv(pre[..., 2 * d :])], dim=-1)
        h = self.filter()
        long_conv = fft_causal_conv if PARALLEL_FORM == "fft" else blocked_causal_conv
        y, u = self._mix(uc, lambda u: long_conv(u, h))
        return y, {"value": conv_state_from_prefill(u, self.length), "short": conv_state_from_prefill(pre, SHORT_KERNEL)}

    def step(self, x, position, state, publish=None, reuse=None):
        d = self.d_model
        pre = self._project(x)
        window = torch.cat([state["short"], pre], dim=1)  # [B, 3, 3d]
        uc = torch.cat([self.gate_conv.step(window[..., : 2 * d]), self.value_conv.step(window[..., 2 * d :])], dim=-1)
        h = self.decode_filter().flip(-1)  # oldest lag first, as the window
        values = {}

        def conv(u):
            values["window"] = torch.cat([state["value"], u], dim=1)  # [B, L, d]
            return window_dot(values["window"], h)

        y, _ = self._mix(uc, conv)
        return y, {"value": values["window"][:, 1:], "short": window[:, 1:]}

    def extend(self, x, positions, state, publish=None, reuse=None):
        """T >= 1 tokens after `state`: the short filters and the long filter each one depthwise convolution over
        their tail and the chunk (zeros before position 0 are the convolutions' own padding)."""
        d = self.d_model
        pre = self._project(x)
        weight = torch.cat([self.gate_conv.weight, self.value_conv.weight])
        bias = torch.cat([self.gate_conv.bias, self.value_conv.bias])
        uc, short = conv_extend(pre, state["short"], weight, bias)
        h = self.decode_filter().flip(-1)  # oldest lag first
        new = {"short": short}

        def conv(u):
            y, new["value"] = conv_extend(u, state["value"], h)
            return y

        return self._mix(uc, conv)[0], new


def filter_macs(d_model: int) -> int:
    """Multiply-adds of the implicit filter's FFN per filter position."""
    return FILTER_EMB * FILTER_ORDER + FILTER_INNER * FILTER_ORDER**2 + FILTER_ORDER * d_model


def filter_params(d_model: int) -> int:
    sin = FILTER_ORDER  # one frequency per feature, shared by the FFN's Sin activations
    return (FILTER_EMB + 1) * FILTER_ORDER + FILTER_INNER * (FILTER_ORDER + 1) * FILTER_ORDER + (
        FILTER_ORDER * d_model
    ) + sin
