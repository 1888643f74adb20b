"""Quantized variants of the float32 graphs: int8 dynamic, int8 static (calibrated on corpus text), float16.

int8 goes through optimum's `ORTQuantizer` with the `AutoQuantizationConfig` preset of the target ISA
(arm64 | avx2 | avx512_vnni). Before quantizing, each graph gets onnxruntime's own pre-processing
(`quant_pre_process`: shape inference and the basic, ONNX-only graph optimizations, which fold constant
transposes so the tied lm head is a plain weight). Only weight matmuls (MatMul/Gemm with a constant weight) and
the embedding table (Gather on a constant) are quantized: state updates, attention scores and recurrences stay
float32, so the int8 graphs keep the decode state and its accuracy in float.

Static calibration needs sample inputs for every graph input, decode state included. optimum's `fit` only
iterates its dataset (and reads a few descriptive attributes), so an in-memory `CalibrationSamples` list stands in
for a `datasets.Dataset`; if optimum's path fails, `onnxruntime.quantization.quantize_static` with a
`CalibrationDataReader` is used instead and the manifest says so.

float16 uses `onnxruntime.transformers.float16.convert_float_to_float16` with float32 inputs and outputs
(keep_io_types), then sorted topologically again, for GPU targets; onnxruntime's CPU provider lacks float16 kernels
for some ops.
"""

from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path

import numpy as np
import onnx

from factory.errors import FactoryError
from export.quiet import quiet

MODES = ("none", "int8-dynamic", "int8-static", "float16")
ISAS = ("arm64", "avx2", "avx512_vnni")
WEIGHT_OPS = ("MatMul", "Gemm")


def default_isa() -> str:
    machine = platform.machine().lower()
    return "arm64" if machine in ("arm64", "aarch64") else "avx2"


def _quiet():
    """optimum and the quantizer log a warning per missing config.json and per node; keep the CLI readable."""
    return quiet(("optimum", "onnxruntime", "root", "transformers"), logging.ERROR, include_root=True)


def preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's recommended quantization pre-processing (standard ops only)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference gives up on some graphs; the ONNX one is enough here
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def weight_nodes(path: Path) -> list[str]:
    """Names of the nodes whose weight input is a constant: what int8 quantizes."""
    model = onnx.load(str(path))
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in constants:
            names.append(node.name)
        elif node.op_type == "Gather" and node.input[0] in constants:
            names.append(node.name)
    if any(not n for n in names):
        raise FactoryError(f"{path.name}: unnamed weight nodes; cannot select them for quantization")
    return names


def _config(isa: str, is_static: bool, per_channel: bool, nodes: list[str]):
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    preset = {"arm64": AutoQuantizationConfig.arm64, "avx2": AutoQuantizationConfig.avx2,
              "avx512_vnni": AutoQuantizationConfig.avx512_vnni}[isa]
    ops = list(WEIGHT_OPS) + ["Gather"]
    return preset(is_static=is_static, per_channel=per_channel, nodes_to_quantize=nodes, operators_to_quantize=ops)


def _optimum_quantize(src: Path, dst: Path, config, ranges=None) -> None:
    from optimum.onnxruntime import ORTQuantizer

    scratch = dst.parent / f".{dst.stem}-optimum"
    with _quiet():
        quantizer = ORTQuantizer.from_pretrained(src.parent, file_name=src.name)
        quantizer.quantize(quantization_config=config, save_dir=scratch, calibration_tensors_range=ranges)
    shutil.move(str(scratch / f"{src.stem}_quantized.onnx"), str(dst))
    shutil.rmtree(scratch, ignore_errors=True)


def quantize_dynamic(src: Path, dst: Path, isa: str, per_channel: bool = True) -> dict:
    work = dst.parent / f".{dst.stem}-pre" / src.name
    work.parent.mkdir(parents=True, exist_ok=True)
    preprocess(src, work)
    nodes = weight_nodes(work)
    _optimum_quantize(work, dst, _config(isa, False, per_channel, nodes))
    shutil.rmtree(work.parent, ignore_errors=True)
    return {"method": "optimum ORTQuantizer (dynamic, QOperator/IntegerOps)", "isa": isa, "per_channel": per_channel,
            "quantized_nodes": len(nodes)}


class CalibrationSamples(list):
    """A list of {input name: array without its batch axis}; what optimum's calibration reader iterates.

    optimum reads `.info.builder_name`, `.info.config_name`, `.split` and `.num_rows` only to describe the run.
    """

    class _Info:
        builder_name = "factory-corpus-windows"
        config_name = None

    info = _Info()
    split = "train"

    @property
    def num_rows(self) -> int:
        return len(self)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over the same samples (batch axis restored)."""

    def __init__(self, samples: list[dict]):
        self._it = iter(samples)

    def get_next(self):
        sample = next(self._it, None)
        return None if sample is None else {k: v[None] for k, v in sample.items()}

    def rewind(self):  # pragma: no cover - part of the protocol, unused by MinMax
        pass


def quantize_static(src: Path, dst: Path, isa: str, samples: list[dict], per_channel: bool = True) -> dict:
    work = dst.parent / f".{dst.stem}-pre" / src.name
    work.parent.mkdir(parents=True, exist_ok=True)
    preprocess(src, work)
    nodes = weight_nodes(work)
    config = _config(isa, True, per_channel, nodes)
    info = {"isa": isa, "per_channel": per_channel, "quantized_nodes": len(nodes), "calibration_samples": len(samples),
            "calibration": "MinMax"}
    try:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoCalibrationConfig

        dataset = CalibrationSamples(samples)
        with _quiet():
            quantizer = ORTQuantizer.from_pretrained(work.parent, file_name=work.name)
            ranges = quantizer.fit(
                dataset, AutoCalibrationConfig.minmax(dataset), operators_to_quantize=config.operators_to_quantize,
                onnx_augmented_model_name=str(work.parent / "augmented.onnx"),
            )
        _optimum_quantize(work, dst, config, ranges)
        info["method"] = "optimum ORTQuantizer.fit + quantize (static, QDQ)"
    except Exception as e:  # optimum's static path is built for HF datasets; fall back to onnxruntime's own API
        from onnxruntime.quantization import CalibrationMethod, QuantFormat
        from onnxruntime.quantization import quantize_static as ort_quantize_static

        with _quiet():
            ort_quantize_static(
                str(work), str(dst), _Reader(samples), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=config.activations_dtype, weight_type=config.weights_dtype,
                nodes_to_quantize=nodes, op_types_to_quantize=list(config.operators_to_quantize),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": config.weights_symmetric,
                               "ActivationSymmetric": config.activations_symmetric},
            )
        info["method"] = "onnxruntime.quantization.quantize_static (QDQ)"
        info["fallback_reason"] = f"optimum static path failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    shutil.rmtree(work.parent, ignore_errors=True)
    return info


def convert_float16(src: Path, dst: Path) -> dict:
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise FactoryError(f"float16 conversion needs onnxruntime.transformers.float16 ({e})") from None
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    with _quiet():
        converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
        # the converter appends the Casts around the ops it keeps in float32 (CumSum, for one) at the end of the
        # node list, which breaks the topological order ONNX requires
        converted.topological_sort(is_deterministic=True)
    onnx.save(converted.model, str(dst))
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types), topologically sorted"}


def calibration_windows(train: np.ndarray, count: int, length: int) -> np.ndarray:
    """Evenly spaced windows of the training split (never the validation bytes the bpb is measured on)."""
    if len(train) <= length + 1:
        raise FactoryError(f"corpus training split ({len(train)} bytes) is too short for calibration windows of {length}")
    stride = max(1, (len(train) - length - 1) // max(count - 1, 1))
    return np.stack([train[i * stride : i * stride + length] for i in range(count)]).astype(np.int64)


def calibration_samples(prefill_session, state_names: list[str], windows: np.ndarray, seed: int = 0) -> dict:
    """Samples for both graphs: prefill gets the windows; decode gets the state after a random prefix of each
    window (computed by the float32 prefill graph) with the next byte at its position."""
    rng = np.random.default_rng(seed)
    prefill = [{"input_ids": w} for w in windows]
    decode = []
    for w in windows:
        cut = int(rng.integers(1, len(w)))
        outs = prefill_session.run(None, {"input_ids": w[None, :cut]})
        sample = {"input_ids": w[cut : cut + 1], "position_ids": np.array([cut], dtype=np.int64)}
        sample.update({f"past.{n}": o[0] for n, o in zip(state_names, outs[1:])})
        decode.append(sample)
    return {"prefill": prefill, "decode": decode}
