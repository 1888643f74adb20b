"""Run an export folder with onnxruntime and numpy only (no torch, directly or indirectly).

    lm = ExportedLM("runs/export")            # the manifest's default variant, verified against its sha256
    logits, state = lm.prefill(ids)           # ids int64 [B, T]; state: {"past.<layer>.<kind>": array}
    logits, state = lm.step(next_ids, positions, state)
    text = generate("runs/export", "ROMEO:", 200, seed=0)

This module is what `factory generate EXPORT_DIR` and the on-device runner use, so it imports nothing from
`factory` except the pure-Python error type, and nothing that could pull torch in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from factory.errors import FactoryError

FORMAT = "factory-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Without a named variant, prefer the manifest's default, then the optimized graph, then plain float32.
FALLBACK_ORDER = ("optimized", "float32")


def load_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FactoryError(f"not an export folder: {folder} has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FactoryError(f"corrupt export: {path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FactoryError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FactoryError(f"{path}: format_version {manifest.get('format_version')!r}, this reader knows {FORMAT_VERSION}")
    variants, state = manifest.get("variants"), manifest.get("state")
    if not isinstance(variants, dict) or not variants:
        raise FactoryError(f"{path}: lists no variants")
    for name, entry in variants.items():
        if not isinstance(entry, dict) or not all(isinstance(entry.get(g), str) for g in ("prefill", "decode")):
            raise FactoryError(f"{path}: variant {name!r} does not name its prefill and decode graphs")
    if not isinstance(state, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in state):
        raise FactoryError(f"{path}: 'state' must list the state tensors by name")
    return manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def session_options(threads: int | None = None, optimization: str = "all") -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        # Spinning threads steal time from everything else on a small device and add noise to timings.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    return opts


def make_session(path: str | Path, threads: int | None = None, providers=None, provider_options=None) -> ort.InferenceSession:
    providers = list(providers or ["CPUExecutionProvider"])
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise FactoryError(
            f"onnxruntime here has no {missing[0]} (available: {', '.join(ort.get_available_providers())})"
        )
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(threads), providers=providers, provider_options=provider_options
        )
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, NotImplemented...)
        raise FactoryError(f"onnxruntime cannot load {path}: {' '.join(str(e).split())[:300]}") from None


class ExportedLM:
    """One variant of an export folder: a prefill session and a decode session sharing the state layout."""

    def __init__(self, folder: str | Path, variant: str | None = None, threads: int | None = None,
                 providers=None, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        variants = self.manifest["variants"]
        if variant is None:
            order = [self.manifest.get("default_variant"), *FALLBACK_ORDER]
            variant = next((v for v in order if v in variants), None) or next(iter(variants))
        if variant not in variants:
            raise FactoryError(f"export {self.folder} has no variant {variant!r} (has: {', '.join(variants)})")
        self.variant = variant
        entry = variants[variant]
        self.state_names = [s["name"] for s in self.manifest["state"]]
        paths = {}
        for graph in ("prefill", "decode"):
            path = self.folder / entry[graph]
            if self.folder.resolve() not in path.resolve().parents:
                raise FactoryError(f"corrupt export: {entry[graph]!r} points outside {self.folder}")
            if not path.is_file():
                raise FactoryError(f"corrupt export: {path} is missing")
            expected = entry.get("sha256", {}).get(Path(entry[graph]).name)
            if verify and expected and sha256_file(path) != expected:
                raise FactoryError(f"corrupt export: {path} does not match the sha256 in {MANIFEST}")
            paths[graph] = path
        self.prefill_session = make_session(paths["prefill"], threads, providers)
        self.decode_session = make_session(paths["decode"], threads, providers)
        self.vocab_size = int(self.manifest.get("tokenizer", {}).get("vocab_size", 256))

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise FactoryError(f"prefill needs ids of shape [batch, length >= 1], got {ids.shape}")
        outs = self.prefill_session.run(None, {"input_ids": ids})
        return outs[0], {f"past.{n}": v for n, v in zip(self.state_names, outs[1:])}

    def step(self, ids: np.ndarray, positions: np.ndarray, state: dict[str, np.ndarray]):
        feeds = {
            "input_ids": np.ascontiguousarray(ids, dtype=np.int64).reshape(-1, 1),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64).reshape(-1, 1),
            **state,
        }
        outs = self.decode_session.run(None, feeds)
        return outs[0], {f"past.{n}": v for n, v in zip(self.state_names, outs[1:])}


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int) -> np.ndarray:
    """logits [B, V] -> ids [B, 1]. Temperature 0 is greedy; top_k 0 keeps the whole vocabulary."""
    logits = logits.astype(np.float64)
    if temperature <= 0:
        return logits.argmax(-1)[:, None]
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.array([[rng.choice(p.shape[-1], p=row)] for row in p], dtype=np.int64)


def encode_bytes(text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def decode_bytes(ids) -> str:
    return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


def generate(path: str | Path, prompt: str, max_new: int, seed: int = 0, temperature: float = 0.8, top_k: int = 40,
             variant: str | None = None, threads: int | None = None, lm: ExportedLM | None = None) -> str:
    """Prefill the prompt once, then decode token by token; returns the new text only (like factory.train.generate)."""
    lm = lm or ExportedLM(path, variant=variant, threads=threads)
    tokenizer = lm.manifest.get("tokenizer", {}).get("kind", "bytes")
    if tokenizer != "bytes":
        raise FactoryError(f"export {path}: tokenizer {tokenizer!r} is not supported (bytes only)")
    rng = np.random.default_rng(seed)
    ids = encode_bytes(prompt or "\n")[None, :]
    logits, state = lm.prefill(ids)
    out: list[int] = []
    position = ids.shape[1]
    for i in range(max_new):
        nxt = sample_next(logits[:, -1], rng, temperature, top_k)
        out.append(int(nxt[0, 0]))
        if i + 1 < max_new:  # the last token needs no step of its own
            logits, state = lm.step(nxt, np.array([[position]], dtype=np.int64), state)
            position += 1
    return decode_bytes(out)
