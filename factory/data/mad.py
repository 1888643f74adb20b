"""MAD synthetic token tasks (Poli et al. 2024), generated procedurally from a seed: cheap proxy tasks.

Each generator returns (inputs [n, T], targets [n, T]) int64 tensors; targets are -100 where nothing is scored.
Token ids stay below 256 so any byte-vocabulary model can take them. Scores are accuracies on scored positions.
"""

from __future__ import annotations

import torch

IGNORE = -100


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def in_context_recall(n: int, seq_len: int = 128, vocab: int = 16, seed: int = 0, noise: float = 0.0, key_len: int = 1):
    """Key-value pairs with a per-sequence mapping; every value whose key was seen before is scored.

    `noise` inserts noise tokens (never scored) with that probability per pair (noisy recall); `key_len` > 1 makes
    keys multi-token (fuzzy recall).
    """
    g = _gen(seed)
    half = vocab // 2
    noise_tok = vocab  # noise tokens live just above the task vocabulary
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    n_keys = max(2, half // 2)
    for row in range(n):
        keys = torch.randint(0, half, (n_keys, key_len), generator=g)
        values = torch.randint(half, vocab, (n_keys,), generator=g)
        seen, t = set(), 0
        while t < seq_len:
            if noise and torch.rand(1, generator=g).item() < noise:
                inputs[row, t] = noise_tok + int(torch.randint(0, 4, (1,), generator=g))
                t += 1
                continue
            k = int(torch.randint(0, n_keys, (1,), generator=g))
            for tok in keys[k]:
                if t < seq_len:
                    inputs[row, t] = tok
                    t += 1
            if t < seq_len:
                inputs[row, t] = values[k]
                if k in seen:
                    targets[row, t - 1] = values[k]  # predicted from the last key token
                seen.add(k)
                t += 1
    return inputs, targets


def fuzzy_recall(n: int, seq_len: int = 128, vocab: int = 16, seed: int = 0):
    return in_context_recall(n, seq_len, vocab, seed, key_len=2)


def noisy_recall(n: int, seq_len: int = 128, vocab: int = 16, seed: int = 0):
    return in_context_recall(n, seq_len, vocab, seed, noise=0.2)


def selective_copying(n: int, seq_len: int = 256, copy: int = 16, vocab: int = 16, seed: int = 0):
    """`copy` data tokens scattered among blanks, then a separator: reproduce the data tokens in order."""
    g = _gen(seed)
    blank, sep = vocab, vocab + 1
    body = seq_len - copy  # blanks+data, then the separator and copy-1 echoed tokens
    inputs = torch.full((n, seq_len), blank, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    for row in range(n):
        slots = torch.randperm(body, generator=g)[:copy].sort().values
        data = torch.randint(0, vocab, (copy,), generator=g)
        inputs[row, slots] = data
        inputs[row, body] = sep
        inputs[row, body + 1 :] = data[:-1]
        targets[row, body:] = data
    return inputs, targets


def compression(n: int, seq_len: int = 32, vocab: int = 16, seed: int = 0):
    """A random sequence, a separator, then the same sequence again: the state must hold all of it."""
    g = _gen(seed)
    half = (seq_len - 1) // 2
    sep = vocab
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    for row in range(n):
        data = torch.randint(0, vocab, (half,), generator=g)
        seq = torch.cat([data, torch.tensor([sep]), data])
        inputs[row, : len(seq)] = seq
        targets[row, half : 2 * half] = data
    return inputs, targets


def memorization(n: int, seq_len: int = 32, vocab: int = 256, seed: int = 0):
    """Key-value pairs from one fixed mapping shared by all sequences: it must be stored in the weights."""
    fixed = _gen(1234)
    half = vocab // 2
    mapping = torch.randint(half, vocab, (half,), generator=fixed)
    g = _gen(seed)
    keys = torch.randint(0, half, (n, seq_len // 2), generator=g)
    inputs = torch.stack([keys, mapping[keys]], dim=-1).reshape(n, -1)[:, :seq_len]
    targets = torch.full_like(inputs, IGNORE)
    targets[:, 0::2] = inputs[:, 1::2]
    return inputs, targets


TASKS = {
    "in_context_recall": in_context_recall,
    "fuzzy_recall": fuzzy_recall,
    "noisy_recall": noisy_recall,
    "selective_copying": selective_copying,
    "compression": compression,
    "memorization": memorization,
}
