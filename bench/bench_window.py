"""Sliding-window vs dense causal attention prefill, exported to ONNX and run in onnxruntime (one thread).

One attention operator (d_model 256, 4 heads, RoPE, MHA) exported three ways through the project's exporter
(export.onnx_export, torch.onnx dynamo export, one graph each with a dynamic sequence length):
  dense     window 0: full causal attention, [H, T, T] scores;
  masked    the same windowed attention computed the dense way ([T, T] band mask over full scores; what the
            parallel form did before it was blocked), for W = 128 only;
  window W  the blocked form (factory/ops/attention.py): query blocks of L = min(W, 64) against W + L - 1 keys.
For each prompt length T the graphs run side by side in interleaved rounds (dense, window, ..., dense, window)
and the medians are compared: ratio = dense time / window time (and masked / window). Parity is checked in the
same run: each windowed graph against a dense masked float64 reference computed in PyTorch from the same weights.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/bench_window.py              # T = 512, 2048, 4096
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/bench_window.py --quick      # T = 512 only, 3 rounds

Results: printed, and written to bench/results/window.json and bench/results/window.md (--out to change).
Goal: dense / window >= 3 at T = 4096, W = 128, parity kept (max abs diff <= 1e-4).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from export.onnx_export import DEFAULT_OPSET, MAX_DIM, _export
from export.runtime import make_session
from factory.ops import registry

D_MODEL, HEADS = 256, 4
PARITY_TOL = 1e-4


class Prefill(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


class MaskedWindow(torch.nn.Module):
    """Windowed attention the dense way: full [H, T, T] scores under a [T, T] band mask (the pre-blocking form)."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        op = self.op
        t = x.shape[1]
        positions = torch.arange(t)
        q = op._queries(x, positions)
        k, v = op._keys_values(x, positions)
        idx = torch.arange(t)
        dist = idx.unsqueeze(1) - idx.unsqueeze(0)
        allowed = (dist >= 0) & (dist < op.window)
        p = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf")), dim=-1)
        return op.out(op._merge(p @ v))


def reference(op, x: torch.Tensor) -> torch.Tensor:
    """The dense masked definition in float64."""
    op64 = MaskedWindow(op).double()
    with torch.no_grad():
        y = op64(x.double()).float()
    op.float()
    return y


def export(module, path: Path) -> Path:
    _export(module.eval(), (torch.randn(1, 37, D_MODEL),), path, ["x"], ["y"],
            {"x": {1: Dim("sequence", min=2, max=MAX_DIM)}}, DEFAULT_OPSET)
    return path


def time_once(session, feed) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def markdown(result: dict) -> str:
    lines = [
        "# Sliding-window vs dense causal prefill (bench/bench_window.py)", "",
        result["what"] + ".", "",
        "| T | W | dense ms | window ms | dense / window | masked-dense window ms | masked / window | FLOPs ratio "
        "| parity max abs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        masked = (f"{r['masked_ms']:.2f} | {r['masked_over_window']:.2f}x" if "masked_ms" in r else "- | -")
        lines.append(f"| {r['T']} | {r['W']} | {r['dense_ms']:.2f} | {r['window_ms']:.2f} | "
                     f"{r['dense_over_window']:.2f}x | {masked} | {r['flops_ratio']:.2f} | {r['parity_max_abs']:.1e} |")
    lines += ["", f"Parity (each windowed graph vs a float64 dense masked reference) within {PARITY_TOL:g}: "
              f"{'yes' if result['parity_ok'] else 'NO'}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "window")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.rounds = [512], 3
    torch.manual_seed(0)
    base = registry.default_spec("attention").with_(heads=HEADS, positional="rope", kv_repeat=1)
    dense_op = registry.build_operator(D_MODEL, base).eval()
    window_ops = {}
    for w in args.windows:
        op = registry.build_operator(D_MODEL, base.with_(window=w)).eval()
        op.load_state_dict(dense_op.state_dict())  # same weights: only the window differs
        window_ops[w] = op
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sessions = {"dense": make_session(export(Prefill(dense_op), tmp / "dense.onnx"), threads=1)}
        for w, op in window_ops.items():
            sessions[f"window{w}"] = make_session(export(Prefill(op), tmp / f"window{w}.onnx"), threads=1)
        masked_w = 128 if 128 in window_ops else args.windows[0]
        sessions["masked"] = make_session(export(MaskedWindow(window_ops[masked_w]), tmp / "masked.onnx"), threads=1)
        rows = []
        for t in args.lengths:
            x = torch.randn(1, t, D_MODEL)
            feed = {"x": x.numpy()}
            parity = {}
            for w, op in window_ops.items():
                got = torch.from_numpy(sessions[f"window{w}"].run(None, feed)[0])
                parity[w] = (got - reference(op, x)).abs().max().item()
            names = list(sessions)
            for name in names:  # warm-up
                time_once(sessions[name], feed)
            times = {name: [] for name in names}
            for _ in range(args.rounds):
                for name in names:  # interleaved: a slow phase of the machine hits every graph
                    times[name].append(time_once(sessions[name], feed))
            med = {name: statistics.median(v) for name, v in times.items()}
            for w in window_ops:
                row = {
                    "T": t, "W": w, "dense_ms": 1e3 * med["dense"], "window_ms": 1e3 * med[f"window{w}"],
                    "dense_over_window": med["dense"] / med[f"window{w}"], "parity_max_abs": parity[w],
                    "flops_ratio": registry.flops(D_MODEL, base, t).prefill
                    / registry.flops(D_MODEL, base.with_(window=w), t).prefill,
                }
                if w == masked_w:
                    row["masked_ms"] = 1e3 * med["masked"]
                    row["masked_over_window"] = med["masked"] / med[f"window{w}"]
                rows.append(row)
                print(f"T={t:5d} W={w:4d}  dense {row['dense_ms']:8.2f} ms  window {row['window_ms']:8.2f} ms  "
                      f"dense/window {row['dense_over_window']:5.2f}x"
                      + (f"  masked {row['masked_ms']:8.2f} ms  masked/window {row['masked_over_window']:5.2f}x"
                         if "masked_ms" in row else "")
                      + f"  (FLOPs ratio {row['flops_ratio']:5.2f})  parity {row['parity_max_abs']:.1e}", flush=True)
    ok = all(r["parity_max_abs"] <= PARITY_TOL for r in rows)
    goal = [r for r in rows if r["T"] == 4096 and r["W"] == 128]
    result = {
        "what": "attention prefill, d_model 256, 4 heads, RoPE, batch 1, onnxruntime CPU 1 thread, medians of "
                f"{args.rounds} interleaved rounds",
        "machine": platform.processor() or platform.machine(), "onnxruntime": __import__("onnxruntime").__version__,
        "rows": rows, "parity_ok": ok,
        "goal_dense_over_window_at_4096_128": goal[0]["dense_over_window"] if goal else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    if not ok:
        raise SystemExit("parity lost")


if __name__ == "__main__":
    main()
