"""Search benchmark: hit rate against transformer++, a quick search's wall time and evaluations per hour, and
scale-out (evaluations per hour with 2 workers vs 1, process pool and Ray).

    .venv/bin/python bench/bench_search.py [--preset quick] [--population 8] [--generations 4] [--tokens 32768]
                                           [--scale-candidates 8] [--no-ray] [--out bench/out/search]

- hit rate: share of the candidates evaluated from generation 2 on (1-based; generation 1 is the initial population)
  that dominate transformer++ on (val_bpb, cache bytes). transformer++ is adapted to the space (truncated to its
  depth, at its width) and trained in the same run with the same budget, so the comparison is like for like.
  STAR reports > 90% at 125M parameters and 1.3B tokens; at a few seconds of CPU training per candidate, expect
  far less: short budgets favour small, fast-learning models.
- quick search: wall time of the whole search (default workers: one per core, 1 torch thread each) and
  evaluations (trainings) per hour.
- scale-out: the same fixed candidates (random genomes of the space, one seed) evaluated through each executor;
  evaluations per hour = candidates / wall time. The results of every executor are checked to be identical. A
  control row runs 1 worker with 1 thread, to tell the effect of the thread count from that of parallelism.

Writes DIR/results.json and DIR/results.md and prints the table. Machines are noisy: run it on a quiet machine
and read ratios rather than absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sqlite3
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from factory.search.config import PRESETS, SearchConfig  # noqa: E402
from factory.search.executors import available_cores, make_executor  # noqa: E402
from factory.search.objectives import stage_path  # noqa: E402


def hit_rate(run: Path) -> dict:
    db = sqlite3.connect(run / "search.db")
    rows = db.execute("SELECT hash, origin, generation, status, objectives, static FROM evaluations").fetchall()
    ref = [r for r in rows if r[1].startswith("reference:transformer++") and r[3] == "ok"]
    if not ref:
        return {"hit_rate": None, "note": "transformer++ was not in the run (needs the attention family)"}
    ref_q, ref_c = json.loads(ref[0][4])["quality"], json.loads(ref[0][5])["cache_bytes"]
    later = [r for r in rows if r[2] >= 1 and r[3] != "rejected"]
    hits = 0
    for r in later:
        if r[3] != "ok":
            continue
        q, c = json.loads(r[4])["quality"], json.loads(r[5])["cache_bytes"]
        if q <= ref_q and c <= ref_c and (q < ref_q or c < ref_c):
            hits += 1
    return {"hit_rate": hits / len(later) if later else None, "hits": hits, "candidates": len(later),
            "transformer++": {"val_bpb": ref_q, "cache_bytes": ref_c}}


def quick_search(config: SearchConfig, out: Path) -> dict:
    from factory.search.run import start_search

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = start_search(config, out)
    wall = time.perf_counter() - t0
    db = sqlite3.connect(out / "search.db")
    trained = db.execute("SELECT COUNT(*) FROM evaluations WHERE status NOT IN ('rejected')").fetchone()[0]
    busy = db.execute("SELECT SUM(wall_s) FROM evaluations").fetchone()[0] or 0.0
    return {"wall_s": round(wall, 1), "evaluations": trained, "evaluations_per_hour": round(trained / wall * 3600, 1),
            "evaluation_s_mean": round(busy / max(trained, 1), 2), "hypervolume": result["hypervolume"],
            "front": len(result["front"]), **hit_rate(out)}


def scale_out(config: SearchConfig, n: int, kinds: list[tuple[str, int]], workdir: Path) -> list[dict]:
    from factory.search.problem import ArchitectureProblem

    problem = ArchitectureProblem.from_config(config)
    genomes = [problem.space.sample(1000 + i) for i in range(n)]
    stages = problem.stages
    settings = {"train": {k: v for k, v in config.train_config().to_dict().items() if k != "threads"},
                "corpus": config.corpus, "corpus_sha256": "", "mad_steps": config.mad_steps,
                "metrics_context": config.context_for_metrics, "dtype": config.dtype, "target": None,
                "workdir": str(workdir)}
    requests = [{"hash": g.hash(), "genome": g.to_dict(), "stages": stages,
                 "stage_paths": {s: stage_path(s) for s in stages}, "settings": settings} for g in genomes]
    rows, reference = [], None
    for kind, workers, threads in kinds:
        try:
            executor = make_executor(kind, config.evaluator, workers)
        except Exception as e:  # noqa: BLE001 - e.g. Ray missing: report it, go on
            rows.append({"executor": kind, "workers": workers, "error": str(e)})
            continue
        if threads is not None:  # control row: separates the thread count from the parallelism
            executor.threads = threads
        with executor:
            executor.map(requests[:workers], lambda i, r: None)  # warm-up: worker start and imports
            t0 = time.perf_counter()
            results = executor.map(requests, lambda i, r: None)
            wall = time.perf_counter() - t0
        values = [r["measurements"].get("train", {}).get("val_bpb") for r in results]
        reference = reference or values
        rows.append({"executor": kind, "workers": workers, "threads_per_worker": executor.threads,
                     "control": threads is not None,
                     "candidates": n, "wall_s": round(wall, 2), "evaluations_per_hour": round(n / wall * 3600, 1),
                     "failed": sum(r["status"] != "ok" for r in results), "same_results": values == reference})
    base = {r["executor"]: r for r in rows if r.get("workers") == 1 and "error" not in r and not r.get("control")}
    for r in rows:
        b = base.get(r["executor"])
        if b and "error" not in r:
            r["speedup_vs_1_worker"] = round(r["evaluations_per_hour"] / b["evaluations_per_hour"], 2)
    return rows


def markdown(data: dict) -> str:
    q = data["quick_search"]
    hit = "-" if q.get("hit_rate") is None else f"{q['hit_rate']:.0%}"
    lines = [
        f"# Search benchmark ({data['machine']}, {data['cores']} cores, {data['when']})",
        "",
        f"Settings: {data['settings']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| quick search wall time | {q['wall_s']} s |",
        f"| evaluations (trainings) | {q['evaluations']} |",
        f"| evaluations per hour | {q['evaluations_per_hour']} |",
        f"| mean seconds per evaluation | {q['evaluation_s_mean']} |",
        f"| hit rate vs transformer++ (gen >= 2) | {hit} ({q.get('hits', '-')}/{q.get('candidates', '-')}) |",
        f"| final hypervolume / front size | {q['hypervolume']:.4f} / {q['front']} |",
        "",
        "| executor | workers | threads/worker | candidates | wall s | evals/hour | speedup vs 1 worker | same results |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["scale_out"]:
        if "error" in r:
            lines.append(f"| {r['executor']} | {r['workers']} | - | - | - | - | {r['error']} | - |")
        else:
            lines.append(f"| {r['executor']}{' (control)' if r['control'] else ''} | {r['workers']} | "
                         f"{r['threads_per_worker']} | {r['candidates']} | "
                         f"{r['wall_s']} | {r['evaluations_per_hour']} | {r.get('speedup_vs_1_worker', '-')} | "
                         f"{r['same_results']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    ap.add_argument("--population", type=int)
    ap.add_argument("--generations", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--scale-candidates", type=int, default=8)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "search")
    args = ap.parse_args()

    preset = dict(PRESETS[args.preset])
    for key in ("population", "generations", "tokens"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    config = SearchConfig(**preset, objectives=("quality", "cache"))  # default workers: one per core
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"quick search: {preset}", file=sys.stderr)
    quick = quick_search(config, args.out / "run")
    # (executor, workers, forced threads): the rule gives 1 worker cores threads; the control row forces 1 thread
    kinds = [("local", 1, None), ("local", 1, 1), ("local", 2, None)]
    kinds += [] if args.no_ray else [("ray", 1, None), ("ray", 2, None)]
    print(f"scale-out: {args.scale_candidates} candidates through {kinds}", file=sys.stderr)
    scale = scale_out(config, args.scale_candidates, kinds, args.out / "work")
    data = {
        "machine": platform.platform(), "python": platform.python_version(), "cores": available_cores(),
        "when": time.strftime("%Y-%m-%d %H:%M"), "settings": preset, "quick_search": quick, "scale_out": scale,
    }
    (args.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
