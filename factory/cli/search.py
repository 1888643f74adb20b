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
from factory.presets import DEFAULTS as _D
from factory.presets import FINALIZE_DEFAULTS, MAX_DEFAULT_WORKERS, PRESETS

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
    preset: Optional[str] = typer.Option(None, "--preset", help=f"{' | '.join(PRESETS)}: a named size and budget (flags override)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Text file or folder (default: embedded Shakespeare)."),
    objectives: Optional[str] = typer.Option(None, "--objectives", help="Comma list: quality, mad, params, cache, flops; latency, memory (measured, need --target). Default " + ",".join(_D["objectives"]) + "."),
    max_params: Optional[str] = typer.Option(None, "--max-params", help="Budget: parameters."),
    max_cache_bytes: Optional[str] = typer.Option(None, "--max-cache-bytes", help="Budget: decode cache bytes at the metrics context (e.g. 64KiB)."),
    max_memory_bytes: Optional[str] = typer.Option(None, "--max-memory-bytes", help="Budget: estimated inference peak memory (e.g. 8MiB)."),
    population: Optional[int] = typer.Option(None, "--population", help=f"Population size (default {_D['population']})."),
    generations: Optional[int] = typer.Option(None, "--generations", help=f"Generations including the initial one (default {_D['generations']}); with --resume, a larger number extends the run."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help=f"Training tokens per candidate (default {_D['tokens']}); with --rungs, the first rung's."),
    rungs: Optional[int] = typer.Option(None, "--rungs", help=f"Successive halving: how many token budgets, tokens * eta^k for k < rungs (default {_D['rungs']}: off)."),
    eta: Optional[int] = typer.Option(None, "--eta", help=f"With --rungs: the best 1/eta of a rung train again on eta times the tokens (default {_D['eta']})."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help=f"Training sequence length (default min({_D['seq_len']}, context))."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Training batch size (default {_D['batch_size']})."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Peak learning rate (default {_D['lr']:g})."),
    layers: Optional[int] = typer.Option(None, "--layers", help=f"Depth of every candidate (default {_D['n_layers']})."),
    d_model: Optional[int] = typer.Option(None, "--d-model", help=f"Width of every candidate (default {_D['d_model']})."),
    context: Optional[int] = typer.Option(None, "--context", help=f"Context length of every candidate (default {_D['context']})."),
    families: Optional[str] = typer.Option(None, "--families", help="Comma list of operator families (default: all registered)."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Seed of the whole run (default {_D['seed']})."),
    workers: Optional[int] = typer.Option(None, "--workers", help=f"Parallel evaluations (default: one per core, up to {MAX_DEFAULT_WORKERS}); torch threads per worker = cores // workers."),
    executor: Optional[str] = typer.Option(None, "--executor", help=f"local (process pool) | ray (default {_D['executor']})."),
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
        progress = RichProgress(console, generations=generations or config.generations)
        result = resume_search(resume, progress, workers=workers, executor=executor, ray_address=ray_address,
                               generations=generations)
        run_dir = resume
    else:
        if out is None:
            fail("--out DIR is required (or --resume DIR to continue a run)")
        _check_execution(workers, executor)
        config = _build_config(locals())
        from factory.search.run import start_search

        progress = RichProgress(console, generations=config.generations)
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


# CLI flag -> SearchConfig field, for the flags that are settings of a new run.
_SETTINGS = {"layers": "n_layers", "d_model": "d_model", "context": "context", "population": "population",
             "generations": "generations", "tokens": "tokens", "rungs": "rungs", "eta": "eta", "seq_len": "seq_len",
             "batch_size": "batch_size", "lr": "lr", "seed": "seed", "workers": "workers", "executor": "executor",
             "ray_address": "ray_address", "corpus": "corpus", "objectives": "objectives", "families": "families",
             "max_params": "max_params", "max_cache_bytes": "max_cache_bytes", "max_memory_bytes": "max_memory_bytes"}


def _build_config(opts: dict):
    """Defaults < --preset < --target < explicit flags (`factory.search.config.from_target`)."""
    from factory.search.config import from_target

    return from_target(opts["target"], opts["preset"], {key: opts[flag] for flag, key in _SETTINGS.items()})


def _read_stored(run_dir: Path, read):
    """`read(store, config)` on a run's stored configuration (run.json, as written) and its database."""
    from factory.search.run import read_run
    from factory.search.store import Store

    config = read_run(run_dir)
    db = run_dir / "search.db"
    # A run killed before its first commit has run.json but no database yet: that is an empty run, not an error.
    with Store(db, readonly=db.exists()) as store:
        return read(store, config)


@app.command("status")
def status_command(
    run_dir: Path = typer.Argument(..., help="A search run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
):
    """Progress and Pareto front of a run (safe while the run is going on)."""
    from factory.search.outputs import summary

    result = _read_stored(run_dir, summary)
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

    data = _read_stored(run_dir, analyse)
    if as_json:
        emit_json(data)
    else:
        render(data, console, top=top)


@app.command("finalize")
def finalize_command(
    run_dir: Path = typer.Argument(..., help="A search run directory."),
    top_k: int = typer.Option(FINALIZE_DEFAULTS["top_k"], "--top-k", help="Front members to retrain (best quality first)."),
    multiplier: int = typer.Option(FINALIZE_DEFAULTS["multiplier"], "--multiplier", help="Training budget as a multiple of the search's (its top rung's, with --rungs)."),
    seeds: int = typer.Option(FINALIZE_DEFAULTS["seeds"], "--seeds", help="Training seeds per model (at least 2)."),
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
                    ray_address=ray_address, progress=RichProgress(console), checkpoints=checkpoints)
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
