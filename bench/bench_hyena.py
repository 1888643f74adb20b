"""Hyena's long convolution: the blocked causal convolution against FFT (ONNX DFT), on exported graphs in onnxruntime.

For each prompt length T (the context, so the implicit filter has T taps), the long_conv operator (Hyena order 2,
factory/ops/conv.py, filter implicit) is built once and exported alone, with a dynamic batch and sequence length, in each
parallel form (`conv.PARALLEL_FORM`):

- blocked: `blocked_causal_conv`, chunks of 64 tokens, Gather + MatMul (the form the project uses);
- fft: `fft_causal_conv`, safari's fftconv (rfft / irfft of length 2T), exported as ONNX DFT;
- conv (--with-conv): one grouped Conv1d with T taps, the previous implementation's form (onnxruntime unrolls each
  channel's input into a [T, T] matrix, so it is slow at long T).

Every graph is checked against the PyTorch operator, then timed in onnxruntime (CPU, --threads intra-op threads,
batch 1): the forms are run in turn inside each repeat (so drift affects them alike), and each form's median over
the repeats is reported with its ratio to the blocked form, all lengths side by side in one run.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/bench_hyena.py [--d-model 128] [--lengths 512,2048,4096]
        [--repeats 7] [--threads 1] [--with-conv] [--out bench/results/hyena_conv.md]

Writes the table to --out (markdown) and the raw timings beside it (.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.export import Dim

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx_export import capture  # noqa: E402
from export.quiet import quiet  # noqa: E402
from factory.ops import conv as long_conv, registry  # noqa: E402


class ConvForm(torch.nn.Module):
    """The operator with its long convolution as one grouped Conv1d of L taps (the previous implementation)."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        op, d = self.op, self.op.d_model
        pre = op._project(x)
        uc = torch.cat([op.gate_conv(pre[..., : 2 * d]), op.value_conv(pre[..., 2 * d :])], dim=-1)
        h = op.filter()

        def conv(u):
            w = h.flip(-1).unsqueeze(1)  # [d, 1, L], current token last
            y = torch.nn.functional.conv1d(torch.nn.functional.pad(u.transpose(1, 2), (h.shape[1] - 1, 0)), w, groups=d)
            return y.transpose(1, 2)

        return op._mix(uc, conv)[0]


class Prefill(torch.nn.Module):
    def __init__(self, op, form):
        super().__init__()
        self.op, self.form = op, form

    def forward(self, x):
        long_conv.PARALLEL_FORM = self.form
        return self.op(x)


def export(module, d, path):
    example = (torch.randn(2, 37, d),)
    dims = ({0: Dim("batch", min=2, max=1 << 20), 1: Dim("sequence", min=2, max=1 << 20)},)
    import logging

    with quiet(("torch", "onnxscript", "onnx_ir"), logging.CRITICAL), torch.no_grad():
        program = capture(module, example, dims)
        torch.onnx.export(program, example, str(path), dynamo=True, external_data=False, opset_version=18,
                          input_names=["x"], output_names=["y"], optimize=True, verbose=False)
    return sorted({n.op_type for n in onnx.load(str(path)).graph.node})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--lengths", default="512,2048,4096")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--with-conv", action="store_true", help="also time the single-Conv1d form")
    ap.add_argument("--out", type=Path, default=Path("bench/results/hyena_conv.md"))
    args = ap.parse_args()
    d, lengths = args.d_model, [int(t) for t in args.lengths.split(",")]
    forms = ["blocked", "fft"] + (["conv"] if args.with_conv else [])
    torch.manual_seed(0)
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in lengths:
            spec = registry.repair_spec(registry.default_spec("long_conv"), d, t)
            op = registry.build_operator(d, spec).eval()
            x = torch.randn(1, t, d)
            with torch.no_grad():
                long_conv.PARALLEL_FORM = "blocked"
                expected = op(x).numpy()
            sessions, ops_used, errors = {}, {}, {}
            for form in forms:
                path = Path(tmp) / f"{form}_{t}.onnx"
                module = ConvForm(op) if form == "conv" else Prefill(op, form)
                ops_used[form] = export(module, d, path)
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
                sessions[form] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                out = sessions[form].run(None, {"x": x.numpy()})[0]
                errors[form] = float(np.abs(out - expected).max() / np.abs(expected).max())
            long_conv.PARALLEL_FORM = "blocked"
            times = {form: [] for form in forms}
            feed = {"x": x.numpy()}
            for r in range(args.repeats):
                order = forms if r % 2 == 0 else forms[::-1]
                for form in order:
                    start = time.perf_counter()
                    sessions[form].run(None, feed)
                    times[form].append(time.perf_counter() - start)
            med = {form: float(np.median(v)) for form, v in times.items()}
            raw[t] = {"times_s": times, "median_s": med, "relative_error": errors, "onnx_ops": ops_used}
            rows.append((t, med, errors))
            print(t, {f: f"{m * 1e3:.1f} ms" for f, m in med.items()}, flush=True)

    lines = [
        "# Hyena long convolution: blocked vs FFT (ONNX DFT) in onnxruntime",
        "",
        f"Command: `PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/bench_hyena.py --d-model {d} "
        f"--lengths {args.lengths} --repeats {args.repeats} --threads {args.threads}"
        + (" --with-conv" if args.with_conv else "") + "`",
        "",
        f"long_conv operator (Hyena order 2, filter of T taps) exported alone, prefill of batch 1, d_model {d}, "
        f"onnxruntime {ort.__version__} CPU with {args.threads} intra-op thread(s), median of {args.repeats} "
        f"runs per form (forms interleaved), {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Relative error: max |onnx - torch| / max |torch|.",
        "",
        "| T | " + " | ".join(f"{f} ms" for f in forms) + " | " + " | ".join(f"{f} / blocked" for f in forms[1:])
        + " | " + " | ".join(f"{f} rel. error" for f in forms) + " |",
        "|" + "---|" * (1 + 2 * len(forms) + len(forms) - 1),
    ]
    for t, med, errors in rows:
        lines.append(
            f"| {t} | " + " | ".join(f"{med[f] * 1e3:.1f}" for f in forms) + " | "
            + " | ".join(f"{med[f] / med['blocked']:.2f}" for f in forms[1:]) + " | "
            + " | ".join(f"{errors[f]:.1e}" for f in forms) + " |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
