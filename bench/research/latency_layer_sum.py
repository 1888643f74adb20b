"""Is a genome's latency the sum of its layers' (nn-Meter's kernel-level assumption)? A check on this machine.

For the first N genomes measured by bench_latency.py (its --out folder), every layer is exported alone (a
one-layer genome with the same width, vocabulary and context), all layers before the first measurement, then
profiled in --passes round-robin passes with the lowest p50 kept (bench/measure_passes.py, as bench_latency.py
measures the genomes themselves); the genome's measured latency is then compared with the sum of its layers' (each including
the embedding and head, so a fitted a * sum + b, cross-validated, is reported beside the raw ratio).

    .venv/bin/python bench/research/latency_layer_sum.py --samples bench/out/latency --genomes 16 --threads 1 [--passes 10]

Writes <out>/layer_sum.json (default bench/out/latency-layer-sum/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the measuring helpers it shares

from measure_passes import export_all, export_for_target, lowest, measure_in_passes  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, required=True, help="a bench_latency.py --out folder (its latency.json)")
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--genomes", type=int, default=16)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/out/latency-layer-sum"))
    args = ap.parse_args()
    if args.passes < 1:
        raise SystemExit("--passes must be a positive integer")
    if args.genomes < 3:
        raise SystemExit("--genomes must be at least 3 (the fitted a * sum + b is cross-validated)")
    results_file = args.samples / "latency.json"
    if not results_file.is_file():
        raise SystemExit(f"{results_file} not found: run bench/bench_latency.py --out {args.samples} first")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["FACTORY_HOME"] = str((args.out / "home").resolve())

    from factory.genome.schema import Genome, LayerGene
    from factory.model import LIVModel
    from factory.search.outputs import atomic_write
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
    setting = f"{target.fingerprint()}:threads={target.threads}:repeats={args.repeats}"

    def save_cache():
        atomic_write(cache_path, json.dumps(cache, indent=1))

    def alone(g: Genome, i: int) -> Genome:  # layer i of g as a one-layer genome
        return replace(g, classes=(g.layer_spec(i),), layers=(LayerGene(op_class=0),)).validate()

    layers = {alone(g, i).hash(): alone(g, i) for g in genomes for i in range(g.n_layers)}
    entries = {h: cache.setdefault(f"{h}:{setting}", {"hash": h}) for h in layers}

    def exported(h: str) -> Path:
        export = args.out / "exports" / h
        if not (export / "manifest.json").is_file():
            export_for_target(LIVModel(layers[h]).eval(), target, export)
        return export

    def measure(export: Path) -> dict:
        m = profile_artifact(export, target, repeats=args.repeats, record=False, memory=False)
        return {"prefill": m["prefill_ms"]["p50"], "decode": m["decode_ms"]["p50"]}

    exports = export_all(entries, exported, save_cache)
    measure_in_passes(exports, entries, args.passes, measure, save_cache,
                      lambda m: f"prefill p50 {m['prefill']:.2f} ms, decode p50 {m['decode']:.3f} ms")
    failed = [h for h, e in entries.items() if "failed" in e]
    if failed:
        raise SystemExit(f"{len(failed)} layer(s) could not be exported or measured, e.g. {entries[failed[0]]['failed']}")

    rows = []
    for g, s in zip(genomes, measured):
        parts = [entries[alone(g, i).hash()] for i in range(g.n_layers)]
        rows.append({"hash": g.hash(), "prefill": s["prefill_p50"], "decode": s["decode_p50"],
                     "sum_prefill": sum(lowest(e, args.passes, "prefill") for e in parts),
                     "sum_decode": sum(lowest(e, args.passes, "decode") for e in parts)})
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
