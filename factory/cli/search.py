"""`factory search` (start or --resume a run), `factory search status|motifs|finalize DIR`.

Only typer, the standard library and factory.cli.common / factory.errors are imported here: the search machinery
(torch, pymoo) is imported inside the commands, so `factory --help` and other commands stay light.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from factory.cli.common import console, emit_json, fail

app = typer.Typer(
    help="Evolve architectures (NSGA-II over LIV genomes): quality vs cache / parameters under hard budgets.",
    invoke_without_command=True,
)

# Flags that a resumed run may change; everything else comes from DIR/run.json.
_RESUMABLE = {"workers", "executor", "ray_address", "generations", "as_json"}


_SHORT = {"attention": "A", "linear_attention": "LA", "rwkv": "R", "mamba": "M", "short_conv": "SC",
          "long_conv": "LC", "glu": "G"}
_LEGEND = "A attention, LA linear attention, R rwkv, M mamba, SC/LC short/long conv, G glu"


def _layers(families) -> str:
    return "-".join(_SHORT.get(f, f) for f in families)


def _fmt_int(v) -> str:
    return "-" if v is None else f"{v:,}"


def _fmt_float(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def _print_front(result: dict, title: str) -> None:
    from rich.table import Table

    hv = result.get("hypervolume")
    console.print(
        f"{title}: generation {(result['generation'] or 0) + 1 if result['generation'] is not None else 0}"
        f"/{result['generations']}, {result['evaluated']} evaluated, {result['failed']} failed, "
        f"{result['rejected']} rejected, hypervolume {_fmt_float(hv)}"
        + ("" if result.get("complete") else " (incomplete)"))
    shown = {"quality", "params", "cache"}  # already in the val bpb / params / cache columns
    extra = [o for o in result["objectives"] if o not in shown]
    at = ""
    if result.get("fidelity") and result["front"]:  # successive halving: the front holds top-rung results only
        at = f", rung {result['front'][0]['rung']}: {result['front'][0]['tokens']:,} tokens"
    table = Table(title=f"Pareto front ({len(result['front'])}{at}): layers {_LEGEND}")
    for col in ("hash", "origin", "layers", "params", "cache bytes", "val bpb", *extra):
        table.add_column(col, justify="right" if col not in ("hash", "origin", "layers") else "left",
                         no_wrap=col == "hash")
    for m in result["front"]:
        table.add_row(m["hash"], m["origin"], _layers(m["layers"]), _fmt_int(m["params"]),
                      _fmt_int(m["cache_bytes"]), _fmt_float(m["val_bpb"]),
                      *[f"{m['objectives'][o]:.4g}" if m["objectives"][o] is not None else "-" for o in extra])
    console.print(table)


def _json_summary(result: dict, out: Path) -> dict:
    front = [{k: v for k, v in m.items() if k != "genome"} for m in result["front"]]
    return {**result, "front": front, "out": str(out)}


@app.callback(invoke_without_command=True)
def search(
    ctx: typer.Context,
    target: Optional[str] = typer.Option(None, "--target", help="Target name or .toml: its objectives and budgets become defaults."),
    preset: Optional[str] = typer.Option(None, "--preset", help="quick | star: a named size and budget (flags override)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Text file or folder (default: embedded Shakespeare)."),
    objectives: Optional[str] = typer.Option(None, "--objectives", help="Comma list: quality, mad, params, cache, flops; latency, memory (measured, need --target). Default quality,cache."),
    max_params: Optional[str] = typer.Option(None, "--max-params", help="Budget: parameters."),
    max_cache_bytes: Optional[str] = typer.Option(None, "--max-cache-bytes", help="Budget: decode cache bytes at the metrics context (e.g. 64KiB)."),
    max_memory_bytes: Optional[str] = typer.Option(None, "--max-memory-bytes", help="Budget: estimated inference peak memory (e.g. 8MiB)."),
    population: Optional[int] = typer.Option(None, "--population", help="Population size (default 16)."),
    generations: Optional[int] = typer.Option(None, "--generations", help="Generations including the initial one (default 18); with --resume, a larger number extends the run."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Training tokens per candidate (default 200000); with --rungs, the first rung's."),
    rungs: Optional[int] = typer.Option(None, "--rungs", help="Successive halving: how many token budgets, tokens * eta^k for k < rungs (default 1: off)."),
    eta: Optional[int] = typer.Option(None, "--eta", help="With --rungs: the best 1/eta of a rung train again on eta times the tokens (default 3)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Training sequence length (default 128)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size (default 16)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 3e-3)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Depth of every candidate (default 8)."),
    d_model: Optional[int] = typer.Option(None, "--d-model", help="Width of every candidate (default 128)."),
    context: Optional[int] = typer.Option(None, "--context", help="Context length of every candidate (default 256)."),
    families: Optional[str] = typer.Option(None, "--families", help="Comma list of operator families (default: all registered)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the whole run (default 0)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel evaluations (default: one per core, up to 8); torch threads per worker = cores // workers."),
    executor: Optional[str] = typer.Option(None, "--executor", help="local (process pool, default) | ray."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (default: start a local Ray)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to create."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (the run's summary) on stdout."),
):
    """Run an architecture search into --out DIR, or continue one with --resume DIR."""
    if ctx.invoked_subcommand is not None:
        return
    given = {k for k, v in ctx.params.items() if v not in (None, False)}
    from factory.search.progress import RichProgress

    if resume is not None:
        extra = sorted(given - _RESUMABLE - {"resume"})
        if extra:
            fail(f"--resume takes the run's settings from {resume}/run.json; only --workers, --executor, "
                 f"--ray-address and --generations may be given (got --{extra[0].replace('_', '-')})")
        _check_execution(workers, executor)
        from factory.search.run import read_run, resume_search

        config = read_run(resume)
        progress = RichProgress(generations=generations or config.generations)
        result = resume_search(resume, progress, workers=workers, executor=executor, ray_address=ray_address,
                               generations=generations)
        run_dir = resume
    else:
        if out is None:
            fail("--out DIR is required (or --resume DIR to continue a run)")
        _check_execution(workers, executor)
        config = _build_config(locals())
        from factory.search.run import start_search

        progress = RichProgress(generations=config.generations)
        result = start_search(config, out, progress)
        run_dir = out
    if as_json:
        emit_json(_json_summary(result, run_dir))
    else:
        _print_front(result, f"search {run_dir}")
        console.print(f"outputs: {run_dir}/pareto.json, evaluations.csv, hypervolume.csv, motifs.json, "
                      "pareto_quality_cache.png, pareto_quality_params.png")


def _check_execution(workers, executor) -> None:
    if workers is not None and workers <= 0:
        fail(f"--workers must be a positive integer, got {workers}")
    if executor is not None and executor not in ("local", "ray", "inline"):
        fail(f"--executor must be local or ray, got {executor!r}")


def _build_config(opts: dict):
    """Defaults < --preset < --target < explicit flags."""
    from factory.search.config import DEFAULTS, PRESETS, Budgets, SearchConfig, parse_count

    settings = dict(DEFAULTS)
    if opts["preset"] is not None:
        if opts["preset"] not in PRESETS:
            fail(f"--preset must be one of {', '.join(PRESETS)}, got {opts['preset']!r}")
        settings.update(PRESETS[opts["preset"]])
    budgets = {"max_params": None, "max_cache_bytes": None, "max_memory_bytes": None}
    if opts["target"] is not None:
        from factory.search.target_bridge import target_defaults

        t = target_defaults(opts["target"])
        settings.update({k: t[k] for k in ("target", "target_fingerprint", "objectives", "metrics_context", "dtype")})
        budgets.update({k: t[k] for k in budgets})
    flag_map = {"layers": "n_layers", "d_model": "d_model", "context": "context", "population": "population",
                "generations": "generations", "tokens": "tokens", "rungs": "rungs", "eta": "eta",
                "seq_len": "seq_len", "batch_size": "batch_size",
                "lr": "lr", "seed": "seed", "workers": "workers", "executor": "executor", "ray_address": "ray_address",
                "corpus": "corpus"}
    for flag, key in flag_map.items():
        if opts[flag] is not None:
            settings[key] = opts[flag]
    if opts["eta"] is not None and (opts["rungs"] or 1) < 2:
        fail(f"--eta {opts['eta']} only matters with successive halving: add --rungs 2 or more")
    if opts["preset"] is None and opts["seq_len"] is None:
        settings["seq_len"] = 0  # min(128, context)
    if opts["objectives"] is not None:
        settings["objectives"] = tuple(o.strip() for o in opts["objectives"].split(","))
    if opts["families"] is not None:
        settings["families"] = tuple(f.strip() for f in opts["families"].split(",") if f.strip())
    budgets["max_params"] = parse_count(opts["max_params"], "--max-params", units=False) \
        if opts["max_params"] is not None else budgets["max_params"]
    budgets["max_cache_bytes"] = parse_count(opts["max_cache_bytes"], "--max-cache-bytes", allow_zero=True) \
        if opts["max_cache_bytes"] is not None else budgets["max_cache_bytes"]
    budgets["max_memory_bytes"] = parse_count(opts["max_memory_bytes"], "--max-memory-bytes") \
        if opts["max_memory_bytes"] is not None else budgets["max_memory_bytes"]
    if settings.get("target") is None and opts["target"] is None:
        settings.pop("target", None)
    config_keys = SearchConfig.__dataclass_fields__
    kwargs = {k: v for k, v in settings.items() if k in config_keys}
    from factory.search.objectives import resolve_objectives

    try:
        resolve_objectives(kwargs["objectives"])  # unknown objective: one line now, before anything else
    except Exception as e:
        if opts["target"] is not None and opts["objectives"] is None:
            fail(f"target {opts['target']}: {e}; choose others with --objectives (e.g. quality,cache)")
        raise
    return SearchConfig(budgets=Budgets(**budgets), **kwargs).validate()


@app.command("status")
def status_command(
    run_dir: Path = typer.Argument(..., help="A search run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
):
    """Progress and Pareto front of a run (safe while the run is going on)."""
    from factory.search.outputs import summary
    from factory.search.run import read_run
    from factory.search.store import Store

    config = read_run(run_dir)
    db = run_dir / "search.db"
    # A run killed before its first commit has run.json but no database yet: that is an empty run, not an error.
    with Store(db, readonly=db.exists()) as store:
        result = summary(store, config)
    if as_json:
        emit_json(_json_summary(result, run_dir))
    else:
        _print_front(result, f"search {run_dir}")


@app.command("motifs")
def motifs_command(
    run_dir: Path = typer.Argument(..., help="A search run directory."),
    top: int = typer.Option(8, "--top", help="Motifs to show per length."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
):
    """Motif analysis: LIV class frequencies, sharing patterns and k-layer motifs, front vs all evaluated."""
    from factory.search.analysis import analyse, render
    from factory.search.run import read_run
    from factory.search.store import Store

    config = read_run(run_dir)
    db = run_dir / "search.db"
    with Store(db, readonly=db.exists()) as store:
        data = analyse(store, config)
    if as_json:
        emit_json(data)
    else:
        render(data, console, top=top)


@app.command("finalize")
def finalize_command(
    run_dir: Path = typer.Argument(..., help="A search run directory."),
    top_k: int = typer.Option(4, "--top-k", help="Front members to retrain (best quality first)."),
    multiplier: int = typer.Option(4, "--multiplier", help="Training budget as a multiple of the search's (its top rung's, with --rungs)."),
    seeds: int = typer.Option(2, "--seeds", help="Training seeds per model (at least 2)."),
    workers: Optional[int] = typer.Option(None, "--workers"),
    executor: Optional[str] = typer.Option(None, "--executor"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address"),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="Also save every retrained model here (<hash>-seed<seed>/)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
):
    """Retrain the top-k front members and the baselines longer with several seeds; write DIR/final.json."""
    _check_execution(workers, executor)
    from factory.search.finalize import finalize
    from factory.search.progress import RichProgress

    data = finalize(run_dir, top_k=top_k, multiplier=multiplier, seeds=seeds, workers=workers, executor=executor,
                    ray_address=ray_address, progress=RichProgress(), checkpoints=checkpoints)
    if as_json:
        emit_json(data)
        return
    from rich.table import Table

    table = Table(title=f"final: {data['tokens']:,} tokens ({data['multiplier']}x), seeds {data['seeds']}")
    for col in ("model", "role", "layers", "params", "cache bytes", f"{data['quality']} mean", "std", "ok"):
        table.add_column(col, justify="left" if col in ("model", "role", "layers") else "right")
    for m in data["models"]:
        table.add_row(m["name"], m["role"], _layers(m["layers"]), _fmt_int(m["params"]),
                      _fmt_int(m["cache_bytes"]), _fmt_float(m["mean"]), _fmt_float(m["std"]), str(m["n_ok"]))
    console.print(table)
    console.print(data["verdict"])


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="search")
