"""Hyena (Poli et al. 2023, arXiv 2302.10866), order 2: gated long convolution with an implicit filter that spans
the context.

T = diag(x0) H diag(x1), H the causal Toeplitz matrix of a generated filter h of L = context taps:

    x0, x1 = shortconv_3(W_g x + b_g)                # the gates: featurizer (gate_proj, gate_conv)
    v      = shortconv_3(W_v x + b_v)                # the value
    u      = act(x1) * v                              # act = identity in the paper (the genome's nonlinearity)
    y      = W_out( act(x0) * (conv_L(u, h) + D * u) )   # D: the filter's bias/skip term (safari's `bias`)

W_out is the genome's channel mixing, without safari's out_proj bias (the one difference from safari's
HyenaOperator with order 2, one head, one block; tests/test_reference_conv.py checks against a port of it).

shortconv_3 is Hyena's short filter: a causal depthwise Conv1d of kernel 3 with bias over the projections (safari
`short_filter`, one Conv1d over all three; here split into the gates' and the value's so the featurizer is exactly
the gates' weights). The implicit filter, as safari's HyenaFilter defines it:

    z(t)  = [t/(L-1), Re exp(-i f_b w_t), Im exp(-i f_b w_t)],  w_t = 2 pi t / L, f_b = linspace(1e-4, nb-1, nb)
    h(t)  = FFN(z(t)) * exp(-|delta_c| t/(L-1))      # FFN: Linear -> Sin -> (Linear -> Sin) x 2 -> Linear (no bias)
    Sin(x) = sin(freq * x), one learnable freq [K] shared by the three Sin (safari reuses one module; init w = 1,
    HyenaFilter's default); delta_c = linspace(ln(1e-2)/1.5, ln(1e-2)/0.3, d)

The decay is safari's ExponentialModulation (fast_decay_pct 0.3, slow_decay_pct 1.5, target 1e-2), with no
normalisation, as safari's default. Sizes: nb = 4 bands (E = 9 positional features, safari's emb_dim) and an FFN of
width K = 32 (safari's filter_order; its configs use emb_dim 3 or 33 and width 64: the sizes are this project's
choice, the structure is safari's). L = `spec.window`, which the family's repair sets to the genome's context (an
operator is built from d_model and its spec alone, so the spec carries the filter length, safari's l_max).

Parallel form (`blocked_causal_conv`): a blocked causal convolution, loop-free with a dynamic length. The prompt
is cut into n = ceil(T/C) chunks of C = 64 tokens; chunk i of the output is sum_{m<=i} Toeplitz_m X_{i-m}, one
batched MatMul of the gathered chunks [B, d, n, n*C] by the gathered filter blocks [d, n*C, C] (the pairs m > i
multiply zero chunks: 2 d T^2 FLOPs at T = n C, twice the causal half's). FFT through ONNX
DFT (`fft_causal_conv`, safari's fftconv) computes the same; bench/bench_hyena.py measures both exported forms in
onnxruntime (results in bench/results/hyena_conv.md). The blocked form is used (PARALLEL_FORM): in that benchmark
it is faster than or level with FFT at the contexts targets use, its work is MatMuls that FlopCounterMode counts,
and export/onnx_export.py refuses DFT graphs (no CUDA kernel; float16 targets).

Decode state: "value" [B, L-1, d], the last L-1 gated inputs u (what the filter reaches), rolled every step, and
"short" [B, 2, 3d], the last two pre-conv projections of the short filters. A step is the dot product of the
filter with the window: a MatMul.

The filter depends on the parameters only: an exported graph computes it from initializers, so constant folding
leaves no filter-FFN nodes in it. In PyTorch, prefill generates it in every call (training needs its gradients)
and a decode step reuses the one generated last while the parameters are unchanged (`decode_filter`: no
gradients, not tracing; the key is each parameter's storage and version counter), as the exported decode does.

Costs (matmul FLOPs per token, what FlopCounterMode counts of the PyTorch forms): projections 2 d (3d), short
filters 2 (3d) 3, the output mixing; prefill adds the blocked convolution 2 d n^2 C^2 / context and the filter
FFN's 2 L (E K + 2 K^2 + K d) / context; decode adds 2 d L (a step after a prefill, whose filter it reuses).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.base import Flops, LIVOperator, OpSpec, State
from factory.ops.common import (
    GROUPS,
    channel_mix,
    channel_mix_flops,
    channel_mix_params,
    conv_state_from_prefill,
    depthwise_conv_traffic,
    make_activation,
)
from factory.ops.registry import register
from factory.ops.short_conv import window_dot

FILTER_EMB = 9  # positional features: t, then cos and sin of FILTER_BANDS frequencies (safari's emb_dim, odd)
FILTER_BANDS = (FILTER_EMB - 1) // 2
FILTER_ORDER = 32  # width of the filter FFN (safari's filter_order)
FILTER_INNER = 2  # inner Linear -> Sin blocks (safari's num_inner_mlps)
DECAY_TARGET, DECAY_FAST, DECAY_SLOW = 1e-2, 0.3, 1.5  # safari's ExponentialModulation defaults
SHORT_KERNEL = 3  # Hyena's short filters on the projections
CHUNK = 64  # tokens per block of the blocked causal convolution
CONTEXTS = (64, 128, 256, 512, 1024, 2048, 4096)
PARALLEL_FORM = "blocked"  # or "fft": see the module docstring


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


@register
class LongConv(LIVOperator):
    family = "long_conv"
    choices = {
        "window": CONTEXTS,  # the filter length L: the genome's context (repair sets it)
        "nonlinearity": ("identity", "sigmoid", "swish"),  # on the gates; identity = the paper's
        "channel_mixing": ("dense", "grouped", "diagonal"),
    }
    defaults = {"window": 256, "nonlinearity": "identity", "channel_mixing": "dense"}
    featurizer = ("gate_proj", "gate_conv")

    def __init__(self, d_model: int, spec: OpSpec, reuse_features: bool = False, layer: int = 0):
        super().__init__(d_model, spec, reuse_features, layer)
        self.length = spec.window
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
        d = self.d_model
        x0, x1, v = uc[..., :d], uc[..., d : 2 * d], uc[..., 2 * d :]
        u = self.act(x1) * v
        return self.out(self.act(x0) * (conv(u) + u * self.D)), u

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

    # -- shapes and costs ----------------------------------------------------------------------------------------
    @classmethod
    def state_shapes(cls, d_model, spec, batch, context, reuse_features=False):
        return {"value": (batch, spec.window - 1, d_model), "short": (batch, SHORT_KERNEL - 1, 3 * d_model)}

    @classmethod
    def filter_macs(cls, d_model: int) -> int:
        """Multiply-adds of the filter FFN per filter position."""
        return FILTER_EMB * FILTER_ORDER + FILTER_INNER * FILTER_ORDER**2 + FILTER_ORDER * d_model

    @classmethod
    def filter_params(cls, d_model: int) -> int:
        sin = FILTER_ORDER  # one frequency per feature, shared by the FFN's Sin activations
        return (FILTER_EMB + 1) * FILTER_ORDER + FILTER_INNER * (FILTER_ORDER + 1) * FILTER_ORDER + (
            FILTER_ORDER * d_model
        ) + sin

    @classmethod
    def featurizer_params(cls, d_model, spec, reuse_features=False):
        return (d_model + 1) * 2 * d_model + 2 * d_model * (SHORT_KERNEL + 1)

    @classmethod
    def param_count(cls, d_model, spec, reuse_features=False):
        value = (d_model + 1) * d_model + d_model * (SHORT_KERNEL + 1)
        return (
            cls.featurizer_params(d_model, spec)
            + value
            + cls.filter_params(d_model)
            + d_model  # D
            + channel_mix_params(spec.channel_mixing, d_model, d_model)
        )

    @classmethod
    def flops(cls, d_model, spec, context, reuse_features=False):
        common = (
            2.0 * d_model * 3 * d_model
            + 2.0 * 3 * d_model * SHORT_KERNEL
            + channel_mix_flops(spec.channel_mixing, d_model, d_model)
        )
        ffn = 2.0 * spec.window * cls.filter_macs(d_model)  # once per prompt
        prefill = common + (blocked_conv_flops(d_model, context) + ffn) / context
        decode = common + 2.0 * d_model * spec.window
        return Flops(prefill, decode)

    @classmethod
    def activation_elements(cls, d_model, spec, tokens):
        n = -(-max(1, tokens) // CHUNK)
        # projections and short-filter outputs, the gathered chunks and filter blocks
        return 8 * tokens * d_model + d_model * n * CHUNK * (n + CHUNK)

    @classmethod
    def traffic_elements(cls, d_model, spec, tokens):
        # the live intermediates (the two gathers included) and onnxruntime's im2col of the two short-filter Convs
        return cls.activation_elements(d_model, spec, tokens) + depthwise_conv_traffic(tokens, SHORT_KERNEL, 3 * d_model)

    @classmethod
    def constraint_errors(cls, d_model, spec, context):
        errors = []
        if spec.window != context:
            errors.append(f"window: Hyena's filter spans the context ({context} taps), got {spec.window}")
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            errors.append(f"channel_mixing: grouped needs d_model divisible by {GROUPS}, got {d_model}")
        return errors

    @classmethod
    def repair(cls, d_model, spec, context):
        if context in CONTEXTS:
            spec = spec.with_(window=context)
        if spec.channel_mixing == "grouped" and d_model % GROUPS:
            spec = spec.with_(channel_mixing="dense")
        return spec
