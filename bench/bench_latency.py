"""Latency-loop benchmark for a target measurable on this machine (default laptop-cpu):

1. latency-model accuracy: N random genomes of the search space (random weights: latency does not depend on
   them) are exported and measured with onnxruntime under the target's protocol; the per-target latency model is
   cross-validated on them (k-fold: every genome predicted by a model fitted without it). Goal: >= 95% of
   predictions within +-10% (nn-Meter reports 99% on a phone CPU, for CNNs).
2. repeatability: two exports profiled 3 times each; spread of decode p50/p95 and prefill p50 (max/min - 1).
3. constraint satisfaction: with --run DIR (a `factory run` folder), the share of its re-measured models that meet
   the target's budgets.

    .venv/bin/python bench/bench_latency.py [--target laptop-cpu] [--threads 2] [--genomes 24] [--repeats 10] [--run runs/demo]

Measurements go to a private store under --out (not the user's), results to --out/latency.json and latency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _totals(features: dict) -> dict:
    """Each per-family group summed over the families: one price per quantity instead of one per family."""
    out = {}
    for k, v in features.items():
        group = next((g for g in ("layers", "kops", "flops", "act_mb") if k.startswith(g + "_") and k != "kops_head"), k)
        out[group] = out.get(group, 0.0) + v
    return out


FEATURE_SETS = {
    # what the search's pre-filter uses (factory.features.latency_features): per-family prices
    "factory": lambda f: f,
    # the same without the dispatched-operation counts: the genome's formulas alone
    "without kops": lambda f: {k: v for k, v in f.items() if not k.startswith("kops")},
    # one price per quantity, not per family
    "family totals": _totals,
    # the operation count alone
    "kops only": lambda f: {"kops": sum(v for k, v in f.items() if k.startswith("kops"))},
}
QUANTITIES = {"decode_p50": "decode", "decode_p95": "decode", "prefill_p50": "prefill"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="measure with this many intra-op threads instead of the target's (recorded in the results)")
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

    from dataclasses import replace

    from factory.errors import FactoryError
    from factory.features import latency_features
    from factory.genome.space import SearchSpace
    from factory.model import LIVModel
    from factory.search.latency import measure_model, representative_here
    from profiles.latency_model import cross_validate
    from profiles.runner import PROTOCOL_VERSION
    from targets import load_target

    target = load_target(args.target)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be a positive integer")
        target = replace(target, threads=args.threads)
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

    # Measured samples are kept in a cache keyed by genome and protocol settings: a rerun with more --genomes
    # only measures the new ones.
    cache_path = args.out / "samples.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    setting = f"{target.fingerprint()}:threads={target.threads}:repeats={args.repeats}:protocol={PROTOCOL_VERSION}"
    samples, failed = [], []
    t0 = time.time()
    for i, g in enumerate(genomes):
        key = f"{g.hash()}:{setting}"
        if key not in cache:
            try:
                m = measure_model(LIVModel(g).eval(), target, args.out / "work", repeats=args.repeats)
                cache[key] = {"hash": g.hash(), "decode_p50": m["decode_ms"]["p50"],
                              "decode_p95": m["decode_ms"]["p95"], "prefill_p50": m["prefill_ms"]["p50"],
                              "prefill_p95": m["prefill_ms"]["p95"]}
            except FactoryError as e:  # one genome that cannot be exported or measured must not stop the benchmark
                cache[key] = {"hash": g.hash(), "failed": str(e).splitlines()[0]}
            tmp = cache_path.with_name(".samples.json.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cache_path)
        if "failed" in cache[key]:
            failed.append(cache[key])
            print(f"[{i + 1}/{len(genomes)}] {g.hash()[:10]} FAILED: {cache[key]['failed']}", flush=True)
            continue
        s = dict(cache[key])
        s["features"] = {metric: latency_features(g, metric, target.prompt_length, target.decode_context)
                         for metric in ("decode", "prefill")}
        samples.append(s)
        print(f"[{i + 1}/{len(genomes)}] {g.hash()[:10]} decode p50/p95 {s['decode_p50']:.3f}/{s['decode_p95']:.3f} ms, "
              f"prefill p50 {s['prefill_p50']:.2f} ms", flush=True)
    accuracy = {}
    for quantity, metric in QUANTITIES.items():
        for name, transform in FEATURE_SETS.items():
            rows = [transform(s["features"][metric]) for s in samples]
            accuracy[f"{quantity} ({name})"] = cross_validate(metric, rows, [s[quantity] for s in samples])

    # Repeatability: the first two genomes, each profiled three more times.
    repeated, spread = {}, {}
    measured = {s["hash"] for s in samples}
    for g in [g for g in genomes if g.hash() in measured][:2]:
        repeat = [measure_model(LIVModel(g).eval(), target, args.out / "work", repeats=args.repeats)
                  for _ in range(3)]
        for k, stat in (("decode_ms", "p50"), ("decode_ms", "p95"), ("prefill_ms", "p50")):
            values = [r[k][stat] for r in repeat]
            repeated[f"{g.hash()[:10]} {k} {stat}"] = values
            spread[f"{g.hash()[:10]} {k} {stat}"] = max(values) / min(values) - 1.0

    satisfaction = None
    if args.run:
        report = json.loads((args.run / "report.json").read_text())
        rows = [r for r in report["comparison"] if r.get("within_budget")]
        met = [r for r in rows if all(r["within_budget"].values())]
        satisfaction = {"models": len(rows), "within_all_budgets": len(met),
                        "share": len(met) / len(rows) if rows else None}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"target": target.name, "threads": target.threads,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_1min_at_end": load},
              "genomes": len(samples), "failed": failed, "wall_s": round(time.time() - t0, 1), "accuracy": accuracy,
              "repeatability": repeated, "repeatability_spread": spread, "constraint_satisfaction": satisfaction,
              "samples": samples, "command": " ".join(["bench/bench_latency.py"] + os.sys.argv[1:])}
    (args.out / "latency.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Latency loop on {target.name} ({target.threads} threads)", "",
             f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, 1-minute load at the end "
             f"{load}. Command: `.venv/bin/python {result['command']}`", "",
             f"{len(samples)} genomes measured, {len(failed)} failed to export or measure.", "",
             "| measure | value |", "|---|---|"]
    for k, a in accuracy.items():
        lines.append(f"| {k}: held-out within +-10% / mean rel. error (n={a['n']}) | "
                     f"{a['within_10pct']:.0%} / {a['mean_relative_error']:.1%} |")
    for k, s in spread.items():
        lines.append(f"| repeatability of {k} over 3 profiles (max/min - 1) | {s:.1%} |")
    if satisfaction:
        lines.append(f"| winners within all target budgets (re-measured) | {satisfaction['within_all_budgets']}"
                     f"/{satisfaction['models']} |")
    (args.out / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
