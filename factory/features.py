"""Latency features of a genome: what a per-target latency model (profiles.latency_model) is fitted on.

The model is kernel-level, as in nn-Meter: a genome's latency is the sum of what each of its layers costs plus the
embedding and head, and a layer's cost depends on its operator family. So every per-layer quantity below is summed
per family, and the linear model learns one price per family and quantity (a family whose forms cost unlike each
other names a group per form, `LIVOperator.forms`: the convolution's short_conv and long_conv):

    layers_<f>  layers of family f: fixed cost per layer
    kops_<f>    thousands of tensor operations those layers dispatch in one prefill of `prompt_length` tokens (or
                one decode step), counted by running the compiled model once with random weights. On small models
                onnxruntime's time is mostly per-node overhead, and the exported graph has about one node per
                operation
    flops_<f>   their arithmetic: GFLOP of the prefill, MFLOP of one decode step at `decode_context`
    act_mb_<f>  prefill: what their intermediates for the prompt write (registry.traffic_elements: chunked
                scans, score matrices, convolutions' unrolled inputs and grouped projections' copies are bound by
                moving these, not by FLOPs)
    act_kb_<f>  decode: the same formula at one token, in KB (a long convolution's step reads its whole window)
    small_mb_<f>, large_mb_<f>
                prefill: MB those layers' operations write as PyTorch runs them (counted with the kops, outputs that
                are not views of an input), in tensors under SMALL_TENSOR_BYTES and in larger ones. A tensor that
                stays in a core's cache costs less per byte than one that streams through memory, and the run
                sees what the formulas of act_mb leave out (each elementwise operation, such as the terms of a
                series activation, and the copies of a head split); act_mb sees what PyTorch never writes (score
                matrices inside its fused attention, a convolution's unrolled input), so the model keeps both
    calls_<op>  thousands of calls of each ATen operator `op` in the whole prefill or decode step (counted with the
                kops), whatever family makes them. kops_<f> prices every operation of a family the same, but the
                graph onnxruntime runs does not: a GELU exports as several nodes (opset 18 has no Gelu), a slice or
                an unsqueeze becomes a node of its own while a transposed weight folds into the initializer. One
                price per operator corrects the family's average
    narrow_gflop_<f>
                prefill: GFLOP of those layers' matrix products (counted with the kops: matmuls and the two products
                of a fused attention) with a side under NARROW_PRODUCT_DIM: narrow heads, low-rank projections,
                small state sizes. onnxruntime's CPU GEMM works on panels of 16 output columns; a product with a
                side under 16 leaves part of a panel idle or does few multiply-adds for each output it stores, so
                it runs at a fraction of a wide product's FLOP rate, while flops_<f> prices every FLOP of a family
                the same. (A decode step's products are all one row.)
    shared_mb   prefill: intermediates computed once per graph whatever the number of layers using them
                (registry.shared_elements: one attention mask per distinct window and ALiBi slopes; the
                exported graph builds it once, and onnxruntime's profile shows the mask's nodes in the first
                layer that uses it only). A decode step's mask is one row, left to act_kb
    kops_head   operations of the embedding, final norm and logits
    weights_mb  weights read (a CPU decode step is mostly bound by reading weights and the cache)
    state_mb    the cache or recurrent state at that context

f runs over the registry's families plus `latent_cross` (the Perceiver-AR cross-attention layer). Everything but
the kops, calls and written MB come from the genome's formulas alone; those compile the model and run it once
(cached per genome).

One price per family and quantity has several times more coefficients to fit than one price per quantity, so with
few measurements the coarser model can predict better. The features therefore come in two VIEWS, "per_family" and
"pooled" (each group summed over the families, and no calls per operator: those add up to the pooled kops), and
the latency model keeps the view with the lower held-out error at every re-fit (bench/bench_latency.py reports
both).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from factory.genome.metrics import cache_bytes, layer_flops, param_count
from factory.genome.schema import Genome, GenomeError
from factory.ops import registry

FAMILIES = (*registry.forms(), "latent_cross")  # the feature groups: operator families or their forms
HEAD = "head"
# Where the written-MB features split "stays in cache" from "streams": 256 KB is within the L2 of a core on
# current CPUs (256 KB-2 MB); the exact split point matters little to held-out accuracy
# (bench/research/NOTES.md).
SMALL_TENSOR_BYTES = 256 * 1024
# Matrix products with a side under this are "narrow": narrower than one 16-column panel of the GEMM kernel
# (what the narrow term adds to held-out accuracy: bench/research/NOTES.md).
NARROW_PRODUCT_DIM = 16
_MATMULS = {torch.ops.aten.mm: (0, 1), torch.ops.aten.addmm: (1, 2), torch.ops.aten.bmm: (0, 1),
            torch.ops.aten.baddbmm: (1, 2)}  # the operands' positions; nn.Linear and matmul reach these


def _products(func, args) -> list[tuple[int, int, int, int]]:
    """(batch, m, n, k) of each matrix product an operator computes: [.., m, k] @ [.., k, n]."""
    packet = func.overloadpacket
    if packet in _MATMULS:
        a, b = (args[i] for i in _MATMULS[packet])
        batch = a.shape[0] if a.dim() == 3 else 1
        return [(batch, a.shape[-2], b.shape[-1], a.shape[-1])]
    if "scaled_dot_product" in packet.__name__ and len(args) >= 3:  # fused attention: scores q k^T, then scores v
        q, k, v = args[:3]
        heads = q.numel() // (q.shape[-2] * q.shape[-1])
        return [(heads, q.shape[-2], k.shape[-2], q.shape[-1]), (heads, q.shape[-2], v.shape[-1], k.shape[-2])]
    return []

_OPS_CACHE: dict[tuple[str, int], dict[str, dict]] = {}


class _CountOps(TorchDispatchMode):
    """Counts every operator call that reaches the dispatcher inside the `with` block, the elements of the new
    tensors it writes (small or large) and the FLOPs of its narrow matrix products, per model part: a forward
    pre-hook on each layer's norm (the first thing a layer runs) and on the final norm moves `part`."""

    def __init__(self):
        super().__init__()
        self.part: int | str = HEAD
        self.counts: dict[int | str, int] = {}
        self.written: dict[tuple[int | str, bool], int] = {}  # (part, small?) -> elements
        self.narrow: dict[int | str, int] = {}  # part -> FLOPs of products with a side under NARROW_PRODUCT_DIM
        self.calls: dict[str, int] = {}  # ATen operator name -> calls, all parts together

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.part] = self.counts.get(self.part, 0) + 1
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        for batch, m, n, k in _products(func, args):
            if min(m, n, k) < NARROW_PRODUCT_DIM:
                self.narrow[self.part] = self.narrow.get(self.part, 0) + 2 * batch * m * n * k
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for out in tree_leaves(result):
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:  # not a view
                key = (self.part, out.numel() * out.element_size() < SMALL_TENSOR_BYTES)
                self.written[key] = self.written.get(key, 0) + out.numel()
        return result


def dispatched_ops(genome: Genome, prompt_length: int) -> dict[str, dict]:
    """{"prefill": {"head": n, "layers": [n_0, n_1, ...], "small": [e_0, ...], "large": [e_0, ...],
    "narrow": [f_0, ...], "calls": {op: n}}, "decode": {...}}: operations of one prefill of `prompt_length` tokens
    (the model's context if it cannot take more) and of one decode step after it, the elements each layer writes in
    new tensors under and over SMALL_TENSOR_BYTES, the FLOPs of its narrow matrix products, and the calls of each
    ATen operator in the whole model. Cached per genome and length."""
    from factory.model import LIVModel
    from factory.threads import torch_threads

    key = (genome.hash(), int(prompt_length))
    if key not in _OPS_CACHE:
        torch.manual_seed(0)
        model = LIVModel(genome).eval()
        counter = _CountOps()
        hooks = [norm.register_forward_pre_hook(lambda *_, i=i: setattr(counter, "part", i))
                 for i, norm in enumerate(model.norms)]
        hooks.append(model.final_norm.register_forward_pre_hook(lambda *_: setattr(counter, "part", HEAD)))

        def count(run) -> dict:
            counter.part, counter.counts, counter.written, counter.narrow, counter.calls = HEAD, {}, {}, {}, {}
            with counter:
                result = run()
            layers = range(genome.n_layers)
            return result, {"head": counter.counts.get(HEAD, 0), "layers": [counter.counts.get(i, 0) for i in layers],
                            "small": [counter.written.get((i, True), 0) for i in layers],
                            "large": [counter.written.get((i, False), 0) for i in layers],
                            "narrow": [counter.narrow.get(i, 0) for i in layers], "calls": dict(counter.calls)}

        def both(length: int) -> dict:
            ids = torch.zeros(1, max(2, length), dtype=torch.long)
            with torch.no_grad(), torch_threads(1):
                (_, state), prefill = count(lambda: model.prefill(ids))
                position = torch.full((1, 1), ids.shape[1], dtype=torch.long)
                _, decode = count(lambda: model.step(ids[:, :1], position, state))
            return {"prefill": prefill, "decode": decode}

        try:
            try:
                _OPS_CACHE[key] = both(int(prompt_length))
            except (RuntimeError, ValueError, IndexError):  # a model that cannot take prompts beyond its context
                _OPS_CACHE[key] = both(genome.context)
        finally:
            for h in hooks:
                h.remove()
    return _OPS_CACHE[key]


def layer_family(genome: Genome, i: int) -> str:
    return "latent_cross" if genome.latents and i == 0 else registry.form(genome.layer_spec(i))


def layer_counts(genome: Genome) -> dict[str, float]:
    counts = {f"layers_{f}": 0.0 for f in FAMILIES}
    for i in range(genome.n_layers):
        counts[f"layers_{layer_family(genome, i)}"] += 1.0
    return counts


PER_FAMILY_GROUPS = ("layers", "kops", "flops", "act_mb", "act_kb", "small_mb", "large_mb", "narrow_gflop")
_GROUP_OF = {f"{group}_{family}": group for group in PER_FAMILY_GROUPS for family in FAMILIES}


def pooled(features: dict[str, float]) -> dict[str, float]:
    """The per-family groups summed over the families (`kops_head`, weights, state and shared unchanged), without
    the calls per operator: a view with few prices, for few measurements."""
    out: dict[str, float] = {}
    for name, value in features.items():
        if name.startswith("calls_"):
            continue
        group = _GROUP_OF.get(name, name)
        out[group] = out.get(group, 0.0) + value
    return out


VIEWS = {"per_family": lambda features: features, "pooled": pooled}


def latency_features(genome: Genome, metric: str, prompt_length: int, decode_context: int, bytes_per_weight: int = 4,
                     view: str = "per_family") -> dict[str, float]:
    """Features for `metric` = "decode" (one token at `decode_context`) or "prefill" (`prompt_length` tokens)."""
    if metric not in ("decode", "prefill"):
        raise ValueError(f"unknown latency metric {metric!r} (decode | prefill)")
    if view not in VIEWS:
        raise ValueError(f"unknown feature view {view!r} ({' | '.join(VIEWS)})")
    ops = dispatched_ops(genome, prompt_length)[metric]
    if metric == "prefill":  # GFLOP of each layer over the prompt; MB its intermediates write
        flops = [f.prefill * prompt_length / 1e9 for f in layer_flops(genome, prompt_length)]
        act, tokens, act_unit = "act_mb", int(prompt_length), 1e6
    else:  # MFLOP of each layer's decode step; KB its intermediates write
        flops = [f.decode / 1e6 for f in layer_flops(genome, decode_context)]
        act, tokens, act_unit = "act_kb", 1, 1e3
    # a decode step's tensors are all small and its products all one row: these describe the prefill only
    written = ("small_mb", "large_mb") if metric == "prefill" else ()
    narrow = ("narrow_gflop",) if metric == "prefill" else ()
    features = {**layer_counts(genome),
                **{f"{g}_{f}": 0.0 for g in ("kops", "flops", act, *written, *narrow) for f in FAMILIES}}
    shared: dict[tuple, int] = {}
    for i in range(genome.n_layers):
        family = layer_family(genome, i)
        features[f"kops_{family}"] += ops["layers"][i] / 1000.0
        features[f"flops_{family}"] += flops[i]
        elements = registry.traffic_elements(genome.d_model, genome.layer_spec(i), tokens)
        features[f"{act}_{family}"] += elements * bytes_per_weight / act_unit
        for group in written:
            features[f"{group}_{family}"] += ops[group.split("_")[0]][i] * bytes_per_weight / 1e6
        for group in narrow:
            features[f"{group}_{family}"] += ops["narrow"][i] / 1e9
        shared.update(registry.shared_elements(genome.d_model, genome.layer_spec(i), tokens))
    if metric == "prefill":
        features["shared_mb"] = sum(shared.values()) * bytes_per_weight / 1e6
    context = prompt_length if metric == "prefill" else decode_context
    features.update({f"calls_{op}": n / 1000.0 for op, n in sorted(ops["calls"].items())})
    features.update({"kops_head": ops["head"] / 1000.0,
                     "weights_mb": param_count(genome) * bytes_per_weight / 1e6,
                     "state_mb": cache_bytes(genome, context) / 1e6})
    return VIEWS[view](features)


def featurizer(target):
    """The latency loop's `featurize(genome or its dict, metric) -> {view: features}` (profiles.latency) at the
    target's prompt length and decode context; None for a stored genome of an older schema (its operators changed
    meaning)."""

    def featurize(genome, metric: str) -> dict | None:
        if isinstance(genome, dict):
            try:
                genome = Genome.from_dict(genome)
            except GenomeError:
                return None
        features = latency_features(genome, metric, target.prompt_length, target.decode_context)
        return {name: view(features) for name, view in VIEWS.items()}

    return featurize
