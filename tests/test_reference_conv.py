"""The convolution and state-space operators checked against implementations this project did not write.

Each test builds our operator, sets every parameter to random values, copies them into the reference, and
compares outputs on random inputs, in the parallel form and token by token in the recurrent form:

- mamba      vs transformers' Mamba2Mixer.torch_forward (transformers/models/mamba2/modeling_mamba2.py, the
               pure-PyTorch path, no CUDA kernels), n_groups 1, a chunk size unlike ours;
- conv, filter short    vs transformers' Lfm2ShortConv.slow_forward (transformers/models/lfm2/modeling_lfm2.py);
- conv, filter implicit vs a port (below) of HazyResearch/safari's HyenaOperator, HyenaFilter, PositionalEmbedding,
               ExponentialModulation, Sin and fftconv_ref (src/models/sequence/hyena.py, commit 02220c6), the
               reference code of Poli et al. 2023, "Hyena Hierarchy" (arXiv 2302.10866): order 2, one head, one
               block, y = irfft(rfft(u) * rfft(k))[:L] + u * D.

Errors are relative to the reference output's largest magnitude; the tolerance is at least 10x the error seen on
this machine (also with ATEN_CPU_CAPABILITY=avx2).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from factory.ops import conv, registry

TOL = 1e-5  # largest error seen: 5.5e-7 (mamba, decode)


def _randomize(op, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(p + 0.3 * torch.randn_like(p))


def _rel(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _check(ours, ref, what):
    err = _rel(ours, ref)
    assert err <= TOL, f"{what}: relative error {err:.2e} > {TOL:.0e} (margin {TOL / max(err, 1e-30):.1f}x)"


def _stepped(op, x, prompt):
    y, state = op.prefill(x[:, :prompt])
    outs = [y]
    for t in range(prompt, x.shape[1]):
        y, state = op.step(x[:, t : t + 1], torch.full((x.shape[0], 1), t, dtype=torch.long), state)
        outs.append(y)
    return torch.cat(outs, dim=1)


# -- Mamba-2 ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_mamba_matches_transformers_mamba2_mixer():
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    d, spec = 32, registry.default_spec("mamba").with_(expansion=2, state_size=16, kernel=4, heads=4)
    op = registry.build_operator(d, spec).eval()
    _randomize(op, 0)
    e, n, h = op.e, op.n, op.h
    config = Mamba2Config(hidden_size=d, expand=2, num_heads=h, head_dim=e // h, state_size=n, n_groups=1,
                          conv_kernel=4, use_bias=False, use_conv_bias=True, layer_norm_epsilon=op.EPS,
                          chunk_size=48, hidden_act="silu")
    ref = Mamba2Mixer(config, layer_idx=0).eval()
    ref.in_proj.weight.copy_(torch.cat([op.zx_proj.weight, op.bc_proj.weight, op.dt_proj.weight]))  # z, xBC, dt
    ref.conv1d.weight.copy_(torch.cat([op.x_conv.weight, op.bc_conv.weight]).unsqueeze(1))
    ref.conv1d.bias.copy_(torch.cat([op.x_conv.bias, op.bc_conv.bias]))
    for name in ("dt_bias", "A_log", "D"):
        getattr(ref, name).copy_(getattr(op, name))
    ref.norm.weight.copy_(op.norm_weight)
    ref.out_proj.weight.copy_(op.out.weight)

    torch.manual_seed(1)
    x = torch.randn(2, 150, d)
    expected = ref.torch_forward(x)
    _check(op(x), expected, "parallel form")
    _check(_stepped(op, x, 70), expected, "prefill 70 + steps")


# -- LFM2 short convolution ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_short_conv_matches_transformers_lfm2_short_conv():
    from transformers import Lfm2Config
    from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv

    d, k = 48, 3
    op = registry.build_operator(d, registry.default_spec("conv").with_(filter="short", kernel=k)).eval()
    _randomize(op, 0)
    config = Lfm2Config(hidden_size=d, conv_L_cache=k, conv_bias=False)
    ref = Lfm2ShortConv(config, layer_idx=0).eval()
    ref.in_proj.weight.copy_(torch.cat([op.gate_proj.weight, op.value_proj.weight]))  # B, C, x
    ref.conv.weight.copy_(op.filter.unsqueeze(1))
    ref.out_proj.weight.copy_(op.out.weight)

    torch.manual_seed(1)
    x = torch.randn(2, 40, d)
    expected = ref.slow_forward(x)
    _check(op(x), expected, "parallel form")
    _check(_stepped(op, x, 9), expected, "prefill 9 + steps")


# -- Hyena: a port of safari's reference (src/models/sequence/hyena.py) --------------------------------------------
def fftconv_ref(u, k, D):
    """safari's fftconv_ref (gelu off, no dropout): u [B, H, L], k [H, L], D [H]."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    return y + u * D.unsqueeze(-1)


class SafariSin(nn.Module):
    def __init__(self, dim, w=1):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


class SafariHyenaFilter(nn.Module):
    """HyenaFilter with PositionalEmbedding and ExponentialModulation (defaults: fast 0.3, slow 1.5, target 1e-2)."""

    def __init__(self, d_model, emb_dim, order, seq_len, num_inner_mlps=2, w=1):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(d_model))
        t = torch.linspace(0, 1, seq_len)[None, :, None]
        bands = (emb_dim - 1) // 2
        t_rescaled = torch.linspace(0, seq_len - 1, seq_len)[None, :, None]
        w_pos = 2 * math.pi * t_rescaled / seq_len
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w_pos)
        self.register_buffer("z", torch.cat([t, z.real, z.imag], dim=-1))
        self.register_buffer("t", t)
        act = SafariSin(order, w)
        self.implicit_filter = nn.Sequential(nn.Linear(emb_dim, order), act)
        for _ in range(num_inner_mlps):
            self.implicit_filter.append(nn.Linear(order, order))
            self.implicit_filter.append(act)
        self.implicit_filter.append(nn.Linear(order, d_model, bias=False))
        max_decay, min_decay = math.log(1e-2) / 0.3, math.log(1e-2) / 1.5
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d_model)[None, None])

    def filter(self, L):
        z, t = self.z[:, :L], self.t[:, :L]
        h = self.implicit_filter(z)
        return h * torch.exp(-t * self.deltas.abs())  # [1, L, d]


class SafariHyenaOperator(nn.Module):
    """HyenaOperator.forward with order 2, num_heads 1, num_blocks 1, inner_factor 1, identity activation."""

    def __init__(self, d_model, l_max, emb_dim, filter_order):
        super().__init__()
        self.d_model, self.l_max = d_model, l_max
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.short_filter = nn.Conv1d(3 * d_model, 3 * d_model, kernel_size=3, groups=3 * d_model, padding=2)
        self.filter_fn = SafariHyenaFilter(d_model, emb_dim, filter_order, l_max)

    def forward(self, u):
        l = u.size(-2)
        l_filter = min(l, self.l_max)
        u = self.in_proj(u).transpose(1, 2)
        uc = self.short_filter(u)[..., :l_filter]
        *x, v = uc.split(self.d_model, dim=1)
        k = self.filter_fn.filter(l_filter)[0].transpose(0, 1)  # [d, L]
        for x_i in reversed(x[1:]):
            v = fftconv_ref(v * x_i, k, self.filter_fn.bias)
        return self.out_proj((v * x[0]).transpose(1, 2))


def _hyena_pair(d, context):
    op = registry.build_operator(d, registry.repair_spec(registry.default_spec("conv").with_(filter="implicit"), d, context)).eval()
    assert op.length == context
    _randomize(op, 0)
    ref = SafariHyenaOperator(d, context, conv.FILTER_EMB, conv.FILTER_ORDER).eval()
    with torch.no_grad():
        ref.in_proj.weight.copy_(torch.cat([op.gate_proj.weight, op.value_proj.weight]))  # x0, x1, v
        ref.in_proj.bias.copy_(torch.cat([op.gate_proj.bias, op.value_proj.bias]))
        ref.short_filter.weight.copy_(torch.cat([op.gate_conv.weight, op.value_conv.weight]).unsqueeze(1))
        ref.short_filter.bias.copy_(torch.cat([op.gate_conv.bias, op.value_conv.bias]))
        ours_ffn = [m for m in op.filter_ffn if isinstance(m, nn.Linear)]
        ref_ffn = [m for m in ref.filter_fn.implicit_filter if isinstance(m, nn.Linear)]
        for mine, theirs in zip(ours_ffn, ref_ffn, strict=True):
            theirs.load_state_dict(mine.state_dict())
        ref.filter_fn.implicit_filter[1].freq.copy_(op.filter_ffn[1].freq)
        ref.filter_fn.bias.copy_(op.D)
        ref.out_proj.weight.copy_(op.out.weight)
        ref.out_proj.bias.zero_()  # ours has no output bias
    return op, ref


@pytest.mark.parametrize("form", ["blocked", "fft"])
@torch.no_grad()
def test_hyena_matches_safari_reference(form, monkeypatch):
    """Prompts shorter than the context and one of the full context, which crosses many 64-token blocks."""
    monkeypatch.setattr(conv, "PARALLEL_FORM", form)
    d, context = 32, 256
    op, ref = _hyena_pair(d, context)
    torch.manual_seed(1)
    for length in (37, 130, context):
        x = torch.randn(2, length, d)
        _check(op(x), ref(x), f"{form}, length {length}")


@torch.no_grad()
def test_hyena_decode_matches_safari_reference_over_the_whole_context():
    """Token-by-token decoding reaches back over the whole context (the state holds context - 1 inputs)."""
    d, context = 16, 128
    op, ref = _hyena_pair(d, context)
    torch.manual_seed(2)
    x = torch.randn(1, context, d)
    _check(_stepped(op, x, 5), ref(x), "prefill 5 + steps")
    assert op.filter().abs()[:, -1].max() > 1e-3  # the far taps are not negligible: the check reaches them


# -- featurizer sharing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, genes", [("mamba", {}), ("conv", {"filter": "short"}), ("conv", {"filter": "implicit"})])
@torch.no_grad()
def test_featurizer_sharing_shares_exactly_the_featurizer(family, genes):
    """The featurizer submodules hold exactly `featurizer_params` parameters, none of the family's other weights;
    in a model whose two layers share them, the later layer computes with the first one's (its own outputs change
    when they change), and the genome's parameter count matches the model's."""
    from factory.genome import Genome
    from factory.genome.metrics import param_count
    from factory.genome.schema import LayerGene
    from factory.model import LIVModel

    d, context = 32, 64
    spec = registry.repair_spec(registry.default_spec(family).with_(**genes), d, context)
    op = registry.build_operator(d, spec)
    cls = type(op)
    assert cls.featurizer and "differential" not in spec.genes
    shared = sum(p.numel() for name in cls.featurizer for p in getattr(op, name).parameters())
    assert shared == cls.featurizer_params(d, spec) > 0
    assert shared < sum(p.numel() for p in op.parameters())

    layers = (LayerGene(op_class=0, share="featurizer"), LayerGene(op_class=0, share="featurizer"))
    genome = Genome(d_model=d, classes=(spec,), layers=layers, context=context).validate()
    model = LIVModel(genome).eval()
    assert param_count(genome) == sum(p.numel() for p in model.parameters())
    first, second = model.op(0), model.op(1)
    assert first is not second
    for name in cls.featurizer:
        assert getattr(second, name) is getattr(first, name)
    x = torch.randn(1, 20, d)
    before = second(x)
    for p in getattr(first, cls.featurizer[0]).parameters():
        p.add_(0.5)
    assert (second(x) - before).abs().max() > 1e-3


@torch.no_grad()
def test_hyena_decode_reuses_its_filter_only_while_the_parameters_are_unchanged():
    """A step reuses the filter the prefill generated (as the exported graph folds it), and generates it again
    after any parameter of the filter changes in place (an optimizer step, load_state_dict)."""
    from torch.utils.flop_counter import FlopCounterMode

    d, context = 16, 64
    op, ref = _hyena_pair(d, context)
    torch.manual_seed(3)
    x = torch.randn(1, 40, d)
    _, state = op.prefill(x[:, :39])
    with FlopCounterMode(display=False) as counter:
        y, _ = op.step(x[:, 39:], torch.full((1, 1), 39), state)
    assert counter.get_total_flops() == registry.flops(d, op.spec, context).decode
    _check(y, ref(x)[:, 39:], "step after prefill")
    for module in (op.filter_ffn[0], op.filter_ffn[1], ref.filter_fn.implicit_filter[0], ref.filter_fn.implicit_filter[1]):
        for p in module.parameters():
            p.mul_(1.5)
    y, _ = op.step(x[:, 39:], torch.full((1, 1), 39), state)
    _check(y, ref(x)[:, 39:], "step after the filter's parameters changed")


def test_hyena_filter_lengths_are_the_genome_contexts():
    """Hyena's `length` (its filter's taps) takes exactly the genome's context values, and repair sets it to the
    context, so every genome's filter spans its context."""
    from factory.genome.codec import GLOBAL_DOMAINS

    assert registry.domain("conv", "length") == GLOBAL_DOMAINS["context"]
    for context in GLOBAL_DOMAINS["context"]:
        spec = registry.repair_spec(registry.default_spec("conv").with_(filter="implicit", length=64), 32, context)
        assert spec.length == context and not registry.spec_errors(spec, 32, context)
    assert registry.spec_errors(registry.default_spec("conv").with_(filter="implicit", length=128), 32, 256)
