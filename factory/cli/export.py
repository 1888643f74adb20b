"""`factory export`: a checkpoint folder -> a verified onnxruntime export folder (docs/artifact.md).

Only typer, the standard library and the CLI helpers are imported here: factory/cli/__init__.py imports every
command module at start-up, and `factory generate EXPORT_DIR` must stay torch-free. The exporter (torch, onnx,
optimum) is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from factory.cli.common import console, emit_json, fail

QUANTIZE_MODES = ("none", "int8-dynamic", "int8-static", "float16")
ISAS = ("arm64", "avx2", "avx512_vnni")


def _load_target(name: str):
    try:
        from targets import load_target
    except ImportError as e:  # the targets package is built separately; say so instead of guessing settings
        fail(f"--target {name}: the targets package is not importable here ({e})")
    return load_target(name)


def export_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (model.safetensors + genome.json)."),
    out: Path = typer.Option(..., "--out", help="Export folder to write (replaced only if it holds a previous export)."),
    target: Optional[str] = typer.Option(None, "--target", help="Target name or .toml path: its quantization is the default."),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="none | int8-dynamic | int8-static | float16 (default: the target's, else none)."
    ),
    isa: Optional[str] = typer.Option(None, "--isa", help="int8 preset: arm64 | avx2 | avx512_vnni (default: the target's, else this CPU's)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Text for calibration and bits per byte (default: the embedded corpus)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18 runs on every onnxruntime since 1.14)."),
    decode_steps: int = typer.Option(8, "--decode-steps", help="Decode steps checked against PyTorch per prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as one JSON object."),
):
    """Export a checkpoint to ONNX (prefill + decode graphs), verify parity with PyTorch, optimize and quantize."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        fail(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE_MODES)}")
    if isa is not None and isa not in ISAS:
        fail(f"--isa {isa!r} is not one of {', '.join(ISAS)}")
    if not 18 <= opset <= 23:
        fail(f"--opset must be between 18 and 23, got {opset}")
    if decode_steps < 1:
        fail(f"--decode-steps must be a positive integer, got {decode_steps}")
    if not checkpoint.is_dir():
        fail(f"checkpoint not found: {checkpoint}")
    for name in ("model.safetensors", "genome.json"):
        if not (checkpoint / name).is_file():
            fail(f"not a checkpoint: {checkpoint} has no {name}")
    resolved_target = _load_target(target) if target else None

    from export.pipeline import ExportRequest, check_output_folder, export_checkpoint, resolve_quantization

    request = ExportRequest(
        checkpoint=checkpoint, out=out, quantize=quantize, isa=isa, target=resolved_target, corpus=corpus,
        opset=opset, decode_steps=decode_steps,
        progress=(lambda message: None) if as_json else (lambda message: console.print(message, style="dim", soft_wrap=True, markup=False)),
    )
    resolve_quantization(request)
    check_output_folder(out)
    manifest = export_checkpoint(request)
    summary = {
        "out": str(out),
        "name": manifest["name"],
        "genome_hash": manifest["genome_hash"],
        "default_variant": manifest["default_variant"],
        "parity": {k: manifest["parity"][k] for k in ("prefill_max_abs", "decode_max_abs", "continuation_max_abs", "tolerance", "passed")},
        "variants": {
            name: {"size_bytes": v["size_bytes"], "val_bpb": v.get("val_bpb"), **({"isa": v["isa"]} if "isa" in v else {})}
            for name, v in manifest["variants"].items()
        },
        "target": (manifest.get("target") or {}).get("name"),
    }
    if as_json:
        emit_json(summary)
        return
    console.print(
        f"exported {manifest['name'] or manifest['genome_hash']} -> {out}: parity prefill "
        f"{summary['parity']['prefill_max_abs']:.1e}, decode {summary['parity']['decode_max_abs']:.1e} "
        f"(tolerance {summary['parity']['tolerance']:g})"
    )
    for name, v in summary["variants"].items():
        bpb = "n/a" if v["val_bpb"] is None else f"{v['val_bpb']:.3f}"
        mark = " (default)" if name == manifest["default_variant"] else ""
        console.print(f"  {name:<13} {v['size_bytes'] / 1e6:8.2f} MB  val bpb {bpb}{mark}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
