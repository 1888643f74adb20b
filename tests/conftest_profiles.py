"""Shared by the target, profiling and runner tests: a tiny hand-made export, target-file helpers, a CLI runner.

The export (docs/artifact.md, format 1) is independent of the real exporter.

Two layers: full attention (a `key`/`value` cache that grows) and a causal depthwise conv (a fixed-size `conv`
state), on bytes (vocab 256). Exported with the dynamo exporter, as the real exporter does. Test files import the
fixtures from here (this is not a conftest.py, which pytest would load by itself).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest

VOCAB = 256
D_MODEL = 16
HEADS = 2
HEAD_DIM = D_MODEL // HEADS
KERNEL = 4
GENOME = {"tiny": "attention+conv", "d_model": D_MODEL, "heads": HEADS, "kernel": KERNEL, "vocab_size": VOCAB}
GENOME_HASH = hashlib.sha256(json.dumps(GENOME, sort_keys=True).encode()).hexdigest()


def _modules():
    import torch
    from torch import nn

    def positions_embedding(position, d):
        # Sinusoidal, computed from the absolute position: any length, no table.
        freqs = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
        angles = position.to(torch.float32).unsqueeze(-1) * freqs
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(VOCAB, D_MODEL)
            self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
            self.out = nn.Linear(D_MODEL, D_MODEL)
            self.conv_weight = nn.Parameter(0.3 * torch.randn(D_MODEL, KERNEL))
            self.head = nn.Linear(D_MODEL, VOCAB)

        def _attend(self, q, k, v, causal):
            scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
            if causal:
                t = q.shape[-2]
                mask = torch.ones(t, t, dtype=torch.bool).tril()
                scores = scores.masked_fill(~mask, float("-inf"))
            return torch.softmax(scores, dim=-1) @ v

        def _split(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return [y.reshape(b, t, HEADS, HEAD_DIM).transpose(1, 2) for y in (q, k, v)]

        def _merge(self, y):
            b, _, t, _ = y.shape
            return self.out(y.transpose(1, 2).reshape(b, t, D_MODEL))

    class Prefill(Tiny):
        def forward(self, input_ids):
            t = input_ids.shape[1]
            x = self.embed(input_ids) + positions_embedding(torch.arange(t), D_MODEL)
            q, k, v = self._split(x)
            x = x + self._merge(self._attend(q, k, v, causal=True))
            # Causal depthwise conv over time; the state is the last KERNEL-1 inputs (zero-padded when short).
            padded = torch.nn.functional.pad(x.transpose(1, 2), (KERNEL - 1, 0))
            conv = torch.nn.functional.conv1d(padded, self.conv_weight.unsqueeze(1), groups=D_MODEL)
            x = x + conv.transpose(1, 2)
            conv_state = padded[:, :, padded.shape[2] - (KERNEL - 1) :]
            return self.head(x), k, v, conv_state

    class Decode(Tiny):
        def forward(self, input_ids, position_ids, past_key, past_value, past_conv):
            x = self.embed(input_ids) + positions_embedding(position_ids, D_MODEL)
            q, k, v = self._split(x)
            keys = torch.cat([past_key, k], dim=2)
            values = torch.cat([past_value, v], dim=2)
            x = x + self._merge(self._attend(q, keys, values, causal=False))
            window = torch.cat([past_conv, x.transpose(1, 2)], dim=2)  # [B, D, KERNEL]
            x = x + (window * self.conv_weight).sum(-1).unsqueeze(1)
            return self.head(x), keys, values, window[:, :, 1:]

    return torch, Prefill, Decode


def build_tiny_export(out: Path) -> Path:
    """Export prefill.onnx + decode.onnx + manifest.json into `out` (returns `out`)."""
    torch, Prefill, Decode = _modules()
    out.mkdir(parents=True, exist_ok=True)
    state_names = ["0.key", "0.value", "1.conv"]
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=1, max=4096)
    past = torch.export.Dim("past_sequence", min=1, max=8192)

    prefill = Prefill().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    torch.onnx.export(
        prefill,
        (ids,),
        str(out / "prefill.onnx"),
        dynamo=True,
        external_data=False,
        input_names=["input_ids"],
        output_names=["logits"] + [f"present.{n}" for n in state_names],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}},
        optimize=True,
        verbose=False,
    )
    decode = Decode().eval()
    example = (
        torch.randint(0, VOCAB, (2, 1)),
        torch.full((2, 1), 5),
        torch.zeros(2, HEADS, 5, HEAD_DIM),
        torch.zeros(2, HEADS, 5, HEAD_DIM),
        torch.zeros(2, D_MODEL, KERNEL - 1),
    )
    torch.onnx.export(
        decode,
        example,
        str(out / "decode.onnx"),
        dynamo=True,
        external_data=False,
        input_names=["input_ids", "position_ids"] + [f"past.{n}" for n in state_names],
        output_names=["logits"] + [f"present.{n}" for n in state_names],
        dynamic_shapes={
            "input_ids": {0: batch},
            "position_ids": {0: batch},
            "past_key": {0: batch, 2: past},
            "past_value": {0: batch, 2: past},
            "past_conv": {0: batch},
        },
        optimize=True,
        verbose=False,
    )
    _write_int8_variant(out)
    _write_manifest(out, state_names)
    return out


def _write_int8_variant(out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (out / "int8-dynamic").mkdir(exist_ok=True)
    for graph in ("prefill", "decode"):
        # MatMul only: quantized convolutions become ConvInteger, which older onnxruntime CPU builds (1.19, the last
        # for Python 3.8) cannot run with int8 weights.
        quantize_dynamic(
            out / f"{graph}.onnx", out / "int8-dynamic" / f"{graph}.onnx", weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
        )


def _opset(path: Path) -> int:
    import onnx

    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _variant(out: Path, folder: str, **extra) -> dict:
    files = [f"{folder}prefill.onnx", f"{folder}decode.onnx"]
    return {
        "prefill": files[0],
        "decode": files[1],
        "size_bytes": sum((out / f).stat().st_size for f in files),
        "sha256": {f: _sha256(out / f) for f in files},
        **extra,
    }


def _write_manifest(out: Path, state_names: list[str]) -> None:
    import onnxruntime
    import torch

    state = [
        {"name": "0.key", "layer": 0, "kind": "key", "dtype": "float32", "shape": ["batch", HEADS, "past_sequence", HEAD_DIM], "grows": True},
        {"name": "0.value", "layer": 0, "kind": "value", "dtype": "float32", "shape": ["batch", HEADS, "past_sequence", HEAD_DIM], "grows": True},
        {"name": "1.conv", "layer": 1, "kind": "conv", "dtype": "float32", "shape": ["batch", D_MODEL, KERNEL - 1], "grows": False},
    ]
    state_io = [{"name": f"{{}}.{s['name']}", "dtype": "float32", "shape": s["shape"]} for s in state]
    manifest = {
        "format": "factory-onnx",
        "format_version": 1,
        "genome": GENOME,
        "genome_hash": GENOME_HASH,
        "tokenizer": {"kind": "bytes", "vocab_size": VOCAB},
        "opset": _opset(out / "prefill.onnx"),
        "onnxruntime_version": onnxruntime.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "state": state,
        "variants": {
            "float32": _variant(out, "", val_bpb=8.0),
            "int8-dynamic": _variant(out, "int8-dynamic/", isa="avx2", val_bpb=8.0),
        },
        "parity": {"prefill_max_abs": 0.0, "decode_max_abs": 0.0, "tolerance": 1e-4, "decode_steps": 8, "passed": True},
        "inputs": {
            "prefill": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
            "decode": [
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", 1]},
                {"name": "position_ids", "dtype": "int64", "shape": ["batch", 1]},
            ]
            + [dict(io, name=io["name"].format("past")) for io in state_io],
        },
        "outputs": {
            "prefill": [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", VOCAB]}]
            + [dict(io, name=io["name"].format("present"), shape=[d if d != "past_sequence" else "sequence" for d in io["shape"]]) for io in state_io],
            "decode": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, VOCAB]}]
            + [dict(io, name=io["name"].format("present")) for io in state_io],
        },
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")  # written last: no manifest, no artifact


# ----------------------------------------------------------------------------------------------- target files

VALID = {
    "name": "my-board",
    "description": "a test board",
    "device_class": "cpu",
    "providers": ["CPUExecutionProvider"],
    "threads": 2,
    "prompt_length": 64,
    "decode_context": 128,
    "prefill_ms": 100.0,
    "decode_ms_p95": 10.0,
    "precision": "int8",
    "quantization": "int8-dynamic",
    "quantization_isa": "arm64",
    "objectives": ["quality", "latency"],
    "memory_limit_bytes": "512MiB",
    "constraints": {"max_params": 5_000_000},
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # strings and lists of strings are valid TOML in JSON form


def to_toml(data: dict) -> str:
    """A minimal TOML writer for the test tables (scalars, lists, one level of tables, provider_options)."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{key}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for sub, values in nested.items():
            lines.append(f"[{key}.{sub}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_target(tmp_path, data: dict, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(to_toml(data))
    return path


def with_changes(**changes) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in VALID.items()}
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data



# ----------------------------------------------------------------------------------------------- the CLI


def run_cli(capsys, *args):
    from factory.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err



# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_export(request, tmp_path_factory) -> Path:
    """The tiny export. The dynamo exporter takes ~10-20 s, so the result is kept in pytest's cache folder, keyed
    by this file's source and the torch / onnxruntime versions; tests that damage an export work on a copy."""
    from importlib.metadata import version  # not `import torch`: a cache hit should cost nothing

    key = hashlib.sha256(
        Path(__file__).read_bytes() + version("torch").encode() + version("onnxruntime").encode()
    ).hexdigest()[:12]
    try:
        out = Path(request.config.cache.mkdir(f"tiny-export-{key}")) / "export"
        for stale in out.parent.parent.glob("tiny-export-*"):  # builds for an older version of this file
            if stale != out.parent:
                shutil.rmtree(stale, ignore_errors=True)
    except AttributeError:  # cache disabled (-p no:cacheprovider): build per session
        out = tmp_path_factory.getbasetemp() / "tiny-export"
    if not (out / "manifest.json").is_file():
        staging = out.with_name(f"export-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        build_tiny_export(staging)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
    return out


@pytest.fixture
def factory_home(tmp_path, monkeypatch) -> Path:
    """A private FACTORY_HOME so that tests never write to the user's measurement store."""
    home = tmp_path / "factory-home"
    monkeypatch.setenv("FACTORY_HOME", str(home))
    return home
