"""How steady a decode step's p95 is on this machine, and whether measuring it differently makes it steadier.

Decode p95 is a target's budget statistic (decode ms per token at p95), so the latency model is judged on it too,
and no model can be judged more finely than the measurement repeats. This benchmark measures the same exports in
--passes round-robin passes (as bench_latency does), each pass with every setting below, interleaved:

    steps=N       N timed decode steps in one profile (the protocol's DECODE_MIN_STEPS is 200): does a longer
                  sample of the tail give a steadier p95?
    pinned        the measuring process held on one core (os.sched_setaffinity, Linux; 1 intra-op thread)
    gc off        Python's garbage collector off while the steps are timed

and reports, per setting, the noise ceiling bench_latency reports (the lowest p95 of the odd passes against the
lowest of the even ones, within 10%), how far one genome's p95 moves across passes, and p95 / p50.

    .venv/bin/python bench/research/decode_tail.py --exports bench/out/latency/exports [--target laptop-cpu] [--genomes 16]
        [--passes 6] [--steps 200,2000,10000] [--out bench/out/decode-tail]

--exports is a folder of exports (bench_latency leaves one under its --out); each is measured in the variant the
target prefers, at its decode_context, with 1 intra-op thread (as bench_latency --threads 1). Results:
--out/decode_tail.json and decode_tail.md. Run it with nothing else running: it measures for a few minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from factory.errors import FactoryError  # noqa: E402
from profiles import runner  # noqa: E402  (the protocol's own session, past and timing functions)
from profiles.profiler import choose_variant  # noqa: E402
from targets import load_target  # noqa: E402

THREADS = 1


def decode_step(export_dir: Path, target):
    """(decode session, feeds) for one step at the target's decode_context, the past from a real prefill, as the
    protocol."""
    manifest = runner.read_manifest(export_dir)
    context = target.decode_context
    prefill_path, decode_path = runner.variant_paths(export_dir, manifest, choose_variant(manifest, target, None,
                                                                                          export_dir))
    providers, options = ["CPUExecutionProvider"], [{}]
    prefill, _ = runner.create_session(prefill_path, providers, options, THREADS)
    decode, _ = runner.create_session(decode_path, providers, options, THREADS)
    past, _ = runner.build_past(prefill, decode, manifest, context, runner.vocab_size(manifest))
    return decode, runner.decode_feeds(past, context)


def timed(decode, feeds, steps: int, pinned: bool, gc_off: bool) -> list[float]:
    everywhere = os.sched_getaffinity(0) if pinned else None
    try:
        if pinned:
            os.sched_setaffinity(0, {max(everywhere)})
        if gc_off:
            gc.collect()
            gc.disable()
        return runner.time_runs(decode, feeds, runner.DECODE_WARMUP, steps)
    finally:
        gc.enable()
        if pinned:
            os.sched_setaffinity(0, everywhere)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exports", type=Path, required=True)
    ap.add_argument("--genomes", type=int, default=16)
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument("--steps", default="200,2000,10000")
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/out/decode-tail"))
    args = ap.parse_args()
    target = load_target(args.target)
    try:
        step_counts = [int(s) for s in args.steps.split(",")]
    except ValueError:
        raise SystemExit(f"--steps must be comma-separated integers, got {args.steps!r}") from None
    if min(step_counts) < 20 or args.passes < 2 or args.genomes < 1:
        raise SystemExit("need --steps of at least 20, --passes of at least 2 and --genomes of at least 1")
    exports = sorted(p for p in args.exports.iterdir() if (p / "manifest.json").is_file()) \
        if args.exports.is_dir() else []
    if not exports:
        raise SystemExit(f"--exports {args.exports}: no exports (folders with a manifest.json) there")
    random.Random(1).shuffle(exports)
    exports = exports[: args.genomes]
    pinnable = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1
    base = step_counts[0]
    settings = {f"steps={n}": (n, False, False) for n in step_counts}
    settings[f"steps={base}, gc off"] = (base, False, True)
    if pinnable:
        settings[f"steps={base}, pinned"] = (base, True, False)

    t0 = time.time()
    samples = {e.name: {s: [] for s in settings} for e in exports}  # (p50, p95) per pass
    for pass_ in range(args.passes):
        for i, export in enumerate(exports):
            order = list(settings) if pass_ % 2 == 0 else list(settings)[::-1]  # no setting always goes first
            for name in order:
                decode, feeds = decode_step(export, target)  # a fresh session, as every profile has
                ms = timed(decode, feeds, *settings[name])
                samples[export.name][name].append([float(v) for v in np.percentile(ms, [50, 95])])
            print(f"[pass {pass_ + 1}/{args.passes} {i + 1}/{len(exports)}] {export.name[:10]}", flush=True)

    table = {}
    for name in settings:
        p50 = np.array([[p[0] for p in samples[e][name]] for e in samples])  # genomes x passes
        p95 = np.array([[p[1] for p in samples[e][name]] for e in samples])
        halves = np.abs(p95[:, 0::2].min(axis=1) / p95[:, 1::2].min(axis=1) - 1.0)
        spread = p95.max(axis=1) / p95.min(axis=1) - 1.0
        table[name] = {"lowest_halves_within_10pct": float(np.mean(halves <= 0.10)),
                       "lowest_halves_median_gap": float(np.median(halves)),
                       "passes_median_spread": float(np.median(spread)),
                       "p95_over_p50": float(np.median(p95 / p50)),
                       "p50_lowest_halves_within_10pct": float(np.mean(
                           np.abs(p50[:, 0::2].min(axis=1) / p50[:, 1::2].min(axis=1) - 1.0) <= 0.10))}
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["bench/research/decode_tail.py"] + sys.argv[1:])
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "genomes": len(exports),
              "passes": args.passes, "target": target.name, "context": target.decode_context, "threads": THREADS,
              "wall_s": round(time.time() - t0, 1), "settings": table, "samples": samples, "command": command}
    (args.out / "decode_tail.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Decode p95 across passes ({len(exports)} exports, {args.passes} passes, {THREADS} thread, "
             f"{target.name}, context {target.decode_context})", "",
             f"Machine: {result['machine']['platform']}, {os.cpu_count()} CPUs. "
             f"Command: `.venv/bin/python {command}`", "",
             "| setting | p95: lowest of odd vs even passes within 10% (median gap) | p95 spread across passes "
             "(median) | p95 / p50 | p50: lowest halves within 10% |", "|---|---|---|---|---|"]
    for name, t in table.items():
        lines.append(f"| {name} | {t['lowest_halves_within_10pct']:.0%} ({t['lowest_halves_median_gap']:.1%}) | "
                     f"{t['passes_median_spread']:.0%} | {t['p95_over_p50']:.2f} | "
                     f"{t['p50_lowest_halves_within_10pct']:.0%} |")
    (args.out / "decode_tail.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except FactoryError as e:  # a target that does not load, an export without the target's variant
        raise SystemExit(str(e).splitlines()[0]) from None
