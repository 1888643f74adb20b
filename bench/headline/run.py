"""Headline benchmark: STAR's comparison reproduced at this scale, with the hardware in the loop.

On the default corpus and a fixed training budget, the best evolved models of a `factory run` against the
`transformer++` and `striped-hybrid` baselines, all retrained with the same seeds: validation bits per byte (mean and
spread over seeds), parameters, cache bytes at the target's context, and onnxruntime prefill and decode latency
measured on this machine. The ratios are stated relative to transformer++ for the evolved models whose quality is
equal (a tie within the seed spread) or better.

    .venv/bin/python bench/headline/run.py [--target laptop-cpu] [--preset quick] [--out bench/out/headline]
        [--markdown bench/headline/RESULTS.md] [--report-only]

The run folder is an ordinary `factory run` folder: a killed benchmark continues where it stopped (`factory run
--resume`), and `--report-only` rewrites the markdown from a finished folder without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

STAR = "STAR reports 90% less cache than Transformer++ and 37% less than a striped hybrid at equal or better " \
       "quality, and 13% fewer parameters (its scale: 125M-1B parameters, billions of tokens)."


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import onnxruntime
        import torch

        info["torch"], info["onnxruntime"] = torch.__version__, onnxruntime.__version__
    except ImportError:
        pass
    return info


def run_factory(args) -> dict:
    """Start or resume the run; returns this invocation's timing record (appended to timing.json)."""
    if (args.out / "job.json").is_file():
        cmd = [sys.executable, "-m", "factory", "run", "--resume", str(args.out), "--json"]
    else:
        cmd = [sys.executable, "-m", "factory", "run", "--target", args.target, "--preset", args.preset,
               "--out", str(args.out), "--json"]
    load_before = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress goes to the terminal (stderr)
    if proc.returncode != 0:
        raise SystemExit(f"factory run failed (exit {proc.returncode}); the folder {args.out} can be resumed")
    record = {"command": " ".join(cmd[2:]), "wall_s": round(time.time() - t0, 1), "started": t0,
              "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}
    timing_path = args.out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else []
    timing.append(record)
    timing_path.write_text(json.dumps(timing, indent=2))
    return record


def _fmt_ratio(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x"  # a pure-recurrent cache is a few KiB against MiB


def _less(ratio: float, word: str) -> str:
    """0.34 -> '66% less'; 1.24 -> '24% more' (a ratio above 1 is no saving and is said so)."""
    return f"{1 - ratio:.1%} {word}" if ratio <= 1 else f"{ratio - 1:.0%} more"


def _ms(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 1 else f"{x:.2f}")


def markdown(out: Path, info: dict) -> str:
    job_file = json.loads((out / "job.json").read_text())
    job = job_file["config"]
    final = json.loads((out / "final.json").read_text())
    report = json.loads((out / "report.json").read_text())
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").is_file() else []
    rows = {r["hash"]: r for r in report["comparison"]}
    models = final["models"]
    base = {m["name"]: m for m in models if m["role"] == "baseline"}
    tpp = rows.get(base["transformer++"]["hash"]) if "transformer++" in base else None
    s, t = report["search"], report["target"]

    def ratio(row, key):
        if tpp is None or row.get(key) is None or not tpp.get(key):
            return None
        return row[key] / tpp[key]

    lines = [
        "# Headline benchmark: evolved models vs transformer++ and striped-hybrid",
        "",
        f"Command: `.venv/bin/python bench/headline/run.py --target {job['target']} --preset {job['preset']}` "
        f"(one `factory run`; results regenerate with `--report-only`). Generated {report['generated_at']}.",
        "",
        "## Machine",
        "",
        f"- {info.get('cpu', 'unknown CPU')}, {info.get('cpus')} CPUs, {info.get('memory_gib', '?')} GiB; "
        f"{info['platform']}; Python {info['python']}, torch {info.get('torch')}, onnxruntime {info.get('onnxruntime')}.",
    ]
    created = job_file.get("created_at")
    if created:
        span = (out / "report.json").stat().st_mtime - created
        lines.append(f"- From the run's creation to its last report: {span / 60:.1f} min (all invocations, any pauses).")
    for rec in timing:
        command = rec["command"].replace(str(out.resolve()), os.path.relpath(out.resolve()))  # no machine paths
        lines.append(f"- `{command}`: {rec['wall_s'] / 60:.1f} min wall, 1-minute load average "
                     f"{rec['load_1min_before']:.1f} before, {rec['load_1min_after']:.1f} after.")
    lines += [
        "",
        "## Setup",
        "",
        f"- Target `{t['name']}`: {t['description']}; {t['threads']} onnxruntime threads, prompt {t['prompt_length']} "
        f"tokens, decode at context {t['decode_context']}; budgets prefill {t.get('prefill_ms')} ms, decode p95 "
        f"{t.get('decode_ms_p95')} ms.",
        f"- Search (preset `{s['preset']}`): {s['layers']} layers, width {s['d_model']}, population {s['population']}, "
        f"{s['generations']} generations, {s['tokens_per_candidate']:,} training tokens per candidate, objectives "
        f"{', '.join(s['objectives'])}; {s['evaluated']} evaluated, {s['failed']} failed, {s['rejected']} rejected "
        f"before training. Corpus: {s['corpus']}.",
        f"- Final comparison: the front's best {final['top_k']} by quality and both baselines retrained for "
        f"{final['tokens']:,} tokens ({final['multiplier']}x), seeds {final['seeds']}. Rule: {final['rule']}.",
        "- Latency: each model exported to ONNX (parity-verified), the target's deployed variant measured with "
        "onnxruntime under the target's protocol (profiles/PROTOCOL.md) on this machine.",
        "",
        "## Results",
        "",
        "| model | role | val bpb (mean ± std) | params | cache bytes | prefill p50 ms | decode p50 / p95 ms "
        "| peak RSS MiB | ONNX MB | params / cache / prefill / decode vs transformer++ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        r = rows.get(m["hash"], {})
        size = (r.get("size_bytes") or {}).get("float32")
        lines.append(
            f"| {m['name'][:20]} | {m['role']} | {m['mean']:.3f} ± {m['std']:.3f} ({m['n_ok']}) | {m['params']:,} | "
            f"{m['cache_bytes']:,} | {_ms(r.get('prefill_ms_p50'))} | {_ms(r.get('decode_ms_p50'))} / "
            f"{_ms(r.get('decode_ms_p95'))} | {r.get('peak_rss_mb', 0):.0f} | "
            f"{'-' if size is None else f'{size / 1e6:.2f}'} | "
            f"{_fmt_ratio(ratio(r, 'params'))} / {_fmt_ratio(ratio(r, 'cache_bytes'))} / "
            f"{_fmt_ratio(ratio(r, 'prefill_ms_p50'))} / {_fmt_ratio(ratio(r, 'decode_ms_p50'))} |")
    names = {m["hash"]: m["name"] for m in models}
    lines += ["", "Layers (operator family per layer, input to output):", ""]
    lines += [f"- {m['name'][:20]} ({m['role']}): {', '.join(m['layers'])}" for m in models]
    lines += ["", "Each evolved model against each baseline (bpb difference = baseline - evolved, so positive means the "
              "evolved model is better; a difference within the larger seed std is a tie):", "",
              "| evolved | baseline | bpb difference | seed spread | verdict | cache ratio | params ratio |",
              "|---|---|---|---|---|---|---|"]
    for c in final["comparisons"]:
        lines.append(f"| {names.get(c['evolved'], c['evolved'])[:20]} | {c['baseline']} | "
                     f"{c['quality_difference']:+.4f} | {c['spread']:.4f} | {c['verdict']} | "
                     f"{_fmt_ratio(c['cache_ratio'])} | {_fmt_ratio(c['params_ratio'])} |")
    lines += ["", "## Headline", ""]
    for baseline in ("transformer++", "striped-hybrid"):
        ok = [c for c in final["comparisons"] if c["baseline"] == baseline and c["verdict"] in ("better", "tie")]
        if not ok:
            lines.append(f"- vs {baseline}: no evolved model reached equal or better quality.")
            continue
        best_cache = min(ok, key=lambda c: c["cache_ratio"])
        best_params = min(ok, key=lambda c: c["params_ratio"])
        lines.append(
            f"- vs {baseline}, at equal or better quality ({len(ok)} of "
            f"{sum(c['baseline'] == baseline for c in final['comparisons'])} evolved models): the lowest cache is "
            f"{_fmt_ratio(best_cache['cache_ratio'])} of {baseline}'s ({_less(best_cache['cache_ratio'], 'less')} cache, "
            f"{names[best_cache['evolved']]}, {best_cache['verdict']}, at {_fmt_ratio(best_cache['params_ratio'])} "
            f"the parameters); the fewest parameters are {_fmt_ratio(best_params['params_ratio'])} "
            f"({_less(best_params['params_ratio'], 'fewer')} parameters, {names[best_params['evolved']]}, "
            f"{best_params['verdict']}).")
    lines += [f"- Verdict of the run: {final['verdict']}", "", f"For scale: {STAR}", "",
              "## Caveats", "",
              f"- Every model here trained for {final['tokens']:,} tokens. At so small a budget, models that learn "
              "fast (recurrences, convolutions) lead models that learn slowly (softmax attention), so quality gaps "
              "are larger than they would be after long training; `bench/fidelity/RESULTS.md` measures how far "
              "rankings at one budget hold at ten times that budget.",
              f"- {len(final['seeds'])} seeds per model; the tie rule above decides what counts as a difference.",
              "- Latencies were measured on this machine, which may have fewer cores than the target names "
              "(the profiler records oversubscription), with the load averages listed above.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--preset", default="quick", choices=("smoke", "quick", "standard"))
    ap.add_argument("--out", type=Path, default=Path("bench/out/headline"))
    ap.add_argument("--markdown", type=Path, default=None, help="default <out>/RESULTS.md")
    ap.add_argument("--report-only", action="store_true", help="write the markdown from a finished run folder")
    args = ap.parse_args()
    if not args.report_only:
        run_factory(args)
    for name in ("job.json", "final.json", "report.json"):
        if not (args.out / name).is_file():
            raise SystemExit(f"{args.out} holds no finished factory run ({name} missing)")
    text = markdown(args.out, machine())
    path = args.markdown or args.out / "RESULTS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
