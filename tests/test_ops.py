"""Every registered operator family, every variant: decode parity, state shapes, parameter counts."""

import pytest
import torch

from factory.ops import registry

D_MODEL = 64
CONTEXT = 64
DECODE_TOLERANCE = 1e-4  # token-by-token decode vs the parallel form, max abs over the outputs


def _variants():
    for name in sorted(registry.families()):
        for spec in registry.spec_variants(name, D_MODEL, CONTEXT):
            label = f"{name}-" + "-".join(
                f"{k}={v}" for k, v in spec.to_dict().items() if k != "family" and v != registry.default_spec(name).to_dict()[k]
            )
            yield pytest.param(spec, id=label.rstrip("-"))


VARIANTS = list(_variants())


def _build(spec, seed=0):
    torch.manual_seed(seed)
    op = registry.build_operator(D_MODEL, spec).eval()
    # Random (not identity) values everywhere, so parity is not trivially met by zero-initialised branches.
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return op


def _decode(op, x, prompt):
    """Prefill `prompt` tokens, then step through the rest; returns the outputs at every position."""
    y0, state = op.prefill(x[:, :prompt])
    outs = [y0]
    for t in range(prompt, x.shape[1]):
        pos = torch.full((x.shape[0], 1), t, dtype=torch.long)
        y, state = op.step(x[:, t : t + 1], pos, state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("spec", VARIANTS)
@torch.no_grad()
def test_decode_matches_parallel_form(spec):
    op = _build(spec)
    torch.manual_seed(1)
    # Long enough to go beyond any window or kernel the variants use at this context.
    length = 2 * spec.window + 7 if spec.get("window") else 2 * CONTEXT + 5
    x = torch.randn(2, length, D_MODEL)
    full = op(x)
    torch.testing.assert_close(op.prefill(x)[0], full, atol=1e-5, rtol=1e-5)
    for prompt in (1, 7):
        stepped, _ = _decode(op, x, prompt)
        err = (stepped - full).abs().max().item()
        assert err <= DECODE_TOLERANCE, (
            f"prompt={prompt}: max abs diff {err:.2e}, margin {DECODE_TOLERANCE / max(err, 1e-30):.2g}x")


@pytest.mark.parametrize("spec", VARIANTS)
@torch.no_grad()
def test_state_shapes_match_formula(spec):
    op = _build(spec)
    x = torch.randn(3, 21, D_MODEL)
    _, state = op.prefill(x[:, :13])
    assert {k: tuple(v.shape) for k, v in state.items()} == registry.state_shapes(D_MODEL, spec, 3, 13)
    stepped_state = _decode(op, x, 13)[1]
    assert {k: tuple(v.shape) for k, v in stepped_state.items()} == registry.state_shapes(D_MODEL, spec, 3, 21)


@pytest.mark.parametrize("spec", VARIANTS)
def test_param_count_matches_module(spec):
    op = registry.build_operator(D_MODEL, spec)
    assert sum(p.numel() for p in op.parameters()) == registry.param_count(D_MODEL, spec)


FLOPS_TOLERANCE = 0.02  # relative


def _counted_flops(fn) -> float:
    """Matmul FLOPs (2 per multiply-add; convolutions and SDPA included, SDPA as dense work over the keys it is
    given, as torch counts it for every backend) that torch.utils.flop_counter.FlopCounterMode counts while `fn`
    runs, and what `fn` returned. torch 2.13 has no formula for the CPU flash kernel that SDPA dispatches to here: it is given the one
    torch uses for the other SDPA kernels."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    def sdpa(query, key, value, *args, out_shape=None, **kwargs):  # shapes (FlopCounterMode's shape_wrapper)
        return flop_counter.sdpa_flop_count(query, key, value)

    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        result = fn()
    return float(counter.get_total_flops()), result


@pytest.mark.parametrize("spec", VARIANTS)
@torch.no_grad()
def test_flops_match_the_counted_work(spec):
    """registry.flops against what the forms execute, counted by torch's FlopCounterMode at batch 1: prefill is the
    per-token average over a CONTEXT-token prompt, decode one step with CONTEXT tokens already in the state."""
    op = _build(spec)
    torch.manual_seed(2)
    x = torch.randn(1, CONTEXT + 1, D_MODEL)
    prefill, (_, state) = _counted_flops(lambda: op.prefill(x[:, :CONTEXT]))
    prefill /= CONTEXT
    position = torch.full((1, 1), CONTEXT, dtype=torch.long)
    decode, _ = _counted_flops(lambda: op.step(x[:, CONTEXT:], position, state))
    f = registry.flops(D_MODEL, spec, CONTEXT)
    assert prefill > 0 and decode > 0
    for what, formula, counted in (("prefill", f.prefill, prefill), ("decode", f.decode, decode)):
        error = abs(formula - counted) / counted
        assert error <= FLOPS_TOLERANCE, (
            f"{what}: flops() {formula:,.0f} per token, counted {counted:,.0f} ({(formula - counted) / counted:+.1%}, "
            f"margin {FLOPS_TOLERANCE / error:.2g}x)")


@pytest.mark.parametrize("spec", VARIANTS)
def test_gradients_flow(spec):
    op = _build(spec)
    x = torch.randn(2, 9, D_MODEL, requires_grad=True)
    op(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_every_required_family_is_registered():
    required = {"attention", "linear_attention", "rwkv", "mamba", "conv", "glu"}
    assert required <= set(registry.families())


@pytest.mark.parametrize("spec", VARIANTS)
def test_mix_width_is_the_output_projections_input(spec):
    """The channel-mixing traffic term (registry.traffic_elements) is counted on `mix_width`: it must be the width
    the operator's output projection actually takes."""
    op = registry.build_operator(D_MODEL, spec)
    width = registry.family(spec.family).mix_width(D_MODEL, spec)
    out = next(m for name, m in op.named_modules() if name.split(".")[-1] == "out")  # inside any wrapper
    shape = {"Linear": lambda m: m.in_features, "GroupedLinear": lambda m: m.weight.shape[0] * m.weight.shape[1],
             "DiagonalLinear": lambda m: m.weight.shape[0]}[type(out).__name__](out)
    assert shape == width
