"""onnxruntime's own graph optimizer, run once and saved (optimum's ORTOptimizer needs a Hugging Face model type).

ORT_ENABLE_EXTENDED applies the constant folding, redundant-node elimination and the fusions (LayerNorm/RMSNorm,
Gelu, MatMul+Add...) that are portable across machines; it may introduce onnxruntime's contrib ops
(`com.microsoft` domain), so the optimized/ graphs need onnxruntime, not just any ONNX runtime.
ORT_ENABLE_ALL would add layout transforms specific to the CPU that ran the export, so it is not saved.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from export.runtime import session_options
from factory.errors import FactoryError

LEVEL = "extended"


def optimize_offline(src: Path, dst: Path, level: str = LEVEL) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    opts = session_options(threads=1, optimization=level)
    opts.optimized_model_filepath = str(dst)
    try:
        ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        raise FactoryError(f"onnxruntime could not optimize {src.name}: {' '.join(str(e).split())[:300]}") from None
    if not dst.is_file():
        raise FactoryError(f"onnxruntime did not write the optimized model {dst}")
    if dst.with_name(dst.name + ".data").exists():
        raise FactoryError(f"{dst.name}: the optimizer wrote external data; the artifact must be single files")
    return dst
