"""Softmax attention checked against implementations this project did not write.

References (transformers 4.57, eager attention):
- `LlamaAttention` (transformers/models/llama/modeling_llama.py): MHA / GQA / MQA with rotate-half RoPE;
- `DiffLlamaAttention` (transformers/models/diffllama/modeling_diffllama.py): the Differential Transformer
  (Ye et al. 2024, arXiv 2410.05258) as transformers lays it out, with its depth-dependent lambda_init.
Each is built from its config and our random weights are copied in (q_proj, k_proj, v_proj, o_proj = our `out`,
the four lambda vectors).

RoPE convention: our Rotary (factory/ops/common.py) rotates the interleaved pairs (2i, 2i+1) of a head by
frequency i; Llama rotates (i, i + dh/2). They differ by a fixed permutation of each head's dims, so the
references get our q/k weight rows permuted (perm = [0, 2, ..., dh - 2, 1, 3, ..., dh - 1] within every head);
scores are unchanged when q and k are permuted alike, and values / outputs are not permuted. Same base (10000).
No positions and ALiBi: the reference gets cos = 1, sin = 0 (no rotation).
Sliding windows and ALiBi go to the reference as its additive attention mask, [1, H, T, T]: -inf outside
j <= i, i - W < j, and -slope_h (i - j) inside: the dense masked definition, against which our blocked windowed
form (query blocks against W + L - 1 gathered keys) is compared.

Also here: the differential form's decode parity beyond the registry sweep's one-field-at-a-time variants
(windows, GQA/MQA, ALiBi, none), its cache equal to plain attention's, feature and featurizer sharing, and the
windowed form's ONNX export with a dynamic length with no [T, T] tensor in the graph.
"""

import math

import pytest
import torch

from factory.ops import registry
from factory.ops.attention import BLOCK, lambda_init

D = 64
T = 150  # not a multiple of any block length: the blocked form pads
TOL = 1e-4  # float32 against float32; the errors seen are ~1e-6 (printed margin on failure)


def _spec(**kw):
    return registry.default_spec("attention").with_(**kw)


def _ours(spec, layer=0, seed=0):
    torch.manual_seed(seed)
    op = registry.build_operator(D, spec, layer=layer).eval()
    with torch.no_grad():
        for name, p in op.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if name in ("lambda_q1", "lambda_k1"):
                p.add_(0.15)  # lambda_1 - lambda_2 well away from 0: the learned part of lambda is exercised
    return op


def _perm(dh):
    return torch.cat([torch.arange(0, dh, 2), torch.arange(1, dh, 2)])


def _rows(weight, heads, dh, rope):
    """Our q/k rows in the reference's RoPE order (a per-head permutation of dims)."""
    if not rope:
        return weight
    return weight.view(heads, dh, -1)[:, _perm(dh)].reshape(heads * dh, -1)


def _mask(spec, t):
    idx = torch.arange(t)
    dist = (idx.unsqueeze(1) - idx.unsqueeze(0)).float()
    allowed = dist >= 0
    if spec.window:
        allowed &= dist < spec.window
    bias = torch.zeros(spec.heads, t, t)
    if spec.positional == "alibi":
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / spec.heads) for h in range(spec.heads)])
        bias = -slopes.view(-1, 1, 1) * dist
    return torch.where(allowed, bias, torch.tensor(float("-inf"))).unsqueeze(0)  # [1, H, T, T]


def _reference(op, spec, layer, x):
    from transformers.models.diffllama import modeling_diffllama as dl
    from transformers.models.llama import modeling_llama as ll

    heads, kv, dh = spec.heads, spec.heads // spec.kv_repeat, D // spec.heads
    config_cls, attn_cls, rotary_cls = (
        (dl.DiffLlamaConfig, dl.DiffLlamaAttention, dl.DiffLlamaRotaryEmbedding) if spec.differential
        else (ll.LlamaConfig, ll.LlamaAttention, ll.LlamaRotaryEmbedding))
    config = config_cls(hidden_size=D, num_attention_heads=heads, num_key_value_heads=kv, head_dim=dh,
                        attention_bias=False, attention_dropout=0.0, rope_theta=10000.0, max_position_embeddings=512)
    config._attn_implementation = "eager"
    ref = attn_cls(config, layer_idx=layer).eval()
    rope = spec.positional == "rope"
    with torch.no_grad():
        ref.q_proj.weight.copy_(_rows(op.q_proj.weight, heads, dh, rope))
        ref.k_proj.weight.copy_(_rows(op.k_proj.weight, kv, dh, rope))
        ref.v_proj.weight.copy_(op.v_proj.weight)
        ref.o_proj.weight.copy_(op.out.weight)
        if spec.differential:
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(ref, name).copy_(getattr(op, name))
        t = x.shape[1]
        if rope:
            cos, sin = rotary_cls(config=config)(x, torch.arange(t).unsqueeze(0))
        else:
            cos, sin = torch.ones(1, t, dh), torch.zeros(1, t, dh)
        return ref(x, position_embeddings=(cos, sin), attention_mask=_mask(spec, t))[0]


def _check(got, want, what):
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{what}: max abs diff {err:.2e}, tolerance {TOL:.0e} (margin {TOL / max(err, 1e-30):.1f}x)"
    return err


PLAIN = [  # heads, kv_repeat, positional, window
    (4, 1, "rope", 0), (4, 2, "rope", 0), (4, 4, "rope", 0), (8, 2, "none", 0), (4, 1, "alibi", 0),
    (4, 2, "rope", 16), (2, 1, "alibi", 16), (4, 4, "none", 32), (8, 2, "alibi", 128), (4, 1, "rope", 256),
]
DIFFERENTIAL = [
    (4, 1, "rope", 0), (4, 2, "rope", 0), (4, 4, "rope", 0), (8, 2, "rope", 0), (8, 8, "alibi", 0), (2, 1, "none", 0),
    (4, 2, "rope", 16), (2, 1, "none", 16), (8, 4, "alibi", 32), (8, 2, "rope", 128),
]


def _label(case):
    h, r, pos, w = case
    return f"h{h}-kvrep{r}-{pos}-w{w}"


@pytest.mark.parametrize("case", PLAIN, ids=_label)
@torch.no_grad()
def test_attention_matches_llama_attention(case):
    """MHA / GQA / MQA against LlamaAttention; windows and ALiBi against its dense masked attention."""
    heads, rep, positional, window = case
    spec = _spec(heads=heads, kv_repeat=rep, positional=positional, window=window)
    op = _ours(spec)
    torch.manual_seed(1)
    x = torch.randn(2, T, D)
    _check(op(x), _reference(op, spec, 0, x), _label(case))


@pytest.mark.parametrize("case", DIFFERENTIAL, ids=_label)
@torch.no_grad()
def test_differential_matches_diffllama_attention(case):
    """The differential form against DiffLlamaAttention at layers 0 and 5 (lambda_init 0.2 and 0.67)."""
    heads, rep, positional, window = case
    spec = _spec(heads=heads, kv_repeat=rep, positional=positional, window=window, differential=True)
    torch.manual_seed(1)
    x = torch.randn(2, T, D)
    for layer in (0, 5):
        op = _ours(spec, layer=layer)
        assert op.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * layer))
        lam = op._lambda().item()
        assert abs(lam - op.lambda_init) > 0.05  # the learned part of lambda is exercised
        _check(op(x), _reference(op, spec, layer, x), f"{_label(case)} layer {layer}")


def test_lambda_init_is_the_papers_depth_schedule():
    # 0.8 - 0.6 exp(-0.3 (l - 1)) for the 1-based layer l: 0.2 at the first layer, rising towards 0.8.
    assert lambda_init(0) == pytest.approx(0.2)
    assert lambda_init(3) == pytest.approx(0.8 - 0.6 * math.exp(-0.9))
    assert lambda_init(40) == pytest.approx(0.8, abs=1e-5)


def _decode(op, x, prompt, reuse_from=None):
    y0, state = op.prefill(x[:, :prompt])
    outs = [y0]
    for t in range(prompt, x.shape[1]):
        pos = torch.full((x.shape[0], 1), t, dtype=torch.long)
        y, state = op.step(x[:, t : t + 1], pos, state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("case", DIFFERENTIAL[1:] + [(4, 1, "alibi", 16), (4, 4, "rope", 16)], ids=_label)
@torch.no_grad()
def test_differential_decode_matches_parallel_form(case):
    heads, rep, positional, window = case
    spec = _spec(heads=heads, kv_repeat=rep, positional=positional, window=window, differential=True)
    op = _ours(spec, layer=2)
    torch.manual_seed(2)
    length = 2 * window + 7 if window else 40
    x = torch.randn(2, length, D)
    full = op(x)
    for prompt in (1, 7):
        stepped, state = _decode(op, x, prompt)
        _check(stepped, full, f"{_label(case)} prompt {prompt}")
    assert {k: tuple(v.shape) for k, v in state.items()} == registry.state_shapes(D, spec, 2, length)


@pytest.mark.parametrize("case", [(4, 1, "rope", 0), (8, 2, "alibi", 0), (4, 4, "none", 16), (8, 4, "rope", 32)],
                         ids=_label)
@torch.no_grad()
def test_differential_cache_is_plain_attentions(case):
    """Same head count, same k/v weights: the differential form's state shapes and cached keys/values are plain
    attention's, exactly."""
    heads, rep, positional, window = case
    plain = _spec(heads=heads, kv_repeat=rep, positional=positional, window=window)
    diff = plain.with_(differential=True)
    for context in (5, 64):
        assert registry.state_shapes(D, diff, 3, context) == registry.state_shapes(D, plain, 3, context)
    a, b = _ours(plain), _ours(diff, layer=4)
    b.k_proj.weight.copy_(a.k_proj.weight)
    b.v_proj.weight.copy_(a.v_proj.weight)
    x = torch.randn(3, 21, D)
    sa, sb = a.prefill(x)[1], b.prefill(x)[1]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("differential", [False, True])
@pytest.mark.parametrize("window", [0, 16])
@torch.no_grad()
def test_feature_consumer_attends_over_the_producers_keys_and_values(differential, window):
    """A consumer (no k/v projections, no state) equals an ordinary layer with the producer's k/v weights and its
    own q / lambdas / output, in the parallel form and step by step."""
    spec = _spec(heads=4, kv_repeat=2, positional="rope", window=window, differential=differential)
    producer = _ours(spec, layer=0, seed=0)
    torch.manual_seed(3)
    consumer = registry.build_operator(D, spec, reuse_features=True, layer=1).eval()
    plain = _ours(spec, layer=1, seed=5)
    plain.load_state_dict({**consumer.state_dict(), "k_proj.weight": producer.k_proj.weight,
                           "v_proj.weight": producer.v_proj.weight})
    assert consumer.k_proj is None and consumer.v_proj is None
    x = torch.randn(2, 45, D)
    bus: dict = {}
    producer(x, publish=bus)
    _check(consumer(x, reuse=bus), plain(x), "parallel")
    _, pstate = producer.prefill(x[:, :9], publish={})
    outs = []
    for t in range(9, 45):
        bus = {}
        pos = torch.full((2, 1), t, dtype=torch.long)
        _, pstate = producer.step(x[:, t : t + 1], pos, pstate, publish=bus)
        y, cstate = consumer.step(x[:, t : t + 1], pos, {}, reuse=bus)
        assert cstate == {}
        outs.append(y)
    _check(torch.cat(outs, 1), plain(x)[:, 9:], "step")


def test_featurizer_sharing_shares_q_and_k_only():
    """Featurizer sets of producers and of feature consumers: later members use the first member's W_q (and W_k
    where it has one), keep their own values, lambdas and output; the model's parameters are what the genome's
    count says (registry.featurizer_params)."""
    from factory.genome.metrics import param_count
    from factory.genome.schema import Genome, LayerGene
    from factory.model import LIVModel

    attn = _spec(heads=4, kv_repeat=2, differential=True)
    layers = (LayerGene(0, share="featurizer"), LayerGene(0, share="featurizer"),  # producers, one featurizer set
              LayerGene(1, features="reuse"),  # a producer of keys/values for the consumers below
              LayerGene(1, features="reuse", share="featurizer", tie_group=1),
              LayerGene(1, features="reuse", share="featurizer", tie_group=1))
    genome = Genome(d_model=D, classes=(attn, attn.with_(window=16)), layers=layers, context=64).validate()
    assert genome.featurizer_owner() == [0, 0, 2, 3, 3]
    model = LIVModel(genome)
    ops = [model.op(i) for i in range(5)]
    assert ops[1].q_proj is ops[0].q_proj and ops[1].k_proj is ops[0].k_proj
    assert ops[1].v_proj is not ops[0].v_proj and ops[1].out is not ops[0].out
    assert ops[4].q_proj is ops[3].q_proj and ops[4].k_proj is None and ops[4].out is not ops[3].out
    assert sum(p.numel() for p in model.parameters()) == param_count(genome)
    for op, reuse in ((ops[0], False), (ops[3], True)):
        owned = sum(p.numel() for name in type(op).featurizer if getattr(op, name) is not None
                    for p in getattr(op, name).parameters())
        assert owned == registry.featurizer_params(D, op.spec, reuse_features=reuse)
    x = torch.randint(0, 256, (2, 30))
    assert torch.isfinite(model(x)).all()


@torch.no_grad()
def test_windowed_form_exports_blocked_with_a_dynamic_length(tmp_path):
    """The windowed (and differential windowed, ALiBi) parallel form through the project's exporter with a dynamic
    length: onnxruntime matches PyTorch at lengths the trace did not see, and no intermediate of the graph has T^2
    elements (every value is exposed as an output and measured at T = 1000)."""
    import onnx
    import onnxruntime as ort
    from onnx import shape_inference
    from torch.export import Dim

    from export.onnx_export import DEFAULT_OPSET, MAX_DIM, _export

    class Prefill(torch.nn.Module):
        def __init__(self, op):
            super().__init__()
            self.op = op

        def forward(self, x):
            return self.op(x)

    spec = _spec(heads=4, kv_repeat=2, positional="alibi", window=16, differential=True)
    op = _ours(spec, layer=1)
    path = tmp_path / "window.onnx"
    _export(Prefill(op), (torch.randn(1, 37, D),), path, ["x"], ["y"],
            {"x": {1: Dim("sequence", min=2, max=MAX_DIM)}}, DEFAULT_OPSET)
    model = onnx.load(str(path))
    inferred = shape_inference.infer_shapes(model)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(v for v in inferred.graph.value_info if v.name not in known)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for t in (1, 5, 16, 77, 1000):
        x = torch.randn(1, t, D)
        values = session.run(None, {"x": x.numpy()})
        _check(torch.from_numpy(values[0]), op(x), f"onnxruntime T={t}")
        if t == 1000:
            largest = max(v.size for v in values)
            assert largest < t * t / 4, f"an intermediate has {largest} elements at T={t}"


def test_genome_show_reports_a_differential_transformer_cache_equal_to_plain_attention(tmp_path):
    """`factory genome show` on transformer++ with its attention made differential: the same cache bytes at the
    target's context, and exactly the lambda vectors (4 dh per attention layer) more parameters."""
    import json
    import subprocess
    import sys
    from dataclasses import replace

    from factory.genome.references import reference_genomes

    plain = reference_genomes()["transformer++"]
    classes = tuple(c.with_(differential=True) if c.family == "attention" else c for c in plain.classes)
    diff = replace(plain, classes=classes, name="diff-transformer")
    path = tmp_path / "diff.json"
    path.write_text(diff.to_json())

    def show(genome):
        proc = subprocess.run([sys.executable, "-m", "factory", "genome", "show", genome, "--json", "--seq-len", "512"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    a, b = show("transformer++"), show(str(path))
    assert b["cache_bytes"] == a["cache_bytes"] > 0
    attention_layers = sum(plain.layer_spec(i).family == "attention" for i in range(plain.n_layers))
    head_dim = plain.d_model // classes[0].heads
    assert b["params"] - a["params"] == attention_layers * 4 * head_dim
