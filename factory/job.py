"""The factory's main job, `factory run`: one command from a target to a report.

    search (the target's objectives and budgets) -> finalize (retrain the best and the baselines, 2+ seeds)
      -> export (ONNX, parity, the target's quantization) -> profile (onnxruntime, the target's protocol)
      -> report (report.html, report.md)

Every stage is resumable without redoing finished work: the search and finalize keep their results in
DIR/search.db, each export is a folder that only exists once verified (manifest written last), each profile is
a JSON file written atomically, and the report is rebuilt from all of them. `factory run --resume DIR` reads the
settings from DIR/job.json.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from factory.errors import FactoryError
from factory.io import atomic_json, check_out_folder
from factory.presets import PRESETS, Preset

JOB_FORMAT = "factory-job-1"


@dataclass(frozen=True)
class JobConfig:
    target: str
    preset: str
    corpus: str | None = None
    workers: int | None = None  # None: the search's default (one worker per core, one thread each)
    executor: str = "local"
    ray_address: str | None = None
    seed: int = 0
    # The preset's values when the run started (job.json keeps them, so a resumed run never depends on today's
    # table); None in job.json files written before they were stored: then the table's values by name.
    preset_values: dict | None = None

    def settings(self) -> Preset:
        if self.preset_values is None:
            return PRESETS[self.preset]
        return Preset.from_dict(self.preset_values, about=self.preset)

    def to_dict(self) -> dict:
        return asdict(self)


# -- job directory ---------------------------------------------------------------------------------------------------
def read_job(out: Path) -> JobConfig:
    path = out / "job.json"
    if not path.is_file():
        raise FactoryError(f"{out} is not a factory run (no job.json)")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != JOB_FORMAT:
            raise ValueError("format")
        return JobConfig(**data["config"])
    except (ValueError, KeyError, TypeError):
        raise FactoryError(f"{path}: not a factory run file") from None


# -- stages ----------------------------------------------------------------------------------------------------------
def search_config(job: JobConfig):
    """The search's configuration for a new job (`from_target`, the builder `factory search` uses too)."""
    from factory.data.corpus import load_corpus
    from factory.search.config import from_target

    return from_target(job.target, job.settings(), {
        "seed": job.seed, "corpus": job.corpus, "corpus_sha256": load_corpus(job.corpus).sha256,
        "workers": job.workers, "executor": job.executor, "ray_address": job.ray_address})


def stage_search(job: JobConfig, out: Path, progress) -> None:
    from factory.search import resume_search, start_search

    if (out / "run.json").is_file():  # the search's stored configuration, read as written
        resume_search(out, progress=progress, workers=job.workers, executor=job.executor, ray_address=job.ray_address)
    else:
        start_search(search_config(job), out, progress=progress)


def stage_finalize(job: JobConfig, out: Path, progress) -> dict:
    from factory.search.finalize import finalize

    p = job.settings()
    return finalize(out, top_k=p.top_k, multiplier=p.multiplier, seeds=p.seeds, workers=job.workers,
                    executor=job.executor, ray_address=job.ray_address, progress=progress,
                    checkpoints=out / "checkpoints")


def _slug(model: dict) -> str:
    name = model["name"] if model["role"] == "baseline" else f"{model['role']}-{model['hash'][:8]}"
    return "".join(c if c.isalnum() or c in "-_+." else "-" for c in name)


def stage_export(job: JobConfig, target, out: Path, final: dict, say) -> dict[str, Path]:
    """Export every finalized model's first-seed checkpoint with the target's quantization (skip finished ones)."""
    from export.pipeline import ExportRequest, export_checkpoint

    exports = {}
    for m in final["models"]:
        if not m["n_ok"]:
            continue
        ckpt = out / "checkpoints" / f"{m['hash']}-seed{final['seeds'][0]}"
        dest = out / "exports" / _slug(m)
        if not (dest / "manifest.json").is_file():
            if not (ckpt / "model.safetensors").is_file():
                say(f"export {m['name']}: no checkpoint at {ckpt}, skipped")
                continue
            say(f"export {m['name']} -> {dest}")
            export_checkpoint(ExportRequest(checkpoint=ckpt, out=dest, target=target, corpus=job.corpus,
                                            progress=lambda msg: None))
        exports[m["hash"]] = dest
    return exports


def stage_profile(job: JobConfig, target, out: Path, exports: dict[str, Path], say) -> dict[str, dict]:
    """Measure each export on this machine under the target's protocol (float32 and the deployed variant)."""
    from factory import measure_gate
    from profiles.latency import representative_here
    from profiles.profiler import profile_artifact

    ok, why = representative_here(target)
    results: dict[str, dict] = {}
    if not ok:
        say(f"profile: skipped, target {target.name} is not measurable on this machine ({why})")
        return {h: {"not_measurable": why} for h in exports}
    repeats = job.settings().profile_repeats
    for h, export_dir in exports.items():
        manifest = json.loads((export_dir / "manifest.json").read_text())
        per_variant = {}
        variants = ["float32"] + [v for v in manifest["variants"] if v.startswith(("int8", "float16"))]
        for variant in variants:
            path = out / "profiles" / f"{export_dir.name}.{variant}.json"
            if not path.is_file():
                say(f"profile {export_dir.name} ({variant})")
                with measure_gate.measuring():  # another run's training on this machine pauses meanwhile
                    measured = profile_artifact(export_dir, target, variant=variant, repeats=repeats, record=True)
                atomic_json(path, measured)
            per_variant[variant] = json.loads(path.read_text())
        results[h] = per_variant
    return results


# -- report ----------------------------------------------------------------------------------------------------------
def _row(m: dict, final: dict, export_dir: Path | None, profile: dict | None) -> dict:
    row = {"name": m["name"], "role": "winner" if m["role"] == "evolved" else m["role"], "hash": m["hash"],
           "val_bpb_mean": m["mean"], "val_bpb_std": m["std"], "seeds": m["n_ok"], "params": m["params"],
           "cache_bytes": m["cache_bytes"]}
    deployed = None
    if profile and "not_measurable" not in profile:
        deployed = next((v for v in profile if v != "float32"), "float32")
        p = profile[deployed]
        row.update(prefill_ms_p50=p["prefill_ms"]["p50"], decode_ms_p50=p["decode_ms"]["p50"],
                   decode_ms_p95=p["decode_ms"]["p95"], peak_rss_mb=p["peak_rss_mb"], measured_variant=deployed,
                   within_budget=p.get("within_budget"))
    if export_dir is not None:
        manifest = json.loads((export_dir / "manifest.json").read_text())
        variants = manifest["variants"]
        int8 = next((v for v in variants if v.startswith("int8")), None)
        row["size_bytes"] = {"float32": variants["float32"].get("size_bytes"),
                             "int8": variants[int8].get("size_bytes") if int8 else None}
        row["onnx_bpb"] = {"float32": variants["float32"].get("val_bpb"),
                           "int8": variants[int8].get("val_bpb") if int8 else None}
    return row


def build_report(job: JobConfig, out: Path, final: dict, exports: dict, profiles: dict, started: float) -> dict:
    from factory.report.plots import layer_diagram, pareto_plot
    from factory.search.analysis import analyse
    from factory.search.outputs import summary
    from factory.search.run import read_run
    from factory.search.store import Store

    config = read_run(out)
    target = config.target
    with Store(out / "search.db", readonly=True) as store:
        status = summary(store, config, with_genomes=True)
        rows = store.evaluations(config.train_config_hash())
        motifs = analyse(store, config)
    front = {m["hash"] for m in status["front"]}
    points = []
    for r in rows:
        if r["status"] != "ok":
            continue
        prof = r["measurements"].get("profile", {})
        points.append({"kind": "front" if r["hash"] in front else "evaluated",
                       "val_bpb": r["measurements"].get("train", {}).get("val_bpb"),
                       "params": r["static"]["params"], "cache_bytes": r["static"]["cache_bytes"],
                       "decode_ms": prof.get("decode_ms_p50"), "label": r["hash"][:6]})
    comparison = []
    for m in final["models"]:
        prof = profiles.get(m["hash"])
        comparison.append(_row(m, final, exports.get(m["hash"]), prof))
        points.append({"kind": "winner" if m["role"] == "evolved" else "baseline", "val_bpb": m["mean"],
                       "params": m["params"], "cache_bytes": m["cache_bytes"],
                       "decode_ms": comparison[-1].get("decode_ms_p50"), "label": m["name"][:18]})
    fig_dir = out / "figures"
    figures = {}
    for key, x_key, label in (("pareto_cache", "cache_bytes", f"cache bytes at {target.decode_context} tokens"),
                              ("pareto_params", "params", "parameters"),
                              ("pareto_latency", "decode_ms", "measured decode latency p50 (ms)")):
        if pareto_plot(points, x_key, label, fig_dir / f"{key}.png", f"{target.name}: {key.split('_')[1]}"):
            figures[key] = f"figures/{key}.png"
    winners = []
    for m in final["models"]:
        if m["role"] != "evolved":
            continue
        genome = next((r["genome"] for r in rows if r["hash"] == m["hash"]), None)
        if genome is None:
            continue
        diagram = layer_diagram(genome, fig_dir / f"arch-{m['hash'][:12]}.png", title=m["name"])
        winners.append({"name": m["name"], "hash": m["hash"], "genome": genome,
                        "diagram": str(diagram.relative_to(out))})
    artifacts = []
    for m in final["models"]:
        d = exports.get(m["hash"])
        if d is None:
            continue
        manifest = json.loads((d / "manifest.json").read_text())
        q = shlex.quote(str(d))
        artifacts.append({
            "name": m["name"], "export_dir": str(d), "parity": manifest.get("parity", {}),
            "commands": [
                f"factory generate {q} --prompt 'ROMEO:' --max-new 200",
                f"factory profile {q} --target {shlex.quote(job.target)} --json",
                f"factory profiles pack {q} --target {shlex.quote(job.target)} --out probe-pack",
                "python probe-pack/runner.py probe-pack --out results.json   # on the device",
            ]})
    p = job.settings()
    verdict = [final.get("verdict", "")]
    measured = [r for r in comparison if r.get("decode_ms_p50") is not None]
    if not measured:
        verdict.append("Latency was not measured on this machine for this target (see the profile stage's note).")
    for r in measured:
        budget = (r.get("within_budget") or {})
        if budget:
            verdict.append(f"{r['name']}: measured on this machine ({r.get('measured_variant')}), within the "
                           f"target's budgets: {json.dumps(budget)}")
    return {
        "title": f"Edge model factory: {target.name} ({job.preset})",
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "target": target.to_dict(),
        "search": {"preset": job.preset, "population": p.population, "generations": p.generations,
                   "layers": p.n_layers, "d_model": p.d_model, "context": p.context,
                   "tokens_per_candidate": p.tokens, "final_tokens": final.get("tokens"),
                   "final_seeds": final.get("seeds"), "objectives": list(config.objectives),
                   "budgets": config.budgets.to_dict(), "evaluated": status["evaluated"],
                   "failed": status["failed"], "rejected": status["rejected"],
                   "hypervolume": status["hypervolume"], "corpus": job.corpus or "embedded Shakespeare",
                   "wall_s_this_invocation": round(time.time() - started, 1)},
        "verdict": verdict,
        "comparison": comparison,
        "figures": figures,
        "winners": winners,
        "motifs": motifs,
        "artifacts": artifacts,
    }


# -- the job ---------------------------------------------------------------------------------------------------------
def run_job(job: JobConfig | None, out: Path, resume: bool = False, progress=None) -> dict:
    from factory.report import write_report
    from factory.search.progress import Progress

    out = Path(out)
    progress = progress or Progress()
    say = progress.log
    if resume:
        job = read_job(out)
    else:
        if job.preset not in PRESETS:
            raise FactoryError(f"unknown preset {job.preset!r} (choose from {', '.join(PRESETS)})")
        job = replace(job, preset_values=job.settings().to_dict())
        search_config(job)  # a bad target or bad settings fail here, before anything is created
        check_out_folder(out, "a factory run", ("job.json",), resume=f"`factory run --resume {out}`")
        atomic_json(out / "job.json", {"format": JOB_FORMAT, "config": job.to_dict(), "created_at": time.time()})
    started = time.time()
    say(f"[1/5] search ({job.preset}) for target {job.target}")
    stage_search(job, out, progress)
    say("[2/5] finalize: retraining the best and the baselines")
    final = stage_finalize(job, out, progress)
    from factory.search.run import read_run

    target = read_run(out).target  # the Target the search ran against, as its run.json records it
    say("[3/5] export")
    exports = stage_export(job, target, out, final, say)
    say("[4/5] profile")
    profiles = stage_profile(job, target, out, exports, say)
    say("[5/5] report")
    report = build_report(job, out, final, exports, profiles, started)
    paths = write_report(report, out)
    return {"out": str(out), "report_html": str(paths["html"]), "report_md": str(paths["md"]),
            "verdict": report["verdict"], "models": report["comparison"]}
