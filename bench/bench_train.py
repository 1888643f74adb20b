"""Core benchmark: training throughput of transformer++ compiled from its genome vs a plain hand-written
Llama-style model of identical dimensions (target >= 0.9x), and PyTorch eager decode-step latency for every
reference genome.

    .venv/bin/python bench/bench_train.py [--threads 2] [--rounds 3] [--steps 20] [--out bench/out/train.json]

Both models run interleaved, round by round, in one process (machines are noisy; ratios are what count).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from factory.genome.metrics import param_count
from factory.genome.references import reference_genomes
from factory.model import LIVModel


# -- the hand-written reference: nanoGPT/Llama style, nothing shared with the factory's code -----------------------
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rope(x, positions, base=10000.0):
    dh = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
    ang = positions.float()[:, None] * inv
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class LlamaBlock(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n1(x)
        pos = torch.arange(t)
        q, k, v = (f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        q, k = rope(q, pos), rope(k, pos)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        g, u = self.gate_up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


class Llama(nn.Module):
    def __init__(self, vocab, d, n_blocks, heads, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, heads, hidden) for _ in range(n_blocks))
        self.norm = RMSNorm(d)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.norm(x), self.embed.weight)


def train_steps(model, steps, batch, seq, seed=0) -> float:
    """tokens/s over `steps` AdamW steps (after 2 warm-up steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)

    def one():
        ids = torch.randint(0, 256, (batch, seq + 1), generator=g)
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return steps * batch * seq / (time.perf_counter() - t0)


@torch.no_grad()
def decode_latency_ms(model: LIVModel, prompt: int, steps: int) -> tuple[float, float]:
    ids = torch.randint(0, 256, (1, prompt))
    _, state = model.prefill(ids)
    tok = torch.zeros(1, 1, dtype=torch.long)
    times = []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        _, state = model.step(tok, torch.tensor([[prompt + i]]), state)
        times.append((time.perf_counter() - t0) * 1e3)
    times = sorted(times[5:])
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("bench/out/train.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = reference_genomes()["transformer++"]
    spec = g.layer_spec(0)
    hidden = g.layer_spec(1).expansion * g.d_model
    torch.manual_seed(0)
    ours = LIVModel(g)
    ref = Llama(g.vocab_size, g.d_model, g.n_layers // 2, spec.heads, hidden)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ref == param_count(g), (n_ref, param_count(g))  # identical dimensions, checked

    ours_tps, ref_tps = [], []
    for r in range(args.rounds):  # interleaved so drift in machine load hits both
        ours_tps.append(train_steps(ours, args.steps, args.batch, args.seq, seed=r))
        ref_tps.append(train_steps(ref, args.steps, args.batch, args.seq, seed=r))
    ratio = statistics.median(o / h for o, h in zip(ours_tps, ref_tps))

    decode = {}
    for name, genome in reference_genomes().items():
        model = LIVModel(genome).eval()
        p50, p95 = decode_latency_ms(model, prompt=min(128, genome.context), steps=args.decode_steps)
        decode[name] = {"p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "params": param_count(genome)}

    print(f"\nTraining throughput, transformer++ (d={g.d_model}, {g.n_layers} layers, {n_ref:,} params), "
          f"batch {args.batch} x {args.seq}, {args.threads} threads")
    print(f"{'model':<28}{'tokens/s (median)':>20}")
    print(f"{'genome-compiled':<28}{statistics.median(ours_tps):>20,.0f}")
    print(f"{'hand-written Llama':<28}{statistics.median(ref_tps):>20,.0f}")
    print(f"{'ratio (target >= 0.9x)':<28}{ratio:>19.2f}x")
    print(f"\nPyTorch eager decode step, batch 1, after a 128-token prompt")
    print(f"{'genome':<20}{'p50 ms':>10}{'p95 ms':>10}{'params':>12}")
    for name, d in decode.items():
        print(f"{name:<20}{d['p50_ms']:>10.3f}{d['p95_ms']:>10.3f}{d['params']:>12,}")

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                    "torch": torch.__version__},
        "config": vars(args) | {"out": str(args.out)},
        "train_tokens_per_s": {"genome": ours_tps, "reference": ref_tps, "ratio_median": ratio},
        "decode_ms_torch": decode,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if math.isfinite(ratio) else 1


if __name__ == "__main__":
    raise SystemExit(main())
