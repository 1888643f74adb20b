"""GLU channel mixers against transformers' LlamaMLP (down(act(gate(x)) * up(x)), the SwiGLU of Llama), an
implementation this project did not write, on shared random weights: SwiGLU, GEGLU, ReGLU and the sigmoid GLU
(transformers' ACT2FN for the activation). PanGu-pi's series activation has no independent implementation
installed; tests/test_ops.py checks its parameter count and parity."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from factory.ops import registry

D_MODEL = 48
TOLERANCE = 1e-5  # max abs difference, relative to the output's largest magnitude


@pytest.mark.parametrize("ours, theirs", [("swish", "silu"), ("gelu", "gelu"), ("relu", "relu"), ("sigmoid", "sigmoid")])
@pytest.mark.parametrize("expansion", [1, 3])
@torch.no_grad()
def test_glu_matches_llama_mlp(ours, theirs, expansion):
    spec = registry.repair_spec(registry.default_spec("glu").with_(nonlinearity=ours, expansion=expansion), D_MODEL, 64)
    torch.manual_seed(0)
    op = registry.build_operator(D_MODEL, spec).eval()
    hidden = expansion * D_MODEL
    config = LlamaConfig(hidden_size=D_MODEL, intermediate_size=hidden, hidden_act=theirs, mlp_bias=False)
    reference = LlamaMLP(config).eval()
    gate, up = op.gate_up.weight.split(hidden, dim=0)  # ours computes both branches in one matmul
    reference.gate_proj.weight.copy_(gate)
    reference.up_proj.weight.copy_(up)
    reference.down_proj.weight.copy_(op.out.weight)
    x = torch.randn(2, 17, D_MODEL)
    expected = reference(x)
    error = ((op(x) - expected).abs().max() / expected.abs().max()).item()
    assert error <= TOLERANCE, f"relative error {error:.2e}, margin {TOLERANCE / max(error, 1e-30):.2g}x"
    stepped, _ = op.step(x[:, -1:], torch.full((2, 1), 16), {})
    error = ((stepped - expected[:, -1:]).abs().max() / expected.abs().max()).item()
    assert error <= TOLERANCE, f"step: relative error {error:.2e}, margin {TOLERANCE / max(error, 1e-30):.2g}x"
