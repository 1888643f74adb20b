"""Latency-loop benchmark for a target measurable on this machine (default laptop-cpu):

1. latency-model accuracy: N random genomes of the search space (random weights: latency does not depend on
   them) are exported and measured with onnxruntime under the target's protocol; the per-target latency model is
   cross-validated on them (k-fold: every genome predicted by a model fitted without it). Goal: >= 95% of
   predictions within +-10% (nn-Meter reports 99% on a phone CPU, for CNNs).
2. repeatability: one export profiled 3 times; spread of p50 (max/min - 1).
3. constraint satisfaction: with --run DIR (a `factory run` folder), the share of its re-measured models that meet
   the target's budgets.

    .venv/bin/python bench/bench_latency.py [--target laptop-cpu] [--genomes 24] [--repeats 10] [--run runs/demo]

Measurements go to a private store under --out (not the user's), results to --out/latency.json and latency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--genomes", type=int, default=24)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/out/latency"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["FACTORY_HOME"] = str((args.out / "home").resolve())  # a private measurement store

    from factory.genome.features import latency_features
    from factory.genome.space import SearchSpace
    from factory.model import LIVModel
    from factory.search.latency import measure_model, representative_here
    from profiles.latency_model import cross_validate
    from targets import load_target

    target = load_target(args.target)
    ok, why = representative_here(target)
    if not ok:
        raise SystemExit(f"{target.name} is not measurable on this machine: {why}")
    space = SearchSpace.create(n_layers=args.layers, d_model=args.d_model, context=args.context)
    genomes, seen, seed = [], set(), 0
    while len(genomes) < args.genomes:
        g = space.sample(seed)
        seed += 1
        if g.hash() not in seen:
            seen.add(g.hash())
            genomes.append(g)

    samples = []
    t0 = time.time()
    for i, g in enumerate(genomes):
        m = measure_model(LIVModel(g).eval(), target, args.out / "work", repeats=args.repeats)
        samples.append({"hash": g.hash(), "decode_p95": m["decode_ms"]["p95"], "prefill_p50": m["prefill_ms"]["p50"],
                        "features": {metric: latency_features(g, metric, target.prompt_length, target.decode_context)
                                     for metric in ("decode", "prefill")}})
        print(f"[{i + 1}/{len(genomes)}] {g.hash()} decode p95 {m['decode_ms']['p95']:.3f} ms, "
              f"prefill p50 {m['prefill_ms']['p50']:.2f} ms", flush=True)
    accuracy = {
        "decode_p95": cross_validate("decode", [s["features"]["decode"] for s in samples], [s["decode_p95"] for s in samples]),
        "prefill_p50": cross_validate("prefill", [s["features"]["prefill"] for s in samples], [s["prefill_p50"] for s in samples]),
    }

    # Repeatability: the first genome, profiled three more times.

    repeat = [measure_model(LIVModel(genomes[0]).eval(), target, args.out / "work", repeats=args.repeats)
              for _ in range(3)]
    p50s = {k: [r[k]["p50"] for r in repeat] for k in ("decode_ms", "prefill_ms")}
    spread = {k: max(v) / min(v) - 1.0 for k, v in p50s.items()}

    satisfaction = None
    if args.run:
        report = json.loads((args.run / "report.json").read_text())
        rows = [r for r in report["comparison"] if r.get("within_budget")]
        met = [r for r in rows if all(r["within_budget"].values())]
        satisfaction = {"models": len(rows), "within_all_budgets": len(met),
                        "share": len(met) / len(rows) if rows else None}

    result = {"target": target.name, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "genomes": len(samples), "wall_s": round(time.time() - t0, 1), "accuracy": accuracy,
              "repeatability_p50": p50s, "repeatability_spread": spread, "constraint_satisfaction": satisfaction,
              "samples": samples, "command": " ".join(["bench/bench_latency.py"] + os.sys.argv[1:])}
    (args.out / "latency.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Latency loop on {target.name}", "", f"Machine: {result['machine']['platform']}, "
             f"{result['machine']['cpus']} CPUs. Command: `.venv/bin/python {result['command']}`", "",
             "| measure | value |", "|---|---|"]
    for k, a in accuracy.items():
        lines.append(f"| {k}: held-out within +-10% / mean rel. error (n={a['n']}) | "
                     f"{a['within_10pct']:.0%} / {a['mean_relative_error']:.1%} |")
    for k, s in spread.items():
        lines.append(f"| repeatability of {k} p50 over 3 profiles (max/min - 1) | {s:.1%} |")
    if satisfaction:
        lines.append(f"| winners within all target budgets (re-measured) | {satisfaction['within_all_budgets']}"
                     f"/{satisfaction['models']} |")
    (args.out / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
