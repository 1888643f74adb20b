"""Text corpora: a file, a folder of text files, or the embedded default (Shakespeare, see PROVENANCE.md).

The split is deterministic: the last `val_fraction` of the bytes is validation. Batches are random windows drawn
with an explicit generator, so a seed fixes them.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from factory.errors import FactoryError

DEFAULT_NAME = "shakespeare"
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".csv", ".json", ".py", ".html", ""}


def default_corpus_path() -> Path:
    return Path(__file__).with_name("shakespeare.txt.gz")


@dataclass
class Corpus:
    name: str
    train: np.ndarray  # uint8 bytes
    val: np.ndarray
    sha256: str

    @property
    def n_bytes(self) -> int:
        return len(self.train) + len(self.val)

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        if len(data) <= seq_len + 1:
            raise FactoryError(f"corpus {self.name}: the {split} split ({len(data)} bytes) is shorter than seq-len {seq_len}")
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator).numpy()
        window = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(window)
        return t[:, :-1], t[:, 1:]

    def val_windows(self, seq_len: int, max_windows: int) -> torch.Tensor:
        """Fixed, evenly spaced validation windows [n, seq_len + 1] (the same for every model)."""
        n_avail = (len(self.val) - 1) // seq_len
        if n_avail < 1:
            raise FactoryError(f"corpus {self.name}: validation split too short for seq-len {seq_len}")
        n = min(n_avail, max_windows)
        stride = (len(self.val) - seq_len - 1) // max(n - 1, 1) if n > 1 else 0
        rows = [self.val[i * stride : i * stride + seq_len + 1] for i in range(n)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def unigram_bpb(self) -> float:
        """Bits per byte of the best context-free model (train byte frequencies, add-one smoothing) on val."""
        counts = np.bincount(self.train, minlength=256).astype(np.float64) + 1.0
        p = counts / counts.sum()
        return float(-np.log2(p[self.val]).mean())


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def load_corpus(path: str | Path | None = None, val_fraction: float = 0.1) -> Corpus:
    """Load a text file, a folder (its text files concatenated in sorted order) or, with None, the default."""
    if path is None or str(path) == DEFAULT_NAME:
        p, name = default_corpus_path(), DEFAULT_NAME
    else:
        p, name = Path(path), Path(path).name
    if not p.exists():
        raise FactoryError(f"corpus not found: {p}")
    try:
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES | {".gz"})
            if not files:
                raise FactoryError(f"corpus folder {p} has no text files")
            data = b"\n\n".join(_read_bytes(f) for f in files)
        else:
            data = _read_bytes(p)
    except (OSError, gzip.BadGzipFile) as e:
        raise FactoryError(f"cannot read corpus {p}: {e}") from None
    if len(data) < 4096:
        raise FactoryError(f"corpus {p} is too small ({len(data)} bytes; at least 4096 needed)")
    arr = np.frombuffer(data, dtype=np.uint8)
    cut = int(len(arr) * (1.0 - val_fraction))
    return Corpus(name=name, train=arr[:cut], val=arr[cut:], sha256=hashlib.sha256(data).hexdigest())
