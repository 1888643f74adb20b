"""The final stage: retrain the best front members and the baselines longer, with several seeds, and say
plainly whether evolution found anything better.

Top-k: front members ranked by the run's quality objective (val_bpb, or 1 - MAD accuracy). Baselines:
transformer++ and striped-hybrid, adapted to the run's depth, width and context like the references of the initial
population (but not restricted to the run's families). Every (model, seed) is trained once and committed to the
`final` table as it finishes, so an interrupted finalize resumes where it stopped.

Verdict: a model's quality is the mean over seeds; the spread of a comparison is the larger of the two sample
standard deviations. A quality difference not larger than the spread is a tie, not a win. An evolved model *beats*
a baseline when its quality is better beyond the spread *and* it has less cache or fewer parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from pathlib import Path

from factory.errors import FactoryError
from factory.genome.schema import Genome
from factory.search.config import SearchConfig
from factory.search.executors import make_executor
from factory.search.objectives import EvalRecord, ObjectiveContext, evaluation_request, get_objective
from factory.io import atomic_json
from factory.search.outputs import front_rows, rows_of_run
from factory.search.plots import quality_axis
from factory.search.progress import Progress
from factory.search.run import DirLock, read_run
from factory.search.seeding import BASELINES, adapt_to_space, build_space
from factory.search.store import Store


def final_tokens(config: SearchConfig, multiplier: int) -> int:
    """The final comparison's training budget: `multiplier` times the largest budget the search trained at (its
    top rung), so a multi-fidelity run's finalists never train for less than the search gave them."""
    return config.rung_budgets()[-1] * multiplier


def _final_config_hash(config: SearchConfig, multiplier: int) -> str:
    train = {k: v for k, v in config.train_config(tokens=final_tokens(config, multiplier)).to_dict().items()
             if k not in ("threads", "seed")}
    blob = {"train": train, "corpus": config.corpus_sha256, "quality": quality_axis(config)[0],
            "mad_steps": config.mad_steps * multiplier, "evaluator": config.evaluator}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def compare(evolved: dict, baseline: dict) -> dict:
    """Quality verdict (better | tie | worse | inconclusive) and resource ratios of one evolved model."""
    spread = max(evolved["std"], baseline["std"])
    diff = baseline["mean"] - evolved["mean"]  # > 0: the evolved model is better (lower is better)
    if evolved["n_ok"] < 2 or baseline["n_ok"] < 2 or not math.isfinite(spread):
        verdict = "inconclusive"
    elif abs(diff) <= spread:
        verdict = "tie"
    else:
        verdict = "better" if diff > 0 else "worse"
    cache_ratio = evolved["cache_bytes"] / baseline["cache_bytes"] if baseline["cache_bytes"] else math.inf
    params_ratio = evolved["params"] / baseline["params"]
    smaller = evolved["cache_bytes"] < baseline["cache_bytes"] or evolved["params"] < baseline["params"]
    return {
        "evolved": evolved["hash"], "baseline": baseline["name"], "quality_difference": diff, "spread": spread,
        "verdict": verdict, "cache_ratio": cache_ratio, "params_ratio": params_ratio,
        "beats": verdict == "better" and smaller, "matches": verdict == "tie" and smaller,
    }


def _sentence(models: list[dict], comparisons: list[dict]) -> str:
    """One plain verdict: YES (an evolved model beats every baseline), PARTLY (some), NO, or INCONCLUSIVE."""
    by_hash = {m["hash"]: m for m in models}
    baselines = {m["name"]: m for m in models if m["role"] == "baseline"}

    def detail(c):
        e, b = by_hash[c["evolved"]], baselines[c["baseline"]]
        return (f"{c['verdict']} vs {b['name']} ({e['mean']:.4f}±{e['std']:.4f} vs {b['mean']:.4f}±{b['std']:.4f}; "
                f"cache x{c['cache_ratio']:.2f}, params x{c['params_ratio']:.2f})")

    per_model: dict[str, list[dict]] = {}
    for c in comparisons:
        per_model.setdefault(c["evolved"], []).append(c)
    every = [h for h, cs in per_model.items() if cs and all(c["beats"] for c in cs)]
    some = [h for h, cs in per_model.items() if any(c["beats"] for c in cs)]
    ties = [h for h, cs in per_model.items() if any(c["matches"] for c in cs)]
    if every:
        h = every[0]
        return f"YES: evolved {h} beats every baseline at lower cache or parameter count, beyond the seed spread: " \
               + "; ".join(detail(c) for c in per_model[h])
    if some:
        h = some[0]
        return f"PARTLY: evolved {h} beats some baselines at lower cache or parameter count, not all: " \
               + "; ".join(detail(c) for c in per_model[h])
    if comparisons and all(c["verdict"] == "inconclusive" for c in comparisons):
        return "INCONCLUSIVE: fewer than 2 successful seeds for the models compared."
    if ties:
        h = ties[0]
        return ("NO: no evolved model beats a baseline beyond the seed spread; the closest ties at lower cache or "
                f"parameter count: evolved {h} " + "; ".join(detail(c) for c in per_model[h]))
    return "NO: no evolved model beats or ties the baselines at lower cache or parameter count."


def finalize(out: Path, top_k: int = 4, multiplier: int = 4, seeds: int = 2, workers: int | None = None,
             executor: str | None = None, ray_address: str | None = None, progress: Progress | None = None,
             checkpoints: Path | None = None) -> dict:
    """Retrain, compare, write DIR/final.json. With `checkpoints` (a folder), every retrained model is also saved
    as a checkpoint at `checkpoints/<hash>-seed<seed>` (for export); a stored result whose checkpoint is missing
    is trained again to write it (its result, deterministic, is not recorded twice)."""
    if top_k < 1 or multiplier < 1 or seeds < 2:
        raise FactoryError("finalize needs --top-k >= 1, --multiplier >= 1 and --seeds >= 2 "
                           f"(got {top_k}, {multiplier}, {seeds})")
    out = Path(out)
    config = read_run(out).with_execution(workers=workers, executor=executor, ray_address=ray_address)
    progress = progress or Progress()
    q_name, q_label = quality_axis(config)
    q_obj = get_objective(q_name)
    if not q_obj.needs_training:
        raise FactoryError(f"finalize retrains models, but this run has no trained quality objective "
                           f"(objectives: {', '.join(config.objectives)})")
    with DirLock(out), Store(out / "search.db") as store:
        front = front_rows(rows_of_run(store, config), list(config.objectives))
        if not front:
            raise FactoryError(f"{out}: no feasible evaluation yet, nothing to finalize")
        front = sorted(front, key=lambda r: (r["objectives"][q_name], r["hash"]))[:top_k]
        space = build_space(config)
        models = []
        for name in BASELINES:
            from factory.genome.references import reference

            genome, note = adapt_to_space(reference(name), space, restrict_families=False)
            if genome is None:
                progress.log(f"baseline {name} left out: {note}")
                continue
            models.append({"hash": genome.hash(), "name": name, "role": "baseline", "origin": f"reference:{name}",
                           "note": note, "genome": genome})
        baseline_hashes = {m["hash"] for m in models}
        for r in front:
            if r["hash"] in baseline_hashes:
                continue
            role = "reference" if r["origin"].startswith("reference:") else "evolved"
            models.append({"hash": r["hash"], "name": r["name"] or r["hash"], "role": role, "origin": r["origin"],
                           "note": "", "genome": Genome.from_dict(r["genome"])})
        fch = _final_config_hash(config, multiplier)
        seed_list = [config.seed + s for s in range(seeds)]
        ctx = ObjectiveContext(config.context_for_metrics, config.dtype, config.target)
        from factory.genome.metrics import static_metrics

        jobs, requests = [], []
        for m in models:
            m["static"] = static_metrics(m["genome"], config.context_for_metrics, config.dtype).to_dict()
            for seed in seed_list:
                ckpt = Path(checkpoints) / f"{m['hash']}-seed{seed}" if checkpoints is not None else None
                missing_ckpt = ckpt is not None and not (ckpt / "model.safetensors").is_file()
                if store.find_final(m["hash"], seed, fch) is None or missing_ckpt:
                    jobs.append((m, seed))
                    requests.append(evaluation_request(
                        config, m["hash"], m["genome"].to_dict(), q_obj.needs, seed=seed,
                        tokens=final_tokens(config, multiplier), mad_steps=config.mad_steps * multiplier,
                        checkpoint=str(ckpt) if ckpt is not None else None))
        progress.log(f"finalize: {len(models)} models x {seeds} seeds at {multiplier}x the search budget; "
                     f"{len(requests)} trainings to run")

        def on_result(k: int, result: dict) -> None:
            m, seed = jobs[k]
            record = EvalRecord(m["hash"], result["status"], result["reason"], m["static"], result["measurements"])
            value = q_obj.fn(m["genome"], record, ctx) if result["status"] == "ok" else math.nan
            if store.find_final(m["hash"], seed, fch) is not None:
                return  # retrained only to write its checkpoint
            store.add_final(hash=m["hash"], name=m["name"], role=m["role"], seed=seed,
                            tokens=final_tokens(config, multiplier), train_config_hash=fch, status=result["status"],
                            reason=result["reason"], val_bpb=value if math.isfinite(value) else None,
                            params=m["static"]["params"], cache_bytes=m["static"]["cache_bytes"],
                            genome=m["genome"].to_dict(), wall_s=result.get("wall_s", 0.0))
            detail = f"{q_name} {value:.4f}" if math.isfinite(value) else result["reason"]
            progress.log(f"  {m['role']} {m['name']} seed {seed}: {result['status']} {detail}")

        if requests:
            with make_executor(config.executor, config.evaluator, config.workers, config.ray_address) as ex:
                ex.map(requests, on_result)

        results = []
        for m in models:
            rows = [store.find_final(m["hash"], s, fch) for s in seed_list]
            values = [r["val_bpb"] for r in rows if r and r["status"] == "ok" and r["val_bpb"] is not None]
            mean, std = _stats(values)
            results.append({
                "hash": m["hash"], "name": m["name"], "role": m["role"], "origin": m["origin"], "note": m["note"],
                "mean": mean, "std": std, "n_ok": len(values), "values": values,
                "failures": [f"seed {r['seed']}: {r['status']} {r['reason']}" for r in rows if r and r["status"] != "ok"],
                "params": m["static"]["params"], "cache_bytes": m["static"]["cache_bytes"],
                "layers": [m["genome"].layer_spec(i).family for i in range(m["genome"].n_layers)],
            })
        baselines = [r for r in results if r["role"] == "baseline" and r["n_ok"]]
        evolved = [r for r in results if r["role"] == "evolved" and r["n_ok"]]
        comparisons = [compare(e, b) for e in evolved for b in baselines]
        data = {
            "format": "factory-search-final-1",
            "quality": q_name, "quality_label": q_label, "multiplier": multiplier, "tokens": final_tokens(config, multiplier),
            "seeds": seed_list, "top_k": top_k, "train_config_hash": fch,
            "rule": "a quality difference not larger than the larger seed standard deviation is a tie",
            "models": results, "comparisons": comparisons,
            "verdict": _sentence(results, comparisons) if baselines and evolved else
            ("NO: the models retrained hold no evolved one to compare (the front is references only)" if baselines
             else "INCONCLUSIVE: no baseline could be trained"),
            "finished_at": time.time(),
        }
        atomic_json(out / "final.json", data)
        return data
