"""torch -> ONNX: the dynamo exporter, single-file models, standard ops only.

Both graphs are captured with `torch.export` (non-strict, exactly the declared dynamic axes) and translated by
`torch.onnx.export(dynamo=True, external_data=False)`. Symbolic axes: `batch` everywhere, `sequence` for the
prompt, and one `past_sequence` shared by every growing cache of the decode graph (they all hold one entry per
consumed token, so one symbol states that they are equal).

When a capture fails, `diagnose` exports each layer's operator alone with the same dynamic axes, so the message
names the layer, the family and the guard instead of a trace through the whole model. See `export_graphs` for
what happens after a shape-guard failure (a warning and parity, never a silently specialised graph).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.export import Dim

from export.graphs import (
    DecodeGraph,
    PrefillGraph,
    StateTensor,
    check_state_matches,
    torch_threads,
    input_names,
    output_names,
)
from factory.errors import FactoryError
from factory.model import LIVModel
from factory.ops import registry
from export.quiet import quiet

DEFAULT_OPSET = 18
# Domains a portable graph may use: the default ONNX domain ("" or its alias "ai.onnx").
STANDARD_DOMAINS = {"", "ai.onnx"}
FORBIDDEN_OPS = {"DFT", "STFT"}  # FFT has no CUDA kernel and older ORT refuses the inverse one-sided form
MAX_SINGLE_FILE = 2**31 - 1  # protobuf's limit for a single-file model
# Example sizes for tracing: not 0 or 1 (which torch.export specialises), and unlike any fixed model dimension.
EXAMPLE_BATCH, EXAMPLE_LENGTH = 2, 37
MAX_DIM = 1 << 20
TRACED_MIN_SIZE = 2  # see _dims


@dataclass(frozen=True)
class ExportedGraphs:
    prefill: Path
    decode: Path
    opset: int
    warnings: list[str] = field(default_factory=list)


def _dims():
    """Traced ranges start at 2: torch.export specialises sizes 0 and 1, and many ordinary ops (a reshape after
    a transpose, SDPA) guard on `size != 1`. The ONNX graphs carry no such bound, and parity checks batch 1,
    prompt length 1 and a one-token past numerically instead."""
    return (
        Dim("batch", min=TRACED_MIN_SIZE, max=MAX_DIM),
        Dim("sequence", min=TRACED_MIN_SIZE, max=MAX_DIM),
        Dim("past_sequence", min=TRACED_MIN_SIZE, max=MAX_DIM),
    )


def _quiet():
    """The exporter prints progress lines and warns about torchvision; keep stdout for --json.

    torch logs every failed guard at ERROR with a full trace; the FactoryError says what failed, once."""
    return quiet(("torch", "onnxscript", "onnx_ir"), logging.CRITICAL)


def capture(module: nn.Module, args: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    """torch.export, non-strict, exactly as asked.

    torch.onnx.export would, on a shape-constraint error, retry with the exporter's "suggested fixes" (a smaller
    range or a fixed length) and succeed with a graph that is silently specialised; capturing here first makes
    such an operator fail, with its guard in the message. The size-oblivious setting is the one the ONNX
    exporter itself uses, so lengths of 0/1 do not get special cases.
    """
    config = torch.fx.experimental._config
    patch = config.patch(backed_size_oblivious=True) if hasattr(config, "backed_size_oblivious") else contextlib.nullcontext()
    with patch:
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def _export(module: nn.Module, args: tuple, path: Path, names_in, names_out, dynamic_shapes, opset: int,
            refine: bool = False) -> None:
    """Capture strictly (see `capture`), or with refine=True let torch.onnx.export narrow the ranges itself."""
    with _quiet(), torch.no_grad(), torch_threads(1):
        common = dict(dynamo=True, external_data=False, opset_version=opset, input_names=names_in,
                      output_names=names_out, optimize=True, verbose=False)
        if refine:
            torch.onnx.export(module, args, str(path), dynamic_shapes=dynamic_shapes, **common)
        else:
            torch.onnx.export(capture(module, args, dynamic_shapes), args, str(path), **common)


def _is_shape_guard(e: BaseException) -> bool:
    while e is not None:
        text = str(e)
        if "Constraints violated" in text or "Specializations unexpectedly required" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def example_inputs(model: LIVModel, layout: list[StateTensor], seed: int = 0):
    """A prompt and the decode inputs that follow it (the state from a real prefill)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.genome.vocab_size, (EXAMPLE_BATCH, EXAMPLE_LENGTH), generator=gen)
    with torch.no_grad():
        _, state = model.prefill(ids)
    check_state_matches(layout, state, EXAMPLE_BATCH, EXAMPLE_LENGTH, "prefill")
    past = tuple(state[s.name] for s in layout)
    new_id = torch.randint(0, model.genome.vocab_size, (EXAMPLE_BATCH, 1), generator=gen)
    position = torch.full((EXAMPLE_BATCH, 1), EXAMPLE_LENGTH, dtype=torch.long)
    with torch.no_grad():
        _, stepped = model.step(new_id, position, dict(zip([s.name for s in layout], past)))
    check_state_matches(layout, stepped, EXAMPLE_BATCH, EXAMPLE_LENGTH + 1, "step")
    return ids, (new_id, position, *past)


def export_graphs(model: LIVModel, layout: list[StateTensor], out_dir: Path, opset: int = DEFAULT_OPSET) -> ExportedGraphs:
    """Write prefill.onnx and decode.onnx into out_dir; raise FactoryError naming the failing operator.

    A graph whose tracing needs a shape guard over the declared range (e.g. Perceiver-AR's min(sequence,
    latents)) is exported by torch.onnx's own path, which narrows the traced range, but only if its inputs keep
    their symbolic axes; the guard and the culprit are returned as warnings for the manifest, and the caller's
    parity run (prompt lengths across every window and latent boundary) decides whether the graph is right.
    """
    model.eval()
    batch, sequence, past_sequence = _dims()
    ids, decode_args = example_inputs(model, layout)
    past_shapes = tuple({0: batch, **({s.growing_axis: past_sequence} if s.grows else {})} for s in layout)
    jobs = {
        "prefill": (PrefillGraph(model, layout), (ids,), {"input_ids": {0: batch, 1: sequence}},
                    {"input_ids": ["batch", "sequence"]}),
        "decode": (DecodeGraph(model, layout), decode_args,
                   {"input_ids": {0: batch}, "position_ids": {0: batch}, **({"past": past_shapes} if layout else {})},
                   {"input_ids": ["batch", 1], "position_ids": ["batch", 1],
                    **{f"past.{s.name}": list(s.shape) for s in layout}}),
    }
    # The logits' length axis: the prompt's for prefill (Perceiver-AR: min(sequence, latents), named
    # sequence_out as in docs/artifact.md), always 1 for decode.
    logits_length = {"prefill": "sequence_out" if model.genome.latents else "sequence", "decode": 1}
    warnings_: list[str] = []
    paths = {}
    for graph, (module, args, dynamic, symbolic) in jobs.items():
        path = paths[graph] = out_dir / f"{graph}.onnx"
        names = (input_names(layout, graph), output_names(layout))
        error = None
        try:
            _export(module, args, path, *names, dynamic, opset)
        except Exception as e:  # the exporter raises many types; all of them mean "this graph does not export"
            error = e
        if error is not None:
            culprit = diagnose(model, layout, graph, error)  # outside the except: see diagnose
            if not _is_shape_guard(error):
                raise FactoryError(culprit)
            try:
                _export(module, args, path, *names, dynamic, opset, refine=True)
                name_symbolic_axes(path, symbolic, logits_length[graph])
                check_symbolic_inputs(path, symbolic)
            except Exception:
                raise FactoryError(culprit) from None
            warnings_.append(f"{culprit} (exported with torch.onnx's narrowed trace instead; parity decides)")
        name_symbolic_axes(path, symbolic, logits_length[graph])
        reciprocal_as_div(path)
        check_portable(path, expect_inputs=names[0], expect_outputs=names[1])
        check_symbolic_inputs(path, symbolic)
    return ExportedGraphs(paths["prefill"], paths["decode"], opset, warnings_)


def name_symbolic_axes(path: Path, expected: dict[str, list], logits_length: str | int) -> None:
    """Give the exporter's symbols (s70, s72 + 1...) the artifact's names (sequence, past_sequence + 1...).

    The symbols are read off the graph inputs, where each one sits on an axis the artifact names; the logits'
    length axis, an expression of them, gets `logits_length`."""
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if value.name == "logits" and len(dims) == 3 and dims[1].dim_param:
            if isinstance(logits_length, int):
                dims[1].dim_value = logits_length
            else:
                dims[1].dim_param = logits_length
    rename: dict[str, str] = {}
    for value in model.graph.input:
        for dim, want in zip(value.type.tensor_type.shape.dim, expected.get(value.name, [])):
            if dim.dim_param and isinstance(want, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", dim.dim_param):
                rename.setdefault(dim.dim_param, want)
    if rename:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
        for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)
    onnx.save(model, str(path))


def reciprocal_as_div(path: Path) -> int:
    """Rewrite Reciprocal(y) as Div(1, y): the same IEEE result, in the form onnxruntime's fusions match.

    The dynamo exporter writes rsqrt as Reciprocal(Sqrt(.)), and onnxruntime's SimplifiedLayerNormalization
    (RMSNorm) fusion only recognises Div(., Sqrt(.)): without this every RMSNorm stays five separate kernels
    (the TorchScript exporter, used by optimum, writes Div). A graph-level rewrite; operators are not involved.
    """
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "Reciprocal" and n.domain in STANDARD_DOMAINS]
    if not nodes:
        return 0
    one = "reciprocal_as_div_one"
    model.graph.initializer.append(onnx.helper.make_tensor(one, onnx.TensorProto.FLOAT, [], [1.0]))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    for node in nodes:
        if types.get(node.input[0], onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            continue  # only float32 graphs are exported; leave anything else alone
        node.op_type = "Div"
        node.input[:] = [one, node.input[0]]
    onnx.save(model, str(path))
    return len(nodes)


def check_symbolic_inputs(path: Path, expected: dict[str, list]) -> None:
    """The graph's inputs keep their symbolic axes (a specialised axis would be a fixed number here)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for value in graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name in expected and dims != expected[value.name]:
            raise FactoryError(f"{path.name}: input {value.name} has shape {dims}, expected {expected[value.name]}")


def runtime_specific_ops(path: Path) -> list[str]:
    """Op types that are not ONNX standard: other domains, and onnxruntime's internal ops that it registers in
    the default domain (SimplifiedLayerNormalization, after its RMSNorm fusion)."""
    model = onnx.load(str(path), load_external_data=False)
    return sorted({
        f"{n.domain}.{n.op_type}" if n.domain not in STANDARD_DOMAINS else n.op_type
        for n in _all_nodes(model.graph)
        if n.domain not in STANDARD_DOMAINS or not onnx.defs.has(n.op_type)
    })


def check_portable(path: Path, expect_inputs=None, expect_outputs=None, allowed_domains=STANDARD_DOMAINS) -> dict:
    """Single file, under 2 GB, only `allowed_domains` (and, in the default domain, only ONNX standard ops
    unless other domains are allowed), no FFT, the expected names. Returns op statistics."""
    if path.with_name(path.name + ".data").exists():
        raise FactoryError(f"{path.name}: the exporter wrote external data; the artifact must be single files")
    size = path.stat().st_size
    if size > MAX_SINGLE_FILE:
        raise FactoryError(f"{path.name}: {size} bytes is over the 2 GB single-file limit")
    model = onnx.load(str(path), load_external_data=False)
    ops, domains = {}, set()
    for node in _all_nodes(model.graph):
        domains.add(node.domain)
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.domain not in allowed_domains:
            raise FactoryError(f"{path.name}: node {node.name} ({node.op_type}) is in the non-standard domain {node.domain!r}")
        if allowed_domains == STANDARD_DOMAINS and not onnx.defs.has(node.op_type):
            raise FactoryError(f"{path.name}: node {node.name} ({node.op_type}) is not a standard ONNX op")
        if node.op_type in FORBIDDEN_OPS:
            raise FactoryError(f"{path.name}: node {node.name} is an FFT ({node.op_type}); use a causal Conv instead")
    if expect_inputs is not None:
        got = [i.name for i in model.graph.input]
        if got != list(expect_inputs):
            raise FactoryError(f"{path.name}: inputs are {got}, expected {list(expect_inputs)}")
    if expect_outputs is not None:
        got = [o.name for o in model.graph.output]
        if got != list(expect_outputs):
            raise FactoryError(f"{path.name}: outputs are {got}, expected {list(expect_outputs)}")
    return {"nodes": sum(ops.values()), "op_types": dict(sorted(ops.items())), "domains": sorted(d or "ai.onnx" for d in domains)}


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


# -- failure diagnosis -----------------------------------------------------------------------------------------
class _LayerPrefill(nn.Module):
    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor):
        y, state = self.op.prefill(x)
        return (y, *state.values())


class _LayerStep(nn.Module):
    def __init__(self, op: nn.Module, kinds: list[str]):
        super().__init__()
        self.op, self.kinds = op, kinds

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        y, state = self.op.step(x, position_ids, dict(zip(self.kinds, past)))
        return (y, *(state[k] for k in self.kinds))


_GUARD = re.compile(
    r"Not all values of (?P<dim>\w+) = (?P<expr>\S+) in the specified range .*? satisfy the generated guard (?P<guard>.+?)\.?$"
)


def root_cause(e: BaseException) -> str:
    """The innermost exception of the chain on one line; shape guards as `guard <expr>` in the axis names."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    guards = []
    for line in lines:
        match = _GUARD.search(line)
        if match:
            guards.append(f"guard {match['guard'].replace(match['expr'], match['dim'])}")
        elif "Specializations unexpectedly required" in line or line.startswith("- solving the guards"):
            guards.append(line.lstrip("- "))
    text = "; ".join(dict.fromkeys(guards)) if guards else " ".join(lines[:3])
    return f"{type(e).__name__}: {' '.join(text.split())[:1200]}"


def _describe(spec) -> str:
    """form(gene=value, ...) with the genes that differ from the defaults of the family's form."""
    form = registry.form(spec)
    base = registry.default_spec(form).to_dict()
    changed = [f"{k}={v}" for k, v in spec.to_dict().items() if k != "family" and v != base.get(k)]
    return f"{form}({', '.join(changed)})"


def diagnose(model: LIVModel, layout: list[StateTensor], graph: str, error: Exception) -> str:
    """Find the first layer whose operator alone fails to export `graph` with dynamic axes, and say why.

    Layers that cannot run alone (feature consumers, the Perceiver-AR cross-attention) are skipped; if no layer
    fails alone, the message gives the whole graph's guard (for Perceiver-AR it names the latent window).
    Call it outside the `except` block of `error`, or every layer's failure would chain back to `error`."""
    scratch = Path(tempfile.mkdtemp(prefix="factory-diagnose-"))
    try:
        return _diagnose_layers(model, layout, graph, error, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _diagnose_layers(model: LIVModel, layout: list[StateTensor], graph: str, error: Exception, scratch: Path) -> str:
    genome = model.genome
    batch, sequence, past_sequence = _dims()
    owner, source = genome.weight_owner(), genome.feature_source()
    seen = set()
    for i in range(genome.n_layers):
        spec = genome.layer_spec(i)
        if owner[i] in seen or source[i] is not None or (genome.latents and i == 0):
            continue  # shared modules are tried once; consumers and the Perceiver layer need the whole model
        seen.add(owner[i])
        op = model.op(i)
        x = torch.randn(EXAMPLE_BATCH, EXAMPLE_LENGTH, genome.d_model)
        try:
            if graph == "prefill":
                _export(_LayerPrefill(op), (x,), scratch / "layer.onnx", None, None, {"x": {0: batch, 1: sequence}}, DEFAULT_OPSET)
            else:
                with torch.no_grad():
                    _, state = op.prefill(x)
                kinds = list(state)
                axis = {s.kind: s.growing_axis for s in layout if s.layer == i}
                shapes = tuple({0: batch, **({axis[k]: past_sequence} if axis.get(k) is not None else {})} for k in kinds)
                pos = torch.full((EXAMPLE_BATCH, 1), EXAMPLE_LENGTH, dtype=torch.long)
                dynamic = {"x": {0: batch}, "position_ids": {0: batch}, **({"past": shapes} if shapes else {})}
                _export(
                    _LayerStep(op, kinds), (x[:, :1], pos, *state.values()), scratch / "layer.onnx", None, None,
                    dynamic, DEFAULT_OPSET,
                )
        except Exception as layer_error:
            return (
                f"{graph} graph does not export with dynamic axes: layer {i} {_describe(spec)} fails alone: "
                f"{root_cause(layer_error)}"
            )
    where = "no single layer fails alone"
    if genome.latents:
        where += f"; Perceiver-AR keeps the last min(sequence, latents={genome.latents}) positions"
    return f"{graph} graph does not export with dynamic axes ({where}): {root_cause(error)}"
