"""Byte-level tokenizer: every byte is a token (vocabulary 256), so bits per byte = loss / ln 2."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    vocab_size = 256
    kind = "bytes"

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}
