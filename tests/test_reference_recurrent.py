"""Linear attention (GLA, RetNet, differential) and RWKV-6 checked against implementations this project did not write.

References:
- flash-linear-attention (`fla-core==0.6.0` on PyPI, MIT): the plain-torch recurrences `naive_recurrent_gla`
  (fla/ops/gla/naive.py) and `naive_recurrent_rwkv6` (fla/ops/rwkv6/recurrent_naive.py), loaded from their files
  (fla's package `__init__` imports its triton kernels, which do not run here; these two files import only torch).
- Ports (read, then written here) of the layer code around those recurrences: fla's GLA layer forward
  (fla/layers/gla.py of flash-linear-attention 0.6.0: q, k, v, g projections, gk = logsigmoid(gk_proj(x)) / 16,
  FusedRMSNormGated = rmsnorm(o) * weight * silu(g), o_proj), RWKV-LM's RWKV_Tmix_x060 (BlinkDL/RWKV-LM,
  RWKV-v5/src/model.py: ddlerp with one [C, 5R] LoRA, decay LoRA, ln_x = GroupNorm(H, C, eps 64e-5), output(x * g))
  and torchscale's MultiScaleRetention.parallel_forward with RetNetRelPos (microsoft/torchscale,
  torchscale/component/multiscale_retention.py, torchscale/architecture/retnet.py).
- transformers 4.57's DiffLlama `lambda_init_fn` for the differential form's lambda_init.

Weights are the operator's own (randomised), copied into the references; fixed seeds; tolerances pass by >= 10x.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from factory.ops import registry
from factory.ops.base import OpSpec
from factory.ops.linear_attention import lambda_init

D = 64
MEASURED: dict | None = None  # set to a dict to collect the errors (tolerance margins in the report)
TOL = 1e-4  # max abs error / max |reference|; measured <= 4e-6 here (float32 rounding), see each assertion's message


def _fla(relative: str, name: str):
    """A function from one plain-torch file of the installed fla-core package, without importing `fla` itself."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("fla-core is not installed: it is a dev extra (pip install -e '.[dev]')")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    mod_spec = importlib.util.spec_from_file_location(f"_fla_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return getattr(module, name)


def _build(spec: OpSpec, seed: int = 0, layer: int = 0, scale: float = 0.3):
    torch.manual_seed(seed)
    op = registry.build_operator(D, registry.repair_spec(spec, D, 256), layer=layer).eval()
    with torch.no_grad():
        for p in op.parameters():
            p.add_(scale * torch.randn_like(p))
    return op


def _decode(op, x, prompt):
    y, state = op.prefill(x[:, :prompt])
    outs = [y]
    for t in range(prompt, x.shape[1]):
        y, state = op.step(x[:, t : t + 1], torch.full((x.shape[0], 1), t, dtype=torch.long), state)
        outs.append(y)
    return torch.cat(outs, 1), state


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL):
    """Max abs error relative to the reference's largest magnitude (the randomised weights give outputs ~10-30)."""
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()
    if MEASURED is not None:
        MEASURED[name] = max(MEASURED.get(name, 0.0), err)
    assert torch.isfinite(got).all() and err <= tol, f"{name}: relative err {err:.2e}, tolerance/err {tol / max(err, 1e-30):.1f}"


def _rmsnorm(x, weight=None, eps=1e-5):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


# -- GLA ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate_bias", [0.0, -60.0], ids=["slow-decay", "fast-decay"])
@torch.no_grad()
def test_gla_matches_flash_linear_attention(gate_bias):
    """GLA layer vs a port of fla's GLA layer forward (fla/layers/gla.py, 0.6.0) around fla's own
    `naive_recurrent_gla`: outputs of prefill and decode, and the final state. fast-decay: gate logits near -60, so
    log a ~ -3.75 a token (a chunk's decay ~ e^-60): the chunked form must stay finite and exact."""
    naive_recurrent_gla = _fla("ops/gla/naive.py", "naive_recurrent_gla")
    spec = OpSpec(family="linear_attention", decay="gla", nonlinearity="identity", heads=4, key_dim=16)
    op = _build(spec, seed=1)
    with torch.no_grad():
        op.gate_up.bias.add_(gate_bias)
        head_w = torch.rand(op.dv) + 0.5  # fla's norm weight is per head dim, shared across heads
        op.norm_weight.copy_(head_w.repeat(op.h))
    torch.manual_seed(2)
    x = torch.randn(2, 75, D)

    # the port: fla GLA layer, no short conv, no feature map, swish output gate fused with the RMS norm
    h, dk, dv = op.h, op.dk, op.dv
    q = F.linear(x, op.q_proj.weight).unflatten(-1, (h, dk))
    k = F.linear(x, op.k_proj.weight).unflatten(-1, (h, dk))
    v = F.linear(x, op.v_proj.weight).unflatten(-1, (h, dv))
    gk = F.linear(F.linear(x, op.gate_down.weight), op.gate_up.weight, op.gate_up.bias).unflatten(-1, (h, dk))
    gk = F.logsigmoid(gk) / 16
    o, state = naive_recurrent_gla(q, k, v, gk, output_final_state=True)  # [B, T, H, V], scale dk^-0.5 inside
    g = F.linear(x, op.g_proj.weight).unflatten(-1, (h, dv))
    o = (_rmsnorm(o, head_w, eps=1e-5) * F.silu(g)).flatten(-2)
    want = F.linear(o, op.out.weight)

    got, got_state = op.prefill(x)
    _close("prefill", got, want)
    _close("state", got_state["kv"], state)
    _close("decode", _decode(op, x, 9)[0], want)


# -- RWKV-6 -------------------------------------------------------------------------------------------------------
def _rwkv_lm_x060(op, x):
    """RWKV-LM's RWKV_Tmix_x060.forward (jit_func, the wkv kernel, jit_func_2), with the wkv kernel replaced by fla's
    `naive_recurrent_rwkv6` (scale 1, as fla's RWKV6 layer calls it). Weights mapped from the operator: RWKV-LM
    orders its ddlerp branches w, k, v, r, g; the operator w, r, k, v, g."""
    naive_recurrent_rwkv6 = _fla("ops/rwkv6/recurrent_naive.py", "naive_recurrent_rwkv6")
    b, t, c = x.shape
    h, n = op.heads, op.head_dim
    order = (0, 2, 3, 1, 4)  # RWKV-LM branch i -> operator branch
    time_maa_w1 = torch.cat([op.mix_down[j].weight.t() for j in order], dim=1)  # [C, 5R]
    time_maa_w2 = torch.stack([op.mix_up[j].weight.t() for j in order])  # [5, R, C]
    maa_w, maa_k, maa_v, maa_r, maa_g = (op.mix[j] for j in order)

    xx = F.pad(x, (0, 0, 1, -1)) - x  # time_shift(x) - x
    xxx = x + xx * op.mix_x
    xxx = torch.tanh(xxx @ time_maa_w1).view(b * t, 5, -1).transpose(0, 1)
    xxx = torch.bmm(xxx, time_maa_w2).view(5, b, t, -1)
    mw, mk, mv, mr, mg = xxx.unbind(dim=0)
    xw, xk, xv = x + xx * (maa_w + mw), x + xx * (maa_k + mk), x + xx * (maa_v + mv)
    xr, xg = x + xx * (maa_r + mr), x + xx * (maa_g + mg)
    r, k, v = xr @ op.receptance.weight.t(), xk @ op.key.weight.t(), xv @ op.value.weight.t()
    g = F.silu(xg @ op.gate.weight.t())
    ww = torch.tanh(xw @ op.decay_down.weight.t()) @ op.decay_up.weight.t()
    w = op.decay + ww  # the kernel's decay is exp(-exp(w))

    heads = lambda z: z.view(b, t, h, n).transpose(1, 2)  # noqa: E731
    y, state = naive_recurrent_rwkv6(
        heads(r), heads(k), heads(v), heads(-torch.exp(w)), op.bonus, scale=1.0, output_final_state=True
    )
    y = y.transpose(1, 2).reshape(b * t, c)
    ln_x = torch.nn.GroupNorm(h, c, eps=(1e-5) * (8**2))
    ln_x.weight.copy_(op.norm_weight)
    ln_x.bias.copy_(op.norm_bias)
    y = ln_x(y).view(b, t, c)
    return F.linear(y * g, op.out.weight), state


@torch.no_grad()
def test_rwkv6_matches_rwkv_lm_and_flash_linear_attention():
    """RWKV-6 time mixing vs a port of RWKV-LM's RWKV_Tmix_x060 forward with fla's `naive_recurrent_rwkv6` as its
    wkv kernel and torch's GroupNorm as ln_x: outputs of prefill and decode, and the final wkv state."""
    op = _build(OpSpec(family="rwkv", heads=4), seed=3)
    with torch.no_grad():  # decay base spread so some channels forget fast (w ~ e^-e^2) and some barely
        op.decay.copy_(torch.linspace(-6.0, 2.0, D))
    torch.manual_seed(4)
    x = torch.randn(2, 70, D)
    want, state = _rwkv_lm_x060(op, x)
    got, got_state = op.prefill(x)
    _close("prefill", got, want)
    _close("state", got_state["wkv"], state)
    _close("decode", _decode(op, x, 5)[0], want)


# -- RetNet -------------------------------------------------------------------------------------------------------
def _torchscale_retention(op, x, eps):
    """torchscale's MultiScaleRetention.forward (parallel) with RetNetRelPos; value head dim d/H (torchscale: 2d/H),
    group norm RMSNorm(head_dim, elementwise_affine=False) as there."""
    b, t, _ = x.shape
    h, dk, dv = op.h, op.dk, op.dv
    angle = 1.0 / (10000 ** torch.linspace(0, 1, dk // 2))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()
    decay = torch.log(1 - 2 ** (-5 - torch.arange(h, dtype=torch.float)))
    index = torch.arange(t).to(decay)
    sin, cos = torch.sin(index[:, None] * angle[None, :]), torch.cos(index[:, None] * angle[None, :])
    mask = torch.tril(torch.ones(t, t).to(decay))
    mask = torch.masked_fill(index[:, None] - index[None, :], ~mask.bool(), float("inf"))
    mask = torch.exp(mask * decay[:, None, None])
    mask = torch.nan_to_num(mask)
    mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()

    def rotate_every_two(z):
        z1, z2 = z[:, :, :, ::2], z[:, :, :, 1::2]
        return torch.stack((-z2, z1), dim=-1).flatten(-2)

    def theta_shift(z):
        return (z * cos) + (rotate_every_two(z) * sin)

    q, k = F.linear(x, op.q_proj.weight), F.linear(x, op.k_proj.weight) * dk**-0.5
    v, g = F.linear(x, op.v_proj.weight), F.linear(x, op.g_proj.weight)
    q, k = (z.view(b, t, h, dk).transpose(1, 2) for z in (q, k))
    qr, kr = theta_shift(q), theta_shift(k)
    vr = v.view(b, t, h, dv).transpose(1, 2)
    qk = (qr @ kr.transpose(-1, -2)) * mask
    qk = qk / qk.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1)
    out = (qk @ vr).transpose(1, 2)
    out = _rmsnorm(out, eps=eps).reshape(b, t, h * dv)
    return F.linear(F.silu(g) * out, op.out.weight)


@torch.no_grad()
def test_retnet_matches_torchscale_parallel_retention():
    """RetNet retention vs a port of torchscale's parallel retention (rotation, decay mask and its normalisations,
    group norm, swish gate). torchscale's per-row normalisations are positive factors the group norm cancels up to
    its epsilon (torchscale's own comment: "invariant after normalization"), so both norms run with eps 1e-12 here."""
    op = _build(OpSpec(family="linear_attention", decay="retnet", nonlinearity="identity", heads=4, key_dim=16), 5)
    with torch.no_grad():
        op.norm_weight.fill_(1.0)  # torchscale's group norm has no affine weight
    op.EPS = 1e-12
    torch.manual_seed(6)
    x = torch.randn(2, 90, D)
    want = _torchscale_retention(op, x, eps=1e-12)
    _close("prefill", op.prefill(x)[0], want)
    _close("decode", _decode(op, x, 3)[0], want)


# -- differential form --------------------------------------------------------------------------------------------
def test_lambda_init_is_the_differential_transformers():
    """lambda_init vs transformers' DiffLlama lambda_init_fn (0-based layer index)."""
    from transformers.models.diffllama.modeling_diffllama import lambda_init_fn

    for layer in range(8):
        assert abs(lambda_init(layer) - lambda_init_fn(layer)) < 1e-12
    op = _build(OpSpec(family="linear_attention", decay="gla", nonlinearity="swish", differential=True), layer=5)
    assert op.lambda_init == lambda_init_fn(5)


@torch.no_grad()
def test_differential_gla_is_two_fla_recurrences_over_one_value():
    """Differential GLA vs o1 - lambda o2 of two fla `naive_recurrent_gla` runs, over the halves [q1 | q2], [k1 | k2]
    (and their gates) with the same v, then RMS norm (eps 1e-5), (1 - lambda_init), swish gate, output projection."""
    naive_recurrent_gla = _fla("ops/gla/naive.py", "naive_recurrent_gla")
    op = _build(OpSpec(family="linear_attention", decay="gla", nonlinearity="identity", differential=True), 7, layer=2)
    torch.manual_seed(8)
    x = torch.randn(2, 40, D)
    h, dk, dv, half = op.h, op.dk, op.dv, op.dk // 2
    q = F.linear(x, op.q_proj.weight).unflatten(-1, (h, dk))
    k = F.linear(x, op.k_proj.weight).unflatten(-1, (h, dk))
    v = F.linear(x, op.v_proj.weight).unflatten(-1, (h, dv))
    gk = F.logsigmoid(op.gate_up(op.gate_down(x))).unflatten(-1, (h, dk)) / 16
    o1, s1 = naive_recurrent_gla(q[..., :half], k[..., :half], v, gk[..., :half], output_final_state=True)
    o2, s2 = naive_recurrent_gla(q[..., half:], k[..., half:], v, gk[..., half:], output_final_state=True)
    lam = math.exp((op.lambda_q1 * op.lambda_k1).sum()) - math.exp((op.lambda_q2 * op.lambda_k2).sum())
    lam += 0.8 - 0.6 * math.exp(-0.3 * 2)
    o = _rmsnorm(o1 - lam * o2, eps=1e-5).flatten(-2) * op.norm_weight * (1 - op.lambda_init)
    want = op.out(o * F.silu(F.linear(x, op.g_proj.weight)))
    got, state = op.prefill(x)
    _close("prefill", got, want)
    # the state: the two halves' states stacked (the plain form's [dk, dv] per head)
    assert state["kv"].shape == (2, h, dk, dv)
    _close("state half 1", state["kv"][:, :, :half], s1)
    _close("state half 2", state["kv"][:, :, half:], s2)


@torch.no_grad()
def test_differential_plain_linear_attention_normalises_each_map():
    """Differential plain linear attention (decay none) vs the quadratic causal form of its equations, written out
    here: o_i = sum_{j<=i} (phi(q_i) . phi(k_j)) v_j / sum_{j<=i} phi(q_i) . phi(k_j) for each half, then
    o1 - lambda o2, RMS norm, (1 - lambda_init), swish gate."""
    op = _build(OpSpec(family="linear_attention", decay="none", nonlinearity="elu", differential=True), 9, layer=1)
    torch.manual_seed(10)
    x = torch.randn(1, 50, D)
    h, dk, half = op.h, op.dk, op.dk // 2
    q = (F.elu(F.linear(x, op.q_proj.weight)) + 1).unflatten(-1, (h, dk)).transpose(1, 2)  # [B, H, T, dk]
    k = (F.elu(F.linear(x, op.k_proj.weight)) + 1).unflatten(-1, (h, dk)).transpose(1, 2)
    v = F.linear(x, op.v_proj.weight).unflatten(-1, (h, op.dv)).transpose(1, 2)
    causal = torch.ones(50, 50).tril()
    outs = []
    for sl in (slice(0, half), slice(half, dk)):
        a = (q[..., sl] @ k[..., sl].transpose(-1, -2)) * causal
        outs.append((a @ v) / (a.sum(-1, keepdim=True) + op.EPS))
    o = (outs[0] - op._lambda() * outs[1]).transpose(1, 2)
    o = _rmsnorm(o, eps=1e-5).flatten(-2) * op.norm_weight * (1 - op.lambda_init)
    want = op.out(o * F.silu(F.linear(x, op.g_proj.weight)))
    _close("prefill", op.prefill(x)[0], want)
    _close("decode", _decode(op, x, 4)[0], want)


# -- every decay x differential: decode parity, costs, state size, featurizer ---------------------------------------
COMBOS = [(d, diff) for d in ("none", "retnet", "gla", "scalar") for diff in (False, True)]


@pytest.mark.parametrize("decay,differential", COMBOS)
@torch.no_grad()
def test_decay_and_differential_forms(decay, differential):
    """Decode parity, FLOPs against FlopCounterMode, parameter count and state shapes for each decay kind, plain and
    differential (the registry sweep varies one field from the default, so it meets differential with gla only);
    the differential state is the plain form's."""
    spec = registry.repair_spec(
        OpSpec(family="linear_attention", decay=decay, differential=differential, nonlinearity="identity"), D, 256
    )
    op = _build(spec, seed=11, layer=3, scale=0.05)
    torch.manual_seed(12)
    x = torch.randn(2, 83, D)
    full = op(x)
    _close("decode", _decode(op, x, 7)[0], full)
    assert sum(p.numel() for p in op.parameters()) == registry.param_count(D, spec)
    assert registry.state_shapes(D, spec, 2, 83) == registry.state_shapes(D, spec.with_(differential=False), 2, 83)
    for ctx in (1, 70):
        xs = torch.randn(1, ctx, D)
        with FlopCounterMode(display=False) as m:
            _, state = op.prefill(xs)
        prefill = m.get_total_flops() / ctx
        with FlopCounterMode(display=False) as m:
            op.step(xs[:, :1], torch.full((1, 1), ctx), state)
        f = registry.flops(D, spec, ctx)
        assert prefill == pytest.approx(f.prefill, rel=1e-12) and m.get_total_flops() == f.decode


@pytest.mark.parametrize(
    "spec",
    [OpSpec(family="linear_attention", decay=d, nonlinearity="swish") for d in ("gla", "scalar", "retnet")] + [OpSpec(family="rwkv")],
    ids=["gla", "scalar", "retnet", "rwkv"],
)
def test_featurizer_is_what_it_names(spec):
    """`featurizer_params` counts exactly the named submodules; pointing a second layer's featurizer at the first's
    (as factory.model does) leaves 2 * params - featurizer_params distinct parameters, and changes its output."""
    spec = registry.repair_spec(spec, D, 256)
    cls = registry.family(spec.family)
    a, b = _build(spec, 0), _build(spec, 1)
    named = [getattr(a, n) for n in cls.featurizer]
    count = sum(p.numel() for m in named if m is not None for p in ([m] if isinstance(m, torch.nn.Parameter) else m.parameters()))
    assert count == registry.featurizer_params(D, spec) > 0
    x = torch.randn(1, 20, D)
    before = b(x)
    for n in cls.featurizer:
        setattr(b, n, getattr(a, n))
    distinct = {id(p): p.numel() for m in (a, b) for p in m.parameters()}
    assert sum(distinct.values()) == 2 * registry.param_count(D, spec) - registry.featurizer_params(D, spec)
    assert not torch.allclose(b(x), before)
