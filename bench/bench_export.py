"""Benchmarks of the ONNX export, each a ratio measured side by side in one run (see bench/README.md).

1. decode: one decode step at batch 1, `--threads` threads, after a prompt of `--context` bytes, onnxruntime
   (the optimized/ variant) vs PyTorch eager (`LIVModel.step`), for every reference genome. Target: >= 3x.
   The same run checks parity of every full-size reference (max abs diff vs PyTorch, prompts across windows).
2. vs Hugging Face: our transformer++ export vs a LlamaForCausalLM of identical dimensions (random weights, built
   from LlamaConfig, saved locally, exported with optimum's `main_export`): decode step and prefill of
   `--context` bytes, both through onnxruntime with the same session settings. Target: ours / HF <= 1.0.
3. int8: a briefly trained transformer++ exported with `factory export --quantize int8-dynamic`: decode speed-up
   of int8 over float32 (optimized) and the change in validation bits per byte.

Timings are medians over interleaved rounds (A, B, A, B...), so slow phases of a shared machine hit both sides.

    .venv/bin/python bench/bench_export.py                 # full size (d_model 128, 8 layers), ~10+ min
    .venv/bin/python bench/bench_export.py --quick         # width 64, shortened stacks, fewer steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from export.graphs import state_layout  # noqa: E402
from export.onnx_export import export_graphs  # noqa: E402
from export.optimize import optimize_offline  # noqa: E402
from export.runtime import make_session  # noqa: E402
from export.verify import check_model, parity  # noqa: E402
from factory.genome.references import reference_genomes  # noqa: E402
from factory.model import LIVModel  # noqa: E402
from factory.testing import perturbed_model, shrink  # noqa: E402


# -- helpers -------------------------------------------------------------------------------------------------------


def interleaved(runners: dict, rounds: int) -> dict[str, list[float]]:
    """Run each runner once per round, alternating; each returns a list of per-call seconds."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name] += run()
    return times


def ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


# -- decode loops ----------------------------------------------------------------------------------------------
def torch_decode_runner(model: LIVModel, prompt: torch.Tensor, steps: int, threads: int):
    with torch.inference_mode():
        _, state0 = model.prefill(prompt)
    tokens = torch.randint(0, 256, (steps + 5, 1, 1), generator=torch.Generator().manual_seed(1))

    def run() -> list[float]:
        torch.set_num_threads(threads)
        out, state, position = [], state0, prompt.shape[1]
        with torch.inference_mode():
            for k in range(steps + 5):
                t0 = time.perf_counter()
                _, state = model.step(tokens[k], torch.tensor([[position]]), state)
                if k >= 5:  # warm-up steps are not counted
                    out.append(time.perf_counter() - t0)
                position += 1
        return out

    return run


def ort_decode_runner(prefill: ort.InferenceSession, decode: ort.InferenceSession, prompt: np.ndarray, steps: int,
                      past_names: list[str], prefill_extra: dict | None = None, decode_extra=None):
    """Prefill once, then time decode steps. `decode_extra(position) -> dict` replaces position_ids with
    graph-specific inputs (the HF graph's attention_mask and position_ids)."""
    outs = prefill.run(None, {"input_ids": prompt, **(prefill_extra or {})})
    state0 = dict(zip(past_names, outs[1:]))
    out_names = [o.name for o in decode.get_outputs()]
    tokens = np.random.default_rng(1).integers(0, 256, (steps + 5, 1, 1), dtype=np.int64)

    def run() -> list[float]:
        times, state, position = [], state0, prompt.shape[1]
        for k in range(steps + 5):
            t0 = time.perf_counter()
            feeds = {"input_ids": tokens[k], **state}
            if decode_extra is None:
                feeds["position_ids"] = np.array([[position]], dtype=np.int64)
            else:
                feeds.update(decode_extra(position))
            result = decode.run(out_names, feeds)
            state = dict(zip(past_names, result[1:]))
            if k >= 5:
                times.append(time.perf_counter() - t0)
            position += 1
        return times

    return run


def ort_prefill_runner(session: ort.InferenceSession, prompt: np.ndarray, repeats: int, extra=None):
    feeds = {"input_ids": prompt, **(extra or {})}

    def run() -> list[float]:
        session.run(None, feeds)  # warm-up
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, feeds)
            out.append(time.perf_counter() - t0)
        return out

    return run


# -- 1. every reference: parity at full size, onnxruntime vs eager decode ---------------------------------------
def bench_references(args, work: Path) -> tuple[list[dict], dict]:
    rows, exported = [], {}
    names = list(reference_genomes()) if args.genomes == "all" else args.genomes.split(",")
    for name in names:
        genome = reference_genomes()[name]
        genome = shrink(genome, 64) if args.quick else genome
        model = perturbed_model(genome)
        layout = state_layout(genome)
        folder = work / name
        folder.mkdir()
        t0 = time.perf_counter()
        graphs = export_graphs(model, layout, folder)
        export_s = time.perf_counter() - t0
        check_model(graphs.prefill), check_model(graphs.decode)
        report = parity(model, layout, graphs.prefill, graphs.decode)
        optimized = {g: optimize_offline(folder / f"{g}.onnx", folder / "optimized" / f"{g}.onnx") for g in ("prefill", "decode")}
        sessions = {g: make_session(p, threads=args.threads) for g, p in optimized.items()}
        prompt = torch.randint(0, 256, (1, args.context), generator=torch.Generator().manual_seed(0))
        past_names = [f"past.{s.name}" for s in layout]
        times = interleaved(
            {
                "torch": torch_decode_runner(model, prompt, args.steps, args.threads),
                "onnxruntime": ort_decode_runner(sessions["prefill"], sessions["decode"], prompt.numpy(), args.steps, past_names),
                # One torch thread: tiny decode ops gain nothing from a second thread, and on a busy machine
                # torch's thread barriers can cost milliseconds per op; this column shows eager at its best.
                "torch_1thread": torch_decode_runner(model, prompt, args.steps, 1),
            },
            args.rounds,
        )
        row = {
            "genome": name,
            "layers": genome.n_layers,
            "d_model": genome.d_model,
            "params": model.num_params(),
            "export_s": round(export_s, 1),
            "parity_prefill_max_abs": report.prefill_max_abs,
            "parity_decode_max_abs": report.decode_max_abs,
            "parity_passed": report.passed,
            "export_warnings": len(graphs.warnings),
            "torch_decode_ms": ms(times["torch"]),
            "ort_decode_ms": ms(times["onnxruntime"]),
            "torch_1thread_decode_ms": ms(times["torch_1thread"]),
        }
        row["speedup"] = row["torch_decode_ms"] / row["ort_decode_ms"]
        row["speedup_vs_1thread"] = row["torch_1thread_decode_ms"] / row["ort_decode_ms"]
        rows.append(row)
        exported[name] = (model, layout, folder)
        print(f"  {name:<17} torch {row['torch_decode_ms']:7.3f} ms (1 thread {row['torch_1thread_decode_ms']:6.3f})  "
              f"ort {row['ort_decode_ms']:6.3f} ms  x{row['speedup']:6.2f} (x{row['speedup_vs_1thread']:5.2f})  "
              f"parity {report.prefill_max_abs:.1e}/{report.decode_max_abs:.1e}", flush=True)
    return rows, exported


# -- 2. transformer++ vs Hugging Face Llama through optimum -------------------------------------------------------
def bench_vs_llama(args, work: Path, ours) -> dict:
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    model, layout, folder = ours
    genome = model.genome
    attention = next(c for c in genome.classes if c.family == "attention")
    glu = next(c for c in genome.classes if c.family == "glu")
    config = LlamaConfig(
        vocab_size=genome.vocab_size, hidden_size=genome.d_model, intermediate_size=glu.expansion * genome.d_model,
        num_hidden_layers=sum(1 for i in range(genome.n_layers) if genome.layer_spec(i).family == "attention"),
        num_attention_heads=attention.heads, num_key_value_heads=attention.heads // attention.kv_repeat,
        max_position_embeddings=max(genome.context, 2 * args.context), rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf_params = sum(p.numel() for p in hf.parameters())
    hf.save_pretrained(work / "llama")
    t0 = time.perf_counter()
    main_export(str(work / "llama"), output=str(work / "llama-onnx"), task="text-generation-with-past",
                local_files_only=True, do_validation=False)
    hf_export_s = time.perf_counter() - t0
    hf_session = make_session(work / "llama-onnx" / "model.onnx", threads=args.threads)
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    hf_past = [i.name for i in hf_session.get_inputs() if i.name.startswith("past_key_values.")]

    def hf_decode(position: int) -> dict:  # one new token after `position` cached ones
        return {"attention_mask": np.ones((1, position + 1), dtype=np.int64),
                "position_ids": np.array([[position]], dtype=np.int64)}

    def hf_prefill(length: int) -> dict:  # the whole prompt, empty cache
        return {"attention_mask": np.ones((1, length), dtype=np.int64),
                "position_ids": np.arange(length, dtype=np.int64)[None],
                **{n: np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32) for n in hf_past}}

    ours_sessions = {g: make_session(folder / "optimized" / f"{g}.onnx", threads=args.threads) for g in ("prefill", "decode")}
    ours_f32 = {g: make_session(folder / f"{g}.onnx", threads=args.threads) for g in ("prefill", "decode")}
    prompt = np.random.default_rng(0).integers(0, 256, (1, args.context), dtype=np.int64)
    past_names = [f"past.{s.name}" for s in layout]
    decode = interleaved(
        {
            "ours_optimized": ort_decode_runner(ours_sessions["prefill"], ours_sessions["decode"], prompt, args.steps, past_names),
            "ours_float32": ort_decode_runner(ours_f32["prefill"], ours_f32["decode"], prompt, args.steps, past_names),
            "hf": ort_decode_runner(hf_session, hf_session, prompt, args.steps, hf_past,
                                    prefill_extra=hf_prefill(args.context), decode_extra=hf_decode),
        },
        args.rounds,
    )
    prefill = interleaved(
        {
            "ours_optimized": ort_prefill_runner(ours_sessions["prefill"], prompt, args.steps // 4 or 1),
            "ours_float32": ort_prefill_runner(ours_f32["prefill"], prompt, args.steps // 4 or 1),
            "hf": ort_prefill_runner(hf_session, prompt, args.steps // 4 or 1, hf_prefill(args.context)),
        },
        args.rounds,
    )
    out = {
        "ours_params": model.num_params(), "hf_params": hf_params, "hf_export_s": round(hf_export_s, 1),
        "decode_ms": {k: ms(v) for k, v in decode.items()}, "prefill_ms": {k: ms(v) for k, v in prefill.items()},
    }
    out["decode_ratio"] = out["decode_ms"]["ours_optimized"] / out["decode_ms"]["hf"]
    out["prefill_ratio"] = out["prefill_ms"]["ours_optimized"] / out["prefill_ms"]["hf"]
    out["decode_ratio_float32"] = out["decode_ms"]["ours_float32"] / out["decode_ms"]["hf"]
    out["prefill_ratio_float32"] = out["prefill_ms"]["ours_float32"] / out["prefill_ms"]["hf"]
    return out


# -- 3. int8 vs float32 on a briefly trained transformer++ -----------------------------------------------------
def bench_int8(args, work: Path) -> dict:
    from export.pipeline import ExportRequest, export_checkpoint
    from factory.data.corpus import load_corpus
    from factory.train import TrainConfig, save_checkpoint, train

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        train_info = {"checkpoint": str(checkpoint)}
    else:
        genome = reference_genomes()["transformer++"]
        genome = shrink(genome, 64) if args.quick else genome
        corpus = load_corpus(None)
        cfg = TrainConfig(tokens=args.train_steps * 16 * 64, seq_len=64, batch_size=16, threads=1, eval_windows=16)  # 1 thread: see torch_1thread
        t0 = time.perf_counter()
        model, result = train(genome, corpus, cfg)
        checkpoint = save_checkpoint(work / "ckpt", model, result, cfg, corpus)
        train_info = {"train_steps": result.steps, "train_s": round(time.perf_counter() - t0, 1), "train_val_bpb": result.val_bpb}
    out_dir = work / "int8-export"
    manifest = export_checkpoint(ExportRequest(checkpoint=checkpoint, out=out_dir, quantize="int8-dynamic", isa=args.isa))
    variants = manifest["variants"]
    layout_names = [f"past.{s['name']}" for s in manifest["state"]]
    prompt = np.random.default_rng(0).integers(0, 256, (1, args.context), dtype=np.int64)
    runners = {}
    for name in ("optimized", "int8-dynamic"):
        pre = make_session(out_dir / variants[name]["prefill"], threads=args.threads)
        dec = make_session(out_dir / variants[name]["decode"], threads=args.threads)
        runners[name] = ort_decode_runner(pre, dec, prompt, args.steps, layout_names)
    times = interleaved(runners, args.rounds)
    return {
        **train_info,
        "isa": variants["int8-dynamic"]["isa"],
        "float32_bpb": variants["float32"]["val_bpb"],
        "int8_bpb": variants["int8-dynamic"]["val_bpb"],
        "bpb_change": variants["int8-dynamic"]["val_bpb"] - variants["float32"]["val_bpb"],
        "float32_size_bytes": variants["float32"]["size_bytes"],
        "int8_size_bytes": variants["int8-dynamic"]["size_bytes"],
        "float32_decode_ms": ms(times["optimized"]),
        "int8_decode_ms": ms(times["int8-dynamic"]),
        "int8_speedup": ms(times["optimized"]) / ms(times["int8-dynamic"]),
    }


# -- report --------------------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"# bench_export ({s['started']}, {s['machine']}, {s['threads']} threads, context {s['context']}, "
        f"{s['steps']} steps x {s['rounds']} rounds{', quick' if s['quick'] else ''})",
        "",
        f"Load average at start: {s['load_average']} on {s['cpus']} CPUs (a shared machine: timings are noisy).",
        "",
        "## 1. Decode step, batch 1: onnxruntime (optimized/) vs PyTorch eager (target >= 3x)",
        "",
        f"| genome | layers x d | params | torch ms ({s['threads']} thr) | ort ms ({s['threads']} thr) | speed-up | "
        "torch ms (1 thr) | speed-up vs 1 thr | parity prefill / decode | export s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["references"]:
        lines.append(
            f"| {r['genome']} | {r['layers']} x {r['d_model']} | {r['params']:,} | {r['torch_decode_ms']:.3f} | "
            f"{r['ort_decode_ms']:.3f} | {r['speedup']:.2f}x | {r['torch_1thread_decode_ms']:.3f} | "
            f"{r['speedup_vs_1thread']:.2f}x | {r['parity_prefill_max_abs']:.1e} / "
            f"{r['parity_decode_max_abs']:.1e}{'' if r['parity_passed'] else ' FAIL'} | {r['export_s']} |"
        )
    if results.get("vs_llama"):
        v = results["vs_llama"]
        lines += [
            "",
            "## 2. transformer++ vs Hugging Face Llama (optimum export), onnxruntime both (target <= 1.0x)",
            "",
            f"Parameters: ours {v['ours_params']:,}, Llama {v['hf_params']:,}.",
            "",
            "| | ours optimized ms | ours float32 ms | HF Llama ms | ratio (optimized) | ratio (float32) |",
            "|---|---|---|---|---|---|",
            f"| decode step | {v['decode_ms']['ours_optimized']:.3f} | {v['decode_ms']['ours_float32']:.3f} | "
            f"{v['decode_ms']['hf']:.3f} | {v['decode_ratio']:.2f}x | {v['decode_ratio_float32']:.2f}x |",
            f"| prefill {s['context']} | {v['prefill_ms']['ours_optimized']:.3f} | {v['prefill_ms']['ours_float32']:.3f} | "
            f"{v['prefill_ms']['hf']:.3f} | {v['prefill_ratio']:.2f}x | {v['prefill_ratio_float32']:.2f}x |",
        ]
    if results.get("int8"):
        q = results["int8"]
        lines += [
            "",
            f"## 3. int8-dynamic ({q['isa']}) vs float32 (optimized), trained transformer++",
            "",
            "| float32 ms | int8 ms | speed-up | float32 bpb | int8 bpb | bpb change | size float32 -> int8 |",
            "|---|---|---|---|---|---|---|",
            f"| {q['float32_decode_ms']:.3f} | {q['int8_decode_ms']:.3f} | {q['int8_speedup']:.2f}x | "
            f"{q['float32_bpb']:.4f} | {q['int8_bpb']:.4f} | {q['bpb_change']:+.4f} | "
            f"{q['float32_size_bytes'] / 1e6:.2f} MB -> {q['int8_size_bytes'] / 1e6:.2f} MB |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="folder for bench_export.json/.md")
    parser.add_argument("--genomes", default="all", help="comma-separated reference names (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=128, help="prompt length before the timed decode steps")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300, help="training steps for the int8 bpb comparison")
    parser.add_argument("--checkpoint", help="use this checkpoint for the int8 comparison instead of training one")
    parser.add_argument("--isa", default=None, help="int8 preset (default: this CPU's)")
    parser.add_argument("--quick", action="store_true", help="width 64 and shortened stacks (a smoke run)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-int8", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    settings = {
        "started": started, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()], "threads": args.threads,
        "context": args.context, "steps": args.steps, "rounds": args.rounds, "quick": args.quick,
        "torch": torch.__version__, "onnxruntime": ort.__version__,
    }
    results: dict = {"settings": settings}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        print("1. decode step: onnxruntime vs PyTorch eager", flush=True)
        results["references"], exported = bench_references(args, work)
        if not args.skip_hf and "transformer++" in exported:
            print("2. transformer++ vs Hugging Face Llama", flush=True)
            results["vs_llama"] = bench_vs_llama(args, work, exported["transformer++"])
        if not args.skip_int8:
            print("3. int8 vs float32", flush=True)
            results["int8"] = bench_int8(args, work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_export.json").write_text(json.dumps(results, indent=2, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v)))
    report = markdown(results)
    (args.out / "bench_export.md").write_text(report)
    print()
    print(report)


if __name__ == "__main__":
    main()
