"""`factory profiles pack|import|list|model`: measuring on a board through a probe pack, the measurement store,
and the per-target latency model fitted on it."""

from __future__ import annotations

from typing import List

import typer
from rich.table import Table

from factory.cli.common import console, emit_json, fail

app = typer.Typer(help="Probe packs for boards, their results, and the measurement store.", no_args_is_help=True)


@app.command("pack")
def pack_command(
    export_dirs: List[str] = typer.Argument(..., help="Export folders (each holds manifest.json)."),
    target: str = typer.Option(..., "--target", "-t", help="A built-in target name or a path to a .toml file."),
    out: str = typer.Option(..., "--out", "-o", help="The pack folder to create."),
    variant: str = typer.Option(None, "--variant", help="Variant to pack for every export (default: the target's)."),
    repeats: int = typer.Option(20, "--repeats", min=1, help="Timed prefill runs the runner makes (decode: 5x)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Make a self-contained probe pack: candidates, target settings and runner.py."""
    from profiles.pack import make_pack

    pack = make_pack(export_dirs, target, out, variant=variant, repeats=repeats, force=force)
    if as_json:
        emit_json({"pack_dir": out, **pack})
        return
    console.print(f"wrote {out}: {len(pack['candidates'])} candidates for {pack['target']['name']}")
    console.print(f"on the device: python3 runner.py . --out results.json   (inside {out})")
    console.print(f"then: factory profiles import results.json --target {pack['target']['name']}")


@app.command("import")
def import_command(
    results: str = typer.Argument(..., help="A results JSON written by runner.py."),
    target: str = typer.Option(..., "--target", "-t", help="The target the pack was made for."),
    allow_overrides: bool = typer.Option(
        False, "--allow-overrides", help="Accept results measured with --threads/--provider overrides."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the file, store nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Check a board's results file and store its measurements with the target."""
    from profiles.results import import_results

    summary = import_results(results, target, allow_overrides=allow_overrides, dry_run=dry_run)
    if as_json:
        emit_json(summary)
        return
    console.print(
        f"{summary['measured']} measurements from {summary['source']}: {summary['imported']} stored, "
        f"{summary['already_present']} already present -> {summary['store']}"
    )
    for cid, error in summary["failed_on_device"].items():
        console.print(f"not measured on the device: {cid}: {error}")


@app.command("list")
def list_command(
    target: str = typer.Option(..., "--target", "-t", help="A built-in target name or a path to a .toml file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Show the stored measurements of a target."""
    from profiles.store import load_measurements, measurements_path
    from targets import load_target

    resolved = load_target(target)
    records = load_measurements(resolved)
    if as_json:
        emit_json({"target": resolved.name, "store": measurements_path(resolved.name), "records": records})
        return
    table = Table(title=f"{resolved.name}: {len(records)} measurements ({measurements_path(resolved.name)})")
    for column in ("genome", "variant", "source", "prefill p50", "decode p50", "decode p95", "peak RSS", "when"):
        table.add_column(column)
    for r in records:
        m = r["measurement"]
        table.add_row(
            r["genome_hash"][:12], str(r.get("variant")), r["source"], f"{m['prefill_ms']['p50']:.3f} ms",
            f"{m['decode_ms']['p50']:.3f} ms", f"{m['decode_ms']['p95']:.3f} ms",
            f"{m['peak_rss_mb']:.0f} MiB" if m.get("peak_rss_mb") else "-", r["recorded_at"],
        )
    console.print(table)


@app.command("model")
def model_command(
    target: str = typer.Option(..., "--target", "-t", help="A built-in target name or a path to a .toml file."),
    metric: str = typer.Option(None, "--metric", help="decode | prefill (default: the target's latency metric)."),
    source: str = typer.Option("all", "--source", help="all | board: fit on every measurement, or board data only."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Fit the target's latency model on its stored measurements and show its held-out accuracy."""
    from factory.features import featurizer
    from profiles.latency import MIN_SAMPLES_TO_PREDICT, STATISTICS, fit, training_samples
    from profiles.store import load_measurements
    from targets import load_target

    resolved = load_target(target)
    if metric is not None and metric not in ("decode", "prefill"):
        fail(f"--metric must be decode or prefill, got {metric!r}")
    if source not in ("all", "board"):
        fail(f"--source must be all or board, got {source!r}")
    metric = metric or resolved.latency_metric
    stored = load_measurements(resolved)
    records = [r for r in stored if source == "all" or str(r.get("source", "")).startswith("board:")]
    model = fit(records, resolved, metric, featurizer(resolved))
    if model is None:
        n = len(training_samples(records, resolved, metric, featurizer(resolved)).budget)
        others = len(stored) - n
        why = (f"; {others} other records were measured with other settings (threads, provider, prompt length, "
               f"context, protocol) or repeat a genome" if others > 0 else "")
        fail(f"{resolved.name}: {n} usable {metric} measurements stored, the latency model needs at least "
             f"{MIN_SAMPLES_TO_PREDICT} (measure more with `factory profile` or import a board's results){why}")
    data = {"target": resolved.name, **model.to_dict()}
    if as_json:
        emit_json(data)
        return
    a = model.accuracy
    steady, budget = STATISTICS[metric]
    console.print(f"{resolved.name}: {metric} latency model fitted on {model.n_samples} measurements, "
                  f"{model.view.replace('_', ' ')} features")
    console.print(f"fitted on each profile's {'fastest run' if steady == 'min' else steady}, predicting its {budget} "
                  f"(x{model.scale:.3f}, the median ratio)")
    console.print(f"held-out (5-fold, {a['n']} predictions): {a['within_10pct']:.0%} of predictions within +-10%, mean relative "
                  f"error {a['mean_relative_error']:.1%}, max {a['max_relative_error']:.1%}")
    for view, v in sorted(a.get("views", {}).items()):
        if view != model.view:
            console.print(f"  ({view.replace('_', ' ')} features: {v['within_10pct']:.0%} within +-10%, mean relative "
                          f"error {v['mean_relative_error']:.1%})")
    table = Table(title="milliseconds per unit of each feature (non-negative)")
    table.add_column("feature")
    table.add_column("coefficient", justify="right")
    for name, coef in zip(model.feature_names, model.coef):
        if coef > 0:
            table.add_row(name, f"{coef:.4g}")
    table.add_row("(intercept)", f"{model.intercept:.4g}")
    console.print(table)
