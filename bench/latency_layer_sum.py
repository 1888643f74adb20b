"""Is a genome's latency the sum of its layers' (nn-Meter's kernel-level assumption)? A check on this machine.

For the first N genomes measured by bench_latency.py (its --out folder), every layer is exported alone (a
one-layer genome with the same width, vocabulary and context) and profiled 3 times (the lowest p50 kept, as in
bench_latency.py); the genome's measured latency is then compared with the sum of its layers' (each including
the embedding and head, so a fitted a * sum + b, cross-validated, is reported beside the raw ratio).

    .venv/bin/python bench/latency_layer_sum.py --samples bench/out/latency-v2 --genomes 16 --threads 1

Writes <out>/layer_sum.json (default bench/out/latency-layer-sum/).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, required=True, help="a bench_latency.py --out folder (its latency.json)")
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--genomes", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench/out/latency-layer-sum"))
    args = ap.parse_args()
    results_file = args.samples / "latency.json"
    if not results_file.is_file():
        raise SystemExit(f"{results_file} not found: run bench/bench_latency.py --out {args.samples} first")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["FACTORY_HOME"] = str((args.out / "home").resolve())

    from factory.genome.schema import Genome, LayerGene
    from factory.model import LIVModel
    from factory.search.latency import export_for_target
    from profiles.latency_model import cross_validate
    from profiles.profiler import profile_artifact
    from profiles.store import load_archived_genome
    from targets import load_target

    target = load_target(args.target)
    if args.threads is not None:
        target = replace(target, threads=args.threads)
    measured = json.loads(results_file.read_text())["samples"][: args.genomes]
    os.environ["FACTORY_HOME"] = str((args.samples / "home").resolve())  # the genomes bench_latency.py archived
    genomes = [Genome.from_dict(load_archived_genome(s["hash"])) for s in measured]
    os.environ["FACTORY_HOME"] = str((args.out / "home").resolve())

    cache_path = args.out / "layers.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def layer_ms(genome: Genome) -> dict:
        if genome.hash() not in cache:
            export = args.out / "exports" / genome.hash()
            if not (export / "manifest.json").is_file():
                export_for_target(LIVModel(genome).eval(), target, export)
            runs = [profile_artifact(export, target, repeats=10, record=False, memory=False) for _ in range(3)]
            cache[genome.hash()] = {"prefill": min(r["prefill_ms"]["p50"] for r in runs),
                                    "decode": min(r["decode_ms"]["p50"] for r in runs)}
            cache_path.write_text(json.dumps(cache, indent=1))
        return cache[genome.hash()]

    rows = []
    for g, s in zip(genomes, measured):
        alone = [layer_ms(replace(g, classes=(g.layer_spec(i),), layers=(LayerGene(op_class=0),)).validate())
                 for i in range(g.n_layers)]
        rows.append({"hash": g.hash(), "prefill": s["prefill_p50"], "decode": s["decode_p50"],
                     "sum_prefill": sum(a["prefill"] for a in alone), "sum_decode": sum(a["decode"] for a in alone)})
        print(f"{g.hash()[:10]} prefill {rows[-1]['prefill']:.2f} ms, sum of layers {rows[-1]['sum_prefill']:.2f}; "
              f"decode {rows[-1]['decode']:.3f}, sum {rows[-1]['sum_decode']:.3f}", flush=True)
    summary = {}
    for q in ("prefill", "decode"):
        x, y = np.array([r[f"sum_{q}"] for r in rows]), np.array([r[q] for r in rows])
        summary[q] = {"raw_sum_within_10pct": float(np.mean(np.abs(x / y - 1) <= 0.10)),
                      "fitted": cross_validate(q, [{"layer_sum_ms": v} for v in x], y)}
    (args.out / "layer_sum.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print("| quantity | raw sum within +-10% | a * sum + b held-out within +-10% / mean rel. error |")
    print("|---|---|---|")
    for q, v in summary.items():
        f = v["fitted"]
        print(f"| {q} p50 | {v['raw_sum_within_10pct']:.0%} | {f['within_10pct']:.0%} / {f['mean_relative_error']:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
