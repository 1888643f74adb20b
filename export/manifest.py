"""manifest.json (docs/artifact.md): what an export folder holds. Pure Python plus onnx for the graph signatures.

The manifest is written last and atomically (temp file + rename): a folder without one is not an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from factory.io import atomic_write, clean_json

from export.runtime import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}


def signature(path: Path) -> dict:
    """Inputs and outputs of a graph: name, dtype, shape with symbolic axes as strings."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def op_domains(path: Path) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sorted({n.domain or "ai.onnx" for n in graph.node})


def variant_entry(folder: Path, prefill: str, decode: str, **extra) -> dict:
    """Paths relative to the folder, total size, sha256 per file, and the domains its nodes use."""
    files = {"prefill": prefill, "decode": decode}
    paths = {k: folder / v for k, v in files.items()}
    return {
        **files,
        "size_bytes": sum(p.stat().st_size for p in paths.values()),
        "sha256": {Path(v).name: sha256_file(paths[k]) for k, v in files.items()},
        "op_domains": sorted(set(op_domains(paths["prefill"])) | set(op_domains(paths["decode"]))),
        **extra,
    }


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Written last, atomically. JSON has no NaN or infinity: such figures (an untrained checkpoint's val_bpb)
    become null."""
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    return atomic_write(folder / MANIFEST, json.dumps(clean_json(data), indent=2, allow_nan=False))
