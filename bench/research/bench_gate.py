"""Measurement-gate benchmark: what a training process beside a latency measurement does to it, with and without
factory.measure_gate.

In a search, one worker measures a candidate while the others train theirs. The profile stage measures inside
`measure_gate.measuring()`, so training on this machine pauses between steps while it runs. This benchmark:

1. exports N random genomes of the search space (kept under --out/exports; --exports DIR reuses exports named by
   genome hash, e.g. bench_latency.py's) and measures each quietly: the lowest of --passes round-robin passes
   (bench/measure_passes.py), the reference;
2. starts a trainer process (factory.train.train with one thread, as a search worker trains on a 2-core machine,
   every step inside `measure_gate.working()`), then profiles every export once gated and once ungated, side by
   side (which goes first alternates);
3. reports, per quantity, the share of single measurements within +-10% of the reference and their median ratio
   to it, gated and ungated, and the time a gated measurement holds the trainer.

    .venv/bin/python bench/research/bench_gate.py [--target laptop-cpu] [--threads 1] [--genomes 24] [--passes 5]
        [--exports bench/out/latency/exports]

Writes --out/gate.json and gate.md (default bench/out/gate/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the measuring helpers it shares

from measure_passes import distinct_samples, export_all, export_for_target, lowest, measure_in_passes  # noqa: E402

QUANTITIES = ("decode_p50", "decode_p95", "prefill_p50")

TRAINER = """
import sys
from factory.data.corpus import load_corpus
from factory.genome.references import reference_genomes
from factory.train import TrainConfig, train
genome = reference_genomes()["transformer++"]
train(genome, load_corpus(None), TrainConfig(tokens=10**9, seq_len=128, batch_size=8, threads=1),
      progress=lambda step, steps, loss: print(step, flush=True))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="measure with this many intra-op threads (a search worker on 2 cores gets 1)")
    ap.add_argument("--genomes", type=int, default=24)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=None,
                    help="prefill repetitions per profile (default: the search's, profiles.latency.PROFILE_REPEATS)")
    ap.add_argument("--exports", type=Path, default=None, help="a folder of exports named by genome hash to reuse")
    ap.add_argument("--out", type=Path, default=Path("bench/out/gate"))
    args = ap.parse_args()
    if args.threads < 1 or args.genomes < 1 or args.passes < 1 or (args.repeats is not None and args.repeats < 1):
        raise SystemExit("--threads, --genomes, --passes and --repeats must be positive integers")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["FACTORY_HOME"] = str((args.out / "home").resolve())  # a private measurement store

    from dataclasses import replace

    from factory import measure_gate
    from factory.genome.space import SearchSpace
    from factory.model import LIVModel
    from profiles.latency import PROFILE_REPEATS, representative_here
    from factory.search.outputs import atomic_write
    from profiles.profiler import profile_artifact
    from targets import load_target

    args.repeats = PROFILE_REPEATS if args.repeats is None else args.repeats
    if not measure_gate.enabled():
        raise SystemExit(f"the measurement gate is off here ({measure_gate.ENV}=0, or no POSIX flock)")
    target = replace(load_target(args.target), threads=args.threads)
    ok, why = representative_here(target)
    if not ok:
        raise SystemExit(f"{target.name} is not measurable on this machine: {why}")
    space = SearchSpace.create(n_layers=6, d_model=64, context=256)  # bench_latency.py's space and seeds
    genomes = distinct_samples(space, args.genomes)
    by_hash = {g.hash(): g for g in genomes}

    def exported(h: str) -> Path:
        for folder in ([args.exports] if args.exports else []) + [args.out / "exports"]:
            if (folder / h / "manifest.json").is_file():
                return folder / h
        return export_for_target(LIVModel(by_hash[h]).eval(), target, args.out / "exports" / h)

    def profile(export_dir: Path) -> dict:
        m = profile_artifact(export_dir, target, repeats=args.repeats, memory=False, record=False)
        return {q: m[f"{q.split('_')[0]}_ms"][q.split("_")[1]] for q in QUANTITIES}

    cache_path = args.out / "samples.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    entries = {h: cache.setdefault(f"{h}:threads={target.threads}:repeats={args.repeats}", {"hash": h}) for h in by_hash}

    def save():
        atomic_write(cache_path, json.dumps(cache, indent=1))

    t0 = time.time()
    exports = export_all(entries, exported, save)
    measure_in_passes(exports, entries, args.passes, profile, save,
                      lambda m: " ".join(f"{q} {m[q]:.3f}" for q in QUANTITIES))

    # Beside a trainer: each export once gated, once not, alternating which goes first.
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        first_step = trainer.stdout.readline()  # the trainer is running once it has logged a step
        if not first_step:
            raise SystemExit("the trainer process did not start")
        rows, held = [], []
        for i, (h, export) in enumerate(exports.items()):
            if "failed" in entries[h]:
                continue
            order = ("gated", "ungated") if i % 2 == 0 else ("ungated", "gated")
            row = {"hash": h, "reference": {q: lowest(entries[h], args.passes, q) for q in QUANTITIES}}
            for mode in order:
                gate = measure_gate.measuring() if mode == "gated" else contextlib.nullcontext()
                started = time.perf_counter()
                with gate:
                    row[mode] = profile(export)
                if mode == "gated":
                    held.append(time.perf_counter() - started)
            rows.append(row)
            print(f"[beside training {i + 1}/{len(exports)}] {h[:10]} " + " ".join(
                f"{q} ref {row['reference'][q]:.3f} gated {row['gated'][q]:.3f} ungated {row['ungated'][q]:.3f}"
                for q in QUANTITIES), flush=True)
        if trainer.poll() is not None:
            raise SystemExit("the trainer process stopped during the measurements: the comparison is void")
    finally:
        trainer.kill()
        trainer.wait()

    summary = {}
    for q in QUANTITIES:
        for mode in ("gated", "ungated"):
            ratio = np.array([r[mode][q] / r["reference"][q] for r in rows])
            summary[f"{q} {mode}"] = {"within_10pct": float(np.mean(np.abs(ratio - 1) <= 0.10)),
                                      "median_ratio": float(np.median(ratio)), "max_ratio": float(ratio.max())}
    result = {"target": target.name, "threads": target.threads, "genomes": len(rows), "passes": args.passes,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "summary": summary,
              "gated_measurement_s": {"median": float(np.median(held)), "max": float(max(held))},
              "rows": rows, "wall_s": round(time.time() - t0, 1),
              "command": " ".join(["bench/research/bench_gate.py"] + sys.argv[1:])}
    (args.out / "gate.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Measurement gate on {target.name} ({target.threads} thread(s)), beside a training process", "",
             f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs. Command: "
             f"`.venv/bin/python {result['command']}`", "",
             f"{len(rows)} genomes; reference: lowest of {args.passes} quiet passes; one measurement each, gated "
             f"and ungated, beside a trainer.", "",
             "| quantity | gated: within +-10% of reference / median ratio | ungated: within +-10% / median ratio |",
             "|---|---|---|"]
    for q in QUANTITIES:
        g, u = summary[f"{q} gated"], summary[f"{q} ungated"]
        lines.append(f"| {q} | {g['within_10pct']:.0%} / {g['median_ratio']:.2f}x | "
                     f"{u['within_10pct']:.0%} / {u['median_ratio']:.2f}x |")
    lines += ["", f"A gated measurement holds training for {result['gated_measurement_s']['median']:.1f} s "
                  f"(median; max {result['gated_measurement_s']['max']:.1f} s)."]
    (args.out / "gate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
