"""`factory export`: checkpoint -> verified export folder (docs/artifact.md).

    load checkpoint -> state layout -> prefill.onnx + decode.onnx (dynamo exporter, standard ops only)
    -> onnx.checker (full) -> parity vs PyTorch (fail = FactoryError, nothing left behind)
    -> optimized/ (onnxruntime offline graph optimization) -> its parity
    -> the quantized variant, if asked (int8-dynamic | int8-static | float16)
    -> bits per byte of every variant through onnxruntime on fixed validation windows
    -> manifest.json, written last; then the build folder is renamed into place.

Everything is built in a hidden sibling folder of --out, so a failed or interrupted export never leaves a folder
that looks done; a previous export at --out is replaced only once the new one is complete.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from export import quantize as q
from export.runtime import MANIFEST, make_session
from factory.errors import FactoryError
from factory.io import check_out_folder, current_umask

VAL_WINDOWS, VAL_LENGTH = 16, 128
CALIBRATION_WINDOWS = 32
VARIANT_DIRS = {"int8-dynamic": "int8-dynamic", "int8-static": "int8-static", "float16": "float16"}


@dataclass
class ExportRequest:
    checkpoint: Path
    out: Path
    quantize: str | None = None  # None: the target's, else "none"
    isa: str | None = None  # None: the target's, else this machine's default
    target: object | None = None  # a targets.Target
    corpus: str | None = None  # None: the embedded default corpus
    opset: int = 18
    decode_steps: int = 8
    per_channel: bool = True
    progress: Callable[[str], None] = field(default=lambda message: None)


def resolve_quantization(request: ExportRequest) -> tuple[str, str | None]:
    """(mode, isa): explicit options first, then the target's settings, then none / this machine's ISA."""
    target = request.target
    mode = request.quantize or (target.quantization if target is not None else "none")
    if mode not in q.MODES:
        raise FactoryError(f"unknown quantization mode {mode!r} (choose from {', '.join(q.MODES)})")
    isa = request.isa
    if isa is None and target is not None and getattr(target, "quantization_isa", "none") != "none":
        isa = target.quantization_isa
    if mode.startswith("int8"):
        isa = isa or q.default_isa()
        if isa not in q.ISAS:
            raise FactoryError(f"unknown quantization ISA {isa!r} (choose from {', '.join(q.ISAS)})")
    else:
        isa = None
    return mode, isa


def check_output_folder(out: Path) -> None:
    """--out may be new, an empty folder or a previous export (replaced at the end); nothing else is touched."""
    check_out_folder(out, "an export", (MANIFEST,), ours="replace")


def _build_folder(out: Path) -> Path:
    try:
        build = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    except OSError as e:
        raise FactoryError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e})") from None
    build.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the artifact is an ordinary folder
    return build


def _move_into_place(build: Path, out: Path) -> None:
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(build, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(request: ExportRequest) -> dict:
    """Run the whole export; returns the manifest. Raises FactoryError with one line on any failure."""
    mode, isa = resolve_quantization(request)
    check_output_folder(request.out)
    import torch  # noqa: F401  (heavy imports only once the cheap checks passed)

    from factory.data.corpus import load_corpus
    from factory.train import load_checkpoint

    say = request.progress
    model, metrics = load_checkpoint(request.checkpoint)
    corpus = load_corpus(request.corpus)
    build = _build_folder(request.out)
    try:
        manifest = _export_into(build, request, model, metrics, corpus, mode, isa, say)
        _move_into_place(build, request.out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return manifest


def _export_into(build: Path, request: ExportRequest, model, metrics: dict, corpus, mode: str, isa: str | None, say) -> dict:
    import onnxruntime as ort
    import torch

    from export.graphs import state_layout
    from export.manifest import signature, variant_entry, write_manifest
    from export.onnx_export import STANDARD_DOMAINS, TRACED_MIN_SIZE, check_portable, export_graphs, runtime_specific_ops
    from export.optimize import LEVEL, optimize_offline
    from export.evaluate import bits_per_byte
    from export.verify import OPTIMIZED_TOLERANCE, check_model, parity

    genome = model.genome
    layout = state_layout(genome)
    say(f"exporting {genome.name or genome.hash()} ({genome.n_layers} layers, {len(layout)} state tensors)")
    graphs = export_graphs(model, layout, build, opset=request.opset)
    for path in (graphs.prefill, graphs.decode):
        check_model(path)

    say("checking parity with PyTorch (float32)")
    for warning in graphs.warnings:
        say(f"warning: {warning}")
    report = parity(model, layout, graphs.prefill, graphs.decode, steps=request.decode_steps)
    if not report.passed:
        why = f"; the exporter had to narrow the trace: {' | '.join(graphs.warnings)}" if graphs.warnings else ""
        raise FactoryError(f"export of {request.checkpoint} misses parity: {report.failure()}{why}")

    length = min(VAL_LENGTH, genome.context)
    windows = corpus.val_windows(length, VAL_WINDOWS).numpy()

    def bpb(prefill_rel: str) -> float:
        return round(bits_per_byte(make_session(build / prefill_rel, threads=1), windows), 5)

    variants = {"float32": variant_entry(build, "prefill.onnx", "decode.onnx", val_bpb=bpb("prefill.onnx"))}

    say("optimizing offline with onnxruntime")
    optimized = {}
    for graph in ("prefill", "decode"):
        optimized[graph] = optimize_offline(build / f"{graph}.onnx", build / "optimized" / f"{graph}.onnx")
        # No onnx.checker here: onnxruntime's fusions add ops (com.microsoft, and SimplifiedLayerNormalization in
        # the default domain) that ONNX has no schema for; loading in onnxruntime and parity check these graphs.
        check_portable(optimized[graph], allowed_domains=STANDARD_DOMAINS | {"com.microsoft", "com.microsoft.nchwc"})
    opt_report = parity(model, layout, optimized["prefill"], optimized["decode"], steps=request.decode_steps, seed=1,
                        tolerance=OPTIMIZED_TOLERANCE)
    if not opt_report.passed:
        raise FactoryError(f"the onnxruntime-optimized graphs miss parity: {opt_report.failure()}")
    variants["optimized"] = variant_entry(
        build, "optimized/prefill.onnx", "optimized/decode.onnx", val_bpb=bpb("optimized/prefill.onnx"),
        graph_optimization_level=f"ORT_ENABLE_{LEVEL.upper()}", parity=_parity_summary(opt_report),
        onnxruntime_specific_ops=sorted(set(runtime_specific_ops(optimized["prefill"])) | set(runtime_specific_ops(optimized["decode"]))),
    )

    if mode != "none":
        say(f"quantizing: {mode}{f' ({isa})' if isa else ''}")
        variants[mode] = _quantized_variant(build, mode, isa, request, layout, corpus, bpb)

    default = mode if mode != "none" else "optimized"
    target = request.target
    if target is not None:
        default = next((v for v in target.preferred_variants() if v in variants), default)

    manifest = {
        "name": genome.name,
        "genome": genome.to_dict(),
        "genome_hash": genome.hash(),
        "tokenizer": {"kind": "bytes", "vocab_size": genome.vocab_size},
        "opset": graphs.opset,
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "onnx_version": __import__("onnx").__version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"path": str(request.checkpoint), "val_bpb": metrics.get("val_bpb"),
                       "corpus": metrics.get("corpus")},
        "state": [s.to_dict() for s in layout],
        "default_variant": default,
        "variants": variants,
        "parity": _parity_summary(report, per_prompt=True),
        "export_warnings": graphs.warnings,
        "traced_min_size": TRACED_MIN_SIZE,
        "evaluation": {"corpus": corpus.name, "corpus_sha256": corpus.sha256, "windows": int(len(windows)),
                       "window_bytes": int(length), "metric": "val_bpb: cross-entropy of the prefill logits / ln 2",
                       "same_corpus_as_training": (metrics.get("corpus") or {}).get("sha256") == corpus.sha256},
        "quantization": {"mode": mode, "isa": isa},
        "target": None if target is None else {"name": target.name, "quantization": target.quantization,
                                               "quantization_isa": target.quantization_isa,
                                               "providers": list(target.providers)},
        **_signatures(build, signature),
    }
    write_manifest(build, manifest)
    say(f"verified: parity {report.prefill_max_abs:.1e} / {report.decode_max_abs:.1e}")
    return manifest


def _signatures(build: Path, signature) -> dict:
    pre, dec = signature(build / "prefill.onnx"), signature(build / "decode.onnx")
    return {"inputs": {"prefill": pre["inputs"], "decode": dec["inputs"]},
            "outputs": {"prefill": pre["outputs"], "decode": dec["outputs"]}}


def _parity_summary(report, per_prompt: bool = False) -> dict:
    out = {
        "prefill_max_abs": report.prefill_max_abs,
        "state_max_abs": report.state_max_abs,
        "state_max_rel": report.state_max_rel,
        "decode_max_abs": report.decode_max_abs,
        "continuation_max_abs": report.continuation_max_abs,
        "tolerance": report.tolerance,
        "continuation_tolerance": report.continuation_tolerance,
        "decode_steps": report.decode_steps,
        "batch": report.batch,
        "prompt_lengths": report.prompt_lengths,
        "passed": report.passed,
    }
    if per_prompt:
        out["per_prompt"] = report.per_prompt
    replayed = {case: d["float64"] for case, d in report.per_prompt.items() if "float64" in d}
    if replayed:  # cases beyond tolerance, passed (or not) on their float64 replay
        out["float64"] = replayed
    return out


def _quantized_variant(build: Path, mode: str, isa: str | None, request: ExportRequest, layout, corpus, bpb) -> dict:
    from export.manifest import variant_entry
    from export.onnx_export import check_portable
    from export.verify import check_model

    folder = build / VARIANT_DIRS[mode]
    folder.mkdir()
    info: dict = {}
    if mode == "int8-dynamic":
        for graph in ("prefill", "decode"):
            info = q.quantize_dynamic(build / f"{graph}.onnx", folder / f"{graph}.onnx", isa, request.per_channel)
    elif mode == "int8-static":
        windows = q.calibration_windows(corpus.train, CALIBRATION_WINDOWS, min(VAL_LENGTH, 128))
        samples = q.calibration_samples(make_session(build / "prefill.onnx", threads=1), [s.name for s in layout], windows)
        per_graph = {}
        for graph in ("prefill", "decode"):
            per_graph[graph] = q.quantize_static(
                build / f"{graph}.onnx", folder / f"{graph}.onnx", isa, samples[graph], request.per_channel
            )
        info = {**per_graph["decode"], "calibration_corpus": corpus.name,
                "method": {g: i["method"] for g, i in per_graph.items()}}
        for g, i in per_graph.items():
            if "fallback_reason" in i:
                info[f"{g}_fallback_reason"] = i["fallback_reason"]
        info.pop("fallback_reason", None)
    elif mode == "float16":
        for graph in ("prefill", "decode"):
            info = q.convert_float16(build / f"{graph}.onnx", folder / f"{graph}.onnx")
    for graph in ("prefill", "decode"):
        check_model(folder / f"{graph}.onnx")
        check_portable(folder / f"{graph}.onnx")
    rel = VARIANT_DIRS[mode]
    entry = variant_entry(build, f"{rel}/prefill.onnx", f"{rel}/decode.onnx", **info)
    entry["val_bpb"] = bpb(f"{rel}/prefill.onnx")
    _check_decode_runs(build, rel, layout)
    return entry


def _check_decode_runs(build: Path, rel: str, layout) -> None:
    """A quantized decode graph must load and take its own prefill's state (no parity: it is approximate)."""
    pre, dec = make_session(build / rel / "prefill.onnx", threads=1), make_session(build / rel / "decode.onnx", threads=1)
    ids = np.arange(1, 6, dtype=np.int64)[None, :] * 7
    outs = pre.run(None, {"input_ids": ids})
    feeds = {f"past.{s.name}": o for s, o in zip(layout, outs[1:])}
    res = dec.run(None, {"input_ids": ids[:, -1:], "position_ids": np.array([[5]], dtype=np.int64), **feeds})
    if not np.all(np.isfinite(res[0])):
        raise FactoryError(f"{rel}/decode.onnx produces non-finite logits")
