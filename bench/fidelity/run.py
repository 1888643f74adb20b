"""Search fidelity benchmark: does the search's short training budget rank genomes like a 10x longer one?

Every genome (all references, Perceiver-AR with fewer latents than --seq-len so that it differs from full
attention, then random samples of the 8-layer / width-128 / context-256 search space, distinct by hash) is trained
at --tokens and at --multiplier x --tokens, --seeds seeds each, and scored by the MAD proxy (mean accuracy over
the MAD tasks after --mad-steps steps). Reported: Spearman and Kendall between the two budgets' val bpb (seed
means), the seed-to-seed spread and order flips at each budget, and MAD vs the long-budget bpb.
Goal: Spearman >= 0.8.

    .venv/bin/python bench/fidelity/run.py [--tokens 200000] [--multiplier 10] [--seeds 2] [--genomes 16]
        [--corpus PATH] [--threads 1] [--out bench/out/fidelity] [--markdown PATH] [--report-only]

Resumable: each (genome, budget, seed) result and each MAD score is appended to <out>/cache.jsonl as it finishes,
keyed by the genome hash, the training config and the corpus hash, so a killed run continues where it stopped.
--report-only writes the report from the cache without training anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from factory.data.corpus import load_corpus
from factory.data.mad import TASKS
from factory.errors import FactoryError
from factory.fidelity import kendall_tau, rank_agreement, spearman, top_overlap
from factory.genome.metrics import param_count
from factory.genome.references import reference_genomes
from factory.genome.space import SearchSpace
from factory.train import TrainConfig, mad_score, train

GOAL = 0.8


def perceiver_genome(seq_len: int):
    """The perceiver-ar reference with fewer latents than the training windows' length, so that it is trained and
    scored as Perceiver-AR (with latents >= seq_len every position is a latent: plain full attention). Its latent
    count is the largest of the search space's values below seq_len (seq_len // 2 if none is)."""
    from factory.genome.codec import GLOBAL_DOMAINS

    ref = reference_genomes()["perceiver-ar"]
    if ref.latents < seq_len:
        return ref
    below = [v for v in GLOBAL_DOMAINS["latents"] if 0 < v < seq_len]
    latents = max(below) if below else max(1, seq_len // 2)
    return replace(ref, latents=latents, name=f"perceiver-ar-{latents}").validate()


def pick_genomes(n: int, seq_len: int = 128) -> list:
    """transformer++, Perceiver-AR on the same layers (latents below seq_len: `perceiver_genome`), the other
    references, then random search-space samples (seed 0, 1, ...), skipping duplicate hashes."""
    out, seen = [], set()

    def add(g):
        if g.hash() not in seen:
            seen.add(g.hash())
            out.append(g)

    refs = reference_genomes()
    add(refs.pop("transformer++"))
    refs.pop("perceiver-ar")
    add(perceiver_genome(seq_len))
    for g in refs.values():
        add(g)
    space = SearchSpace.create(n_layers=8, d_model=128, context=256)
    seed = 0
    while len(out) < n and seed < 10_000:
        add(replace(space.sample(seed), name=f"sample-{seed}"))
        seed += 1
    return out[:n]


class Cache:
    """Append-only JSON lines; a line cut short by a kill is skipped on reading."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = {row["key"]: row for row in self.lines(path) if "key" in row}

    @staticmethod
    def lines(path: Path) -> list[dict]:
        rows = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, row: dict) -> None:
        self.rows[row["key"]] = row
        with self.path.open("a+b") as f:
            f.seek(0, os.SEEK_END)
            cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"  # a line cut short by a kill
            f.write((("\n" if cut else "") + json.dumps(row) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def finite_or_none(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def train_key(genome, cfg: TrainConfig, corpus) -> str:
    # threads do not change what is learned, so a resumed run may use another thread count
    return f"train:{genome.hash()}:{replace(cfg, threads=None).hash()}:{corpus.sha256[:16]}"


def mad_key(genome, args) -> str:
    return f"mad:{genome.hash()}:{args.mad_steps}:{args.mad_n_train}:{','.join(args.mad_tasks)}:0"


def run_jobs(genomes, corpus, args, cache: Cache, report_only: bool) -> dict:
    """Cheap jobs first (all short runs), then the long runs, then MAD, so a partial run is still useful."""
    budgets = {"low": args.tokens, "high": args.tokens * args.multiplier}
    jobs = [("train", g, b, s) for b in ("low", "high") for g in genomes for s in range(args.seeds)]
    if args.mad_steps > 0:
        jobs += [("mad", g, None, 0) for g in genomes]
    counts = {"run": 0, "cached": 0, "failed": 0, "missing": 0}
    t_start = time.perf_counter()
    for i, (kind, g, budget, seed) in enumerate(jobs, 1):
        if kind == "train":
            cfg = TrainConfig(tokens=budgets[budget], seq_len=args.seq_len, batch_size=args.batch_size,
                              seed=seed, threads=args.threads)
            key = train_key(g, cfg, corpus)
            label = f"train {g.name} tokens={cfg.tokens} seed={seed}"
        else:
            key = mad_key(g, args)
            label = f"mad {g.name} steps={args.mad_steps}"
        if cache.get(key):
            counts["cached"] += 1
            continue
        if report_only:
            counts["missing"] += 1
            continue
        t0 = time.perf_counter()
        try:
            if kind == "train":
                _, r = train(g, corpus, cfg)
                row = {"status": r.status, "val_bpb": finite_or_none(r.val_bpb), "steps": r.steps,
                       "wall_s": r.wall_s, "reason": r.reason, "tokens": cfg.tokens, "seed": seed}
                shown = f"{r.status} bpb {r.val_bpb:.4f}"
            else:
                s = mad_score(g, tasks=args.mad_tasks, steps=args.mad_steps, n_train=args.mad_n_train, seed=0,
                              threads=args.threads)
                row = {"status": "ok", "mad": s, "wall_s": round(time.perf_counter() - t0, 3)}
                shown = f"mean acc {s['mean']:.4f}"
        except (FactoryError, RuntimeError, ValueError) as e:  # one broken genome must not stop the benchmark
            counts["failed"] += 1
            print(f"[{i}/{len(jobs)}] {label}: FAILED {str(e).splitlines()[0]}", flush=True)
            continue
        cache.put({"key": key, "kind": kind, "hash": g.hash(), "name": g.name, **row})
        counts["run"] += 1
        elapsed = time.perf_counter() - t_start
        print(f"[{i}/{len(jobs)}] {label}: {shown} ({time.perf_counter() - t0:.1f} s, {elapsed / 60:.1f} min in)",
              flush=True)
    return counts


def collect(genomes, corpus, args, cache: Cache) -> dict:
    """Per-genome rows and the agreement statistics, from whatever the cache holds."""
    budgets = {"low": args.tokens, "high": args.tokens * args.multiplier}
    rows, per_budget, mad = [], {"low": {}, "high": {}}, {}
    for g in genomes:
        row = {"name": g.name, "hash": g.hash(), "params": param_count(g)}
        hits = []
        for b, tokens in budgets.items():
            vals = []
            for seed in range(args.seeds):
                cfg = TrainConfig(tokens=tokens, seq_len=args.seq_len, batch_size=args.batch_size, seed=seed)
                hit = cache.get(train_key(g, cfg, corpus))
                hits.append(hit)
                vals.append(hit["val_bpb"] if hit and hit["val_bpb"] is not None else float("nan"))
            per_budget[b][g.hash()] = vals
            row[b] = [finite_or_none(v) for v in vals]
        hit = cache.get(mad_key(g, args))
        row["mad"] = hit["mad"]["mean"] if hit else None
        row["job_s"] = round(sum(h["wall_s"] for h in hits + [hit] if h), 1)
        if hit:
            mad[g.hash()] = hit["mad"]["mean"]
        rows.append(row)

    agreement = rank_agreement(per_budget["low"], per_budget["high"])
    high_mean = {k: _mean(v) for k, v in per_budget["high"].items() if _mean(v) is not None}
    # MAD is an accuracy (higher is better) and bpb is lower-is-better: negate MAD so +1 means the same ranking
    mk = [k for k in mad if k in high_mean]
    mad_vs_high = {"n": len(mk), "spearman": spearman([-mad[k] for k in mk], [high_mean[k] for k in mk]),
                   "kendall": kendall_tau([-mad[k] for k in mk], [high_mean[k] for k in mk])}
    # a training-free baseline: more parameters, lower bpb?
    pk = [r for r in rows if r["hash"] in high_mean]
    params_vs_high = {"n": len(pk), "spearman": spearman([-r["params"] for r in pk], [high_mean[r["hash"]] for r in pk])}
    return {"genomes": rows, "agreement": agreement, "mad_vs_high": mad_vs_high, "params_vs_high": params_vs_high,
            "goal": {"spearman_at_least": GOAL, "reached": bool(agreement["spearman"] >= GOAL)}}


def transfer(other: dict, res: dict) -> dict:
    """Does a ranking on the other corpus (the search's) hold on this one? Seed-mean bpb of the genomes both runs
    trained: the other corpus's short budget (what a search there sees) and long budget, each against this corpus's
    long budget."""
    theirs = {r["hash"]: r for r in other["genomes"]}
    out = {"other_corpus": other["config"]["corpus"], "this_corpus": res["config"]["corpus"]}
    for budget in ("low", "high"):
        pairs = [(_mean(theirs[r["hash"]][budget]), _mean(r["high"])) for r in res["genomes"] if r["hash"] in theirs]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
        out[f"other_{budget}_vs_this_high"] = {"n": len(pairs), "spearman": spearman(xs, ys),
                                               "kendall": kendall_tau(xs, ys),
                                               "top_quarter": top_overlap(xs, ys, max(1, len(pairs) // 4))}
    return out


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def no_nan(x):
    """NaN -> None, so results.json is standard JSON."""
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}


# -- report --------------------------------------------------------------------------------------------------------
def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ms(vals) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "missing"
    m = sum(v) / len(v)
    gap = f" ± {(max(v) - min(v)) / 2:.3f}" if len(v) > 1 else ""
    short = f" ({len(v)}/{len(vals)} seeds)" if len(v) < len(vals) else ""
    return f"{m:.3f}{gap}{short}"


def _relative(command: str) -> str:
    """Paths under the working directory written relative to it: a report names no machine's folders."""
    return command.replace(str(Path.cwd()) + os.sep, "")


def markdown(res: dict) -> str:
    a, cfg = res["agreement"], res["config"]
    lo, hi = cfg["tokens"], cfg["tokens"] * cfg["multiplier"]
    goal = res["goal"]
    verdict = "REACHED" if goal["reached"] else "NOT reached"
    lines = [
        "# Search fidelity",
        "",
        f"Does training each candidate for {lo:,} tokens (the search budget here) rank genomes the way "
        f"{hi:,} tokens ({cfg['multiplier']}x) does? {a['n']} genomes with results at both budgets, "
        f"{cfg['seeds']} seeds each, corpus `{cfg['corpus']}`.",
        "",
        f"**Goal Spearman >= {goal['spearman_at_least']}: {verdict}** (Spearman {_f(a['spearman'])}, "
        f"Kendall tau-b {_f(a['kendall'])}).",
        "",
        "| statistic | value |",
        "|---|---|",
        f"| Spearman, {lo:,} vs {hi:,} tokens (seed means) | {_f(a['spearman'])} |",
        f"| Kendall tau-b, same | {_f(a['kendall'])} |",
        f"| pairs ordered the other way round by the short budget | {_f(a['flip_share'])} |",
        f"| of the long run's best quarter ({max(1, a['n'] // 4)}), share also in the short run's best quarter | "
        f"{_f(a['top_quarter'], 2)} |",
        f"| seed spread at {lo:,}: mean std / mean range / max range (bpb) | {_f(a['spread_low']['mean_std'])} / "
        f"{_f(a['spread_low']['mean_range'])} / {_f(a['spread_low']['max_range'])} |",
        f"| seed spread at {hi:,}: mean std / mean range / max range (bpb) | {_f(a['spread_high']['mean_std'])} / "
        f"{_f(a['spread_high']['mean_range'])} / {_f(a['spread_high']['max_range'])} |",
        f"| noise share at {lo:,}: pairs flipping between seeds; seed-vs-seed Spearman | "
        f"{_f(a['noise_low']['flip_share'])}; {_f(a['noise_low']['seed_spearman'])} |",
        f"| noise share at {hi:,}: same | {_f(a['noise_high']['flip_share'])}; "
        f"{_f(a['noise_high']['seed_spearman'])} |",
        *([f"| MAD mean accuracy ({cfg['mad_steps']} steps) vs {hi:,}-token bpb: Spearman / Kendall "
           f"(n={res['mad_vs_high']['n']}) | {_f(res['mad_vs_high']['spearman'])} / {_f(res['mad_vs_high']['kendall'])} |"]
          if cfg["mad_steps"] > 0 else []),
        f"| baseline: parameter count vs {hi:,}-token bpb, Spearman (n={res['params_vs_high']['n']}) | "
        f"{_f(res['params_vs_high']['spearman'])} |",
        "",
        "Correlations are signed so that +1 means the same ranking as the long run (lower bpb, higher MAD accuracy, "
        "more parameters = better). Seed spread uses the sample std (ddof=1).",
        "",
        f"| genome | hash | params | bpb @ {lo:,} (mean ± half range) | bpb @ {hi:,} | rank short | rank long | MAD acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    means = {r["hash"]: (_mean(r["low"]), _mean(r["high"])) for r in res["genomes"]}
    both = [h for h, (l, h2) in means.items() if l is not None and h2 is not None]
    rank_lo = {h: i + 1 for i, h in enumerate(sorted(both, key=lambda h: means[h][0]))}
    rank_hi = {h: i + 1 for i, h in enumerate(sorted(both, key=lambda h: means[h][1]))}
    for r in sorted(res["genomes"], key=lambda r: rank_hi.get(r["hash"], 10**6)):
        lines.append(f"| {r['name']} | `{r['hash'][:10]}` | {r['params']:,} | {_ms(r['low'])} | {_ms(r['high'])} | "
                     f"{rank_lo.get(r['hash'], '-')} | {rank_hi.get(r['hash'], '-')} | {_f(r['mad'])} |")
    if "transfer" in res:
        t = res["transfer"]
        lines += ["", f"## Transfer from corpus `{t['other_corpus']}` to `{t['this_corpus']}`", "",
                  f"Seed-mean bpb of the same genomes on both corpora, against this corpus's {hi:,}-token budget.", "",
                  "| ranking on the other corpus | n | Spearman | Kendall tau-b | best-quarter overlap |",
                  "|---|---|---|---|---|"]
        for budget, label in (("low", f"{lo:,} tokens (what the search sees)"), ("high", f"{hi:,} tokens")):
            x = t[f"other_{budget}_vs_this_high"]
            lines.append(f"| {label} | {x['n']} | {_f(x['spearman'])} | {_f(x['kendall'])} | {_f(x['top_quarter'], 2)} |")
    jobs, m = res["jobs"], res["machine"]
    lines += [
        "",
        f"Jobs this invocation: {jobs['run']} run, {jobs['cached']} cached, {jobs['failed']} failed, "
        f"{jobs['missing']} missing; this invocation took {res['wall_s'] / 60:.1f} min. Time spent in the cached jobs "
        f"(training loops and MAD scoring, all invocations): {sum(r['job_s'] for r in res['genomes']) / 60:.1f} min.",
        "",
        f"Settings: seq-len {cfg['seq_len']}, batch {cfg['batch_size']} ({lo // (cfg['seq_len'] * cfg['batch_size'])} "
        f"and {hi // (cfg['seq_len'] * cfg['batch_size'])} steps), threads {cfg['threads']}, MAD tasks "
        f"{', '.join(cfg['mad_tasks'])} ({cfg['mad_steps']} steps, {cfg['mad_n_train']} training examples).",
        "",
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, Python {m['python']}, torch {m['torch']}, "
        "a shared machine: other jobs were running (load averages below).",
        "",
        "Commands that trained into this cache with these settings (a resumed run adds one each time):",
        "",
        "```",
        *[f"# started {c['started']}, 1-minute load average {c['loadavg_1m']}\n{_relative(c['command'])}"
          for c in res["training_commands"]],
        "```",
        "",
        f"This report was written by: `{_relative(res['command'])}`",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200_000, help="search budget per candidate (the search's default)")
    ap.add_argument("--multiplier", type=int, default=10, help="the long budget is this many times --tokens")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--genomes", type=int, default=16)
    ap.add_argument("--corpus", default=None, help="text file or folder (default: the embedded corpus)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/out/fidelity"))
    ap.add_argument("--markdown", type=Path, default=None, help="default <out>/results.md")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mad-steps", type=int, default=20, help="0 skips MAD")
    ap.add_argument("--mad-n-train", type=int, default=256)
    ap.add_argument("--mad-tasks", default=",".join(TASKS), help="comma-separated subset of the MAD tasks")
    ap.add_argument("--report-only", action="store_true", help="write the report from the cache, train nothing")
    ap.add_argument("--compare-with", type=Path, default=None,
                    help="the --out folder of a run on another corpus: does the ranking transfer between corpora?")
    args = ap.parse_args(argv)
    args.mad_tasks = [t for t in args.mad_tasks.split(",") if t]
    unknown = [t for t in args.mad_tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown MAD task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    if args.tokens < 1 or args.multiplier < 1 or args.seeds < 1 or args.genomes < 2:
        ap.error("--tokens, --multiplier and --seeds must be >= 1 and --genomes >= 2")

    t0 = time.perf_counter()
    info = machine()
    corpus = load_corpus(args.corpus)
    genomes = pick_genomes(args.genomes, args.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = Cache(args.out / "cache.jsonl")
    print(f"{len(genomes)} genomes, budgets {args.tokens:,} and {args.tokens * args.multiplier:,} tokens, "
          f"{args.seeds} seeds, corpus {corpus.name}; cache {cache.path} ({len(cache.rows)} rows)", flush=True)
    config = {"tokens": args.tokens, "multiplier": args.multiplier, "seeds": args.seeds, "genomes": len(genomes),
              "corpus": corpus.name, "corpus_sha256": corpus.sha256, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "threads": args.threads, "mad_steps": args.mad_steps,
              "mad_n_train": args.mad_n_train, "mad_tasks": args.mad_tasks}
    # Paths relative to the working directory, so the report names no machine's folders.
    command = shlex.join(os.path.relpath(a) if os.path.isabs(a) and os.path.exists(a) else a for a in sys.orig_argv)
    settings = {k: v for k, v in config.items() if k != "threads"}
    log = args.out / "commands.jsonl"  # which invocations trained into this cache, for the report
    if not args.report_only:
        with log.open("a") as f:
            f.write(json.dumps({"command": command, "settings": settings, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "loadavg_1m": info["loadavg_1m_at_start"]}) + "\n")
    counts = run_jobs(genomes, corpus, args, cache, args.report_only)

    res = collect(genomes, corpus, args, cache)
    res.update(config=config, machine=info, command=command, jobs=counts, wall_s=round(time.perf_counter() - t0, 1),
               training_commands=[c for c in Cache.lines(log) if c.get("settings") == settings])
    if args.compare_with is not None:
        other = args.compare_with / "results.json"
        if not other.is_file():
            ap.error(f"--compare-with {args.compare_with}: no results.json there (run the benchmark into it first)")
        res["transfer"] = transfer(json.loads(other.read_text()), res)
    (args.out / "results.json").write_text(json.dumps(no_nan(res), indent=2, default=str))
    md_path = args.markdown or args.out / "results.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(res))
    a = res["agreement"]
    print(f"jobs: {counts['run']} run, {counts['cached']} cached, {counts['failed']} failed, {counts['missing']} missing")
    print(f"spearman {_f(a['spearman'])} kendall {_f(a['kendall'])} (n={a['n']}); goal >= {GOAL} "
          f"{'reached' if res['goal']['reached'] else 'NOT reached'}; MAD spearman {_f(res['mad_vs_high']['spearman'])}")
    print(f"wrote {args.out / 'results.json'} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
