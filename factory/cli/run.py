"""`factory run`: the main job, from a target to a report (search, finalize, export, profile, report)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from factory.cli.common import console, emit_json, fail, positive_int
from factory.presets import DEFAULT_RUN_PRESET, DEFAULT_TARGET, DEFAULTS, preset_help


def run_command(
    target: Optional[str] = typer.Option(None, "--target", help=f"Target name or TOML file (default: {DEFAULT_TARGET})."),
    preset: str = typer.Option(DEFAULT_RUN_PRESET, "--preset", help=preset_help() + "."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Text file or folder (default: embedded Shakespeare)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel evaluations (default: one per core)."),
    executor: str = typer.Option(DEFAULTS["executor"], "--executor", help="local | ray"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address"),
    seed: int = typer.Option(DEFAULTS["seed"], "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (new), or with --resume the run to continue."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Search, retrain, export, profile and report, for one target. Resumable at every stage."""
    from factory.job import PRESETS, JobConfig, read_job, run_job
    from factory.search.progress import RichProgress

    if resume is not None:
        if out is not None or target is not None:
            fail("--resume takes the run folder alone (its settings are in job.json)")
        progress = RichProgress(console, generations=read_job(resume).settings().generations)
        result = run_job(None, resume, resume=True, progress=progress)
    else:
        if out is None:
            fail("--out DIR is required (or --resume DIR)")
        if preset not in PRESETS:
            fail(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        if executor not in ("local", "ray"):
            fail(f"--executor must be local or ray, got {executor!r}")
        if workers is not None:
            positive_int(workers, "--workers")
        job = JobConfig(target=target or DEFAULT_TARGET, preset=preset, corpus=corpus, workers=workers,
                        executor=executor, ray_address=ray_address, seed=seed)
        result = run_job(job, out, progress=RichProgress(console, generations=PRESETS[preset].generations))
    if as_json:
        emit_json(result)
    else:
        for line in result["verdict"]:
            console.print(line)
        console.print(f"report: {result['report_html']}")


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
