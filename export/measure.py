"""The export a measurement needs, and nothing more: `build_for_measuring(model, target, folder)`.

    the float32 prefill.onnx + decode.onnx of the in-memory model (export_graphs)
    -> the target's deployed variant (its first preferred one: optimized, float32, int8-dynamic, int8-static or
       float16), built from them into `folder`
    -> parity of that variant against PyTorch, and only of it

No checkpoint, manifest, bits per byte or second variant: what the release export (export/pipeline.py) adds for a
folder someone deploys is of no use to a number that is measured and thrown away. Float variants must pass parity
at the release export's tolerances. Quantized and float16 variants are approximate by design (the release export
checks them only for running); here their differences from PyTorch are reported and must be finite: the graphs
take their own state and produce numbers at every prompt length of the parity run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from export import quantize as q
from export.graphs import state_layout
from export.onnx_export import STANDARD_DOMAINS, check_portable, export_graphs
from factory.errors import FactoryError

CALIBRATION_WINDOWS, CALIBRATION_LENGTH = 32, 128  # as the release export calibrates int8-static
APPROXIMATE = ("int8-dynamic", "int8-static", "float16")


@dataclass
class MeasuredGraphs:
    """One variant's graphs in a scratch folder, with what profiles.latency.measure feeds them."""

    prefill: Path
    decode: Path
    variant: str
    genome_hash: str
    genome: dict
    vocab_size: int
    state: list[dict]  # the state tensors as an export's manifest lists them
    isa: str | None = None
    parity: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def build_for_measuring(model, target, folder: Path, corpus=None) -> MeasuredGraphs:
    """Export `model` (a LIVModel) into `folder` as the target's deployed variant and check its parity; a
    FactoryError names what failed. `corpus` (a factory.data.corpus.Corpus) calibrates int8-static only."""
    from export.optimize import optimize_offline
    from export.pipeline import ExportRequest, resolve_quantization
    from export.verify import OPTIMIZED_TOLERANCE, TOLERANCE, parity

    folder = Path(folder)
    genome = model.eval().genome
    variant = target.preferred_variants()[0]
    _, isa = resolve_quantization(ExportRequest(checkpoint=Path(), out=folder, target=target))
    layout = state_layout(genome)
    graphs = export_graphs(model, layout, folder)
    paths = {"prefill": graphs.prefill, "decode": graphs.decode}
    tolerance = TOLERANCE
    if variant == "optimized":
        tolerance = OPTIMIZED_TOLERANCE
        for graph, src in list(paths.items()):
            paths[graph] = optimize_offline(src, folder / "optimized" / src.name)
            check_portable(paths[graph], allowed_domains=STANDARD_DOMAINS | {"com.microsoft", "com.microsoft.nchwc"})
    elif variant in APPROXIMATE:
        tolerance = math.inf
        paths = _approximate(variant, paths, folder / variant, isa, layout, corpus)
    report = parity(model, layout, paths["prefill"], paths["decode"], tolerance=tolerance)
    if math.isinf(tolerance):  # approximate: decode continues the prefill only as closely as the variant computes
        report.continuation_tolerance = math.inf
        report.passed = report.failure() is None
    worst = max(report.prefill_max_abs, report.state_max_rel, report.decode_max_abs, report.continuation_max_abs)
    if not report.passed or not math.isfinite(worst):
        why = report.failure() or "its outputs are not finite or not of the model's shapes"
        raise FactoryError(f"the {variant} graphs of {genome.name or genome.hash()} miss parity: {why}")
    summary = {key: getattr(report, key) for key in ("prefill_max_abs", "state_max_rel", "decode_max_abs",
                                                      "continuation_max_abs", "passed")}
    return MeasuredGraphs(
        prefill=paths["prefill"], decode=paths["decode"], variant=variant, genome_hash=genome.hash(),
        genome=genome.to_dict(), vocab_size=genome.vocab_size, state=[s.to_dict() for s in layout], isa=isa,
        parity={**summary, "tolerance": None if math.isinf(tolerance) else tolerance}, warnings=graphs.warnings)


def _approximate(variant: str, paths: dict, out: Path, isa, layout, corpus) -> dict:
    """The quantized or float16 graphs of the float32 ones, in `out`."""
    from export.runtime import make_session

    out.mkdir(parents=True, exist_ok=True)
    samples = None
    if variant == "int8-static":
        from factory.data.corpus import load_corpus

        train = (corpus or load_corpus(None)).train
        windows = q.calibration_windows(train, CALIBRATION_WINDOWS, CALIBRATION_LENGTH)
        samples = q.calibration_samples(make_session(paths["prefill"], threads=1), [s.name for s in layout], windows)
    built = {}
    for graph, src in paths.items():
        dst = built[graph] = out / src.name
        if variant == "int8-dynamic":
            q.quantize_dynamic(src, dst, isa)
        elif variant == "int8-static":
            q.quantize_static(src, dst, isa, samples[graph])
        else:
            q.convert_float16(src, dst)
        check_portable(dst)
    return built
