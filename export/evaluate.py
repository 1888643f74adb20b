"""Bits per byte through onnxruntime (numpy only): the quality figure every variant is compared on.

The prefill graph scores fixed validation windows: cross-entropy of each next byte, in bits. Perceiver-AR graphs
return logits for their latent positions only, so the targets are the last positions of each window.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def bits_per_byte(prefill: ort.InferenceSession, windows: np.ndarray, batch_size: int = 8) -> float:
    """windows: int64 [n, length + 1]; scores bytes 1..length of each window given the bytes before them."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = np.ascontiguousarray(windows[i : i + batch_size], dtype=np.int64)
        logits = prefill.run(["logits"], {"input_ids": chunk[:, :-1]})[0]
        targets = chunk[:, 1:][:, -logits.shape[1] :]
        logp = log_softmax(logits)
        picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        if not np.all(np.isfinite(picked)):
            return float("nan")
        total -= float(picked.sum())
        count += targets.size
    return total / count / math.log(2.0)
