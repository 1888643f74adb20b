"""The convolution family's two filters (short: LFM2, implicit: Hyena) and its stateful `extend` form.

`extend(x, positions, state)` runs a chunk of any T >= 1 tokens after the state of the earlier ones; from the
empty state (zeros of `empty_state_shapes`) chunks of any sizes then single tokens must give the full parallel
forward pass. Tolerances are relative to the output's largest magnitude, at least 10x the error seen here.
"""

from __future__ import annotations

import pytest
import torch

from factory.ops import registry

TOL = 1e-5
D, CONTEXT = 16, 64
SPECS = {
    "short k=4": dict(filter="short", kernel=4),
    "short k=2 swish": dict(filter="short", kernel=2, nonlinearity="swish"),
    "implicit": dict(filter="implicit"),
    "implicit sigmoid grouped": dict(filter="implicit", nonlinearity="sigmoid", channel_mixing="grouped"),
}


def _op(genes: dict, seed: int = 0):
    spec = registry.repair_spec(registry.default_spec("conv").with_(**genes), D, CONTEXT)
    torch.manual_seed(seed)
    op = registry.build_operator(D, spec).eval()
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.3 * torch.randn_like(p))  # off the initialisation (D, biases), so every term shows
    return op


def _rel(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _empty(op, batch):
    shapes = type(op).empty_state_shapes(D, op.spec, batch)
    return {k: torch.zeros(s) for k, s in shapes.items()}


def _extend_in_chunks(op, x, sizes):
    state, outs, t = _empty(op, x.shape[0]), [], 0
    for n in sizes:
        positions = torch.arange(t, t + n).expand(x.shape[0], n)
        y, state = op.extend(x[:, t : t + n], positions, state)
        assert {k: tuple(v.shape) for k, v in state.items()} == {
            k: tuple(s) for k, s in type(op).empty_state_shapes(D, op.spec, x.shape[0]).items()}
        outs.append(y)
        t += n
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("name", list(SPECS))
@torch.no_grad()
def test_extend_in_chunks_then_steps_equals_the_full_forward(name):
    """Chunks of 1, 2, 3 and 5 tokens (crossing the short kernel and Hyena's 3-tap short filters), then one
    token at a time to the whole context, equal one forward pass; a `step` from an extended state agrees."""
    op = _op(SPECS[name])
    torch.manual_seed(1)
    x = torch.randn(2, CONTEXT, D)
    full = op(x)
    sizes = [1, 2, 3, 5] + [1] * (CONTEXT - 11)
    ys, _ = _extend_in_chunks(op, x, sizes)
    err = _rel(ys, full)
    assert err <= TOL, f"{name}: chunked extend vs forward, relative error {err:.2e}"
    # one large chunk after a short one, then the recurrent step from the state extend left
    ys, state = _extend_in_chunks(op, x[:, :40], [7, 33])
    y, _ = op.step(x[:, 40:41], torch.full((2, 1), 40), state)
    err = max(_rel(ys, full[:, :40]), _rel(y, full[:, 40:41]))
    assert err <= TOL, f"{name}: extend 7 + 33 then step, relative error {err:.2e}"


@pytest.mark.parametrize("name", ["short k=4", "implicit"])
@torch.no_grad()
def test_extend_state_equals_the_prefill_state(name):
    """extend from the empty state leaves the state prefill returns (the same keys, shapes and values)."""
    op = _op(SPECS[name], seed=2)
    torch.manual_seed(3)
    x = torch.randn(1, 23, D)
    _, expected = op.prefill(x)
    _, state = _extend_in_chunks(op, x, [5, 18])
    assert state.keys() == expected.keys()
    for k in state:
        assert state[k].shape == expected[k].shape
        assert _rel(state[k], expected[k]) <= TOL, k


@torch.no_grad()
def test_extend_depends_on_the_state():
    """The state is read: a chunk after other history gives other outputs (the zeros of the empty state are the
    convolution's own padding, not a placeholder that happens to match)."""
    for genes in (SPECS["short k=4"], SPECS["implicit"]):
        op = _op(genes, seed=4)
        torch.manual_seed(5)
        x = torch.randn(1, 12, D)
        first, _ = op.extend(x[:, 8:], torch.arange(8, 12)[None], _empty(op, 1))
        after, _ = _extend_in_chunks(op, x, [8, 4])
        assert (after[:, 8:] - first).abs().max() > 1e-3


def test_the_two_filters_are_one_family_with_their_own_genes():
    """One family `conv`; the gene a filter does not use is reset by the canonical form, so two specs that build
    the same operator are equal; the short filter's kernel and Hyena's length are validated by name."""
    short = registry.default_spec("conv")
    assert short.filter == "short" and registry.family("conv") is registry.family(short.family)
    assert short.with_(length=1024).canonical() == short
    implicit = short.with_(filter="implicit", length=64)
    assert implicit.with_(kernel=7).canonical() == implicit.canonical()
    assert registry.spec_errors(implicit, D, 128)[0].startswith("length: Hyena's filter spans the context")
    assert registry.spec_errors(short.with_(kernel=9), D, 64)[0].startswith("kernel: 9 is not accepted by conv")
    with pytest.raises(ValueError, match="conv has no gene 'window'"):
        short.with_(window=64)


def test_a_built_convolution_copies():
    """deepcopy (what the exporter does to a model) rebuilds the filter's kind without the family's arguments."""
    import copy

    for genes in (SPECS["short k=4"], SPECS["implicit"]):
        op = _op(genes)
        twin = copy.deepcopy(op)
        assert type(twin) is type(op)
        x = torch.randn(1, 9, D)
        with torch.no_grad():
            assert torch.equal(twin(x), op(x))
