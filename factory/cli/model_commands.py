"""`factory train` and `factory generate` (a checkpoint through PyTorch, an export through onnxruntime only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from factory.cli.common import console, emit_json, fail, positive_int


def train_command(
    genome: str = typer.Argument(..., help="Reference name or genome JSON file."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Text file or folder (default: the embedded Shakespeare)."),
    tokens: int = typer.Option(2_000_000, "--tokens", help="Training budget in tokens."),
    seq_len: int = typer.Option(128, "--seq-len"),
    batch_size: int = typer.Option(16, "--batch-size"),
    lr: float = typer.Option(3e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads (default: torch's choice)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint folder to write."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Train a genome on a corpus and write a checkpoint (model.safetensors, genome.json, metrics.json)."""
    from factory.cli.genome import resolve_genome

    positive_int(tokens, "--tokens")
    positive_int(seq_len, "--seq-len")
    positive_int(batch_size, "--batch-size")
    if threads is not None:
        positive_int(threads, "--threads")
    if not (lr > 0 and math.isfinite(lr)):
        fail(f"--lr must be a positive number, got {lr}")
    g = resolve_genome(genome)
    if seq_len > g.context:
        fail(f"--seq-len {seq_len} exceeds the genome's context {g.context}")
    _check_writable(out)

    from factory.data.corpus import load_corpus
    from factory.train import TrainConfig, save_checkpoint, train

    data = load_corpus(corpus)
    cfg = TrainConfig(tokens=tokens, seq_len=seq_len, batch_size=batch_size, lr=lr, seed=seed, threads=threads)
    from rich.progress import Progress

    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task(f"training {g.name or g.hash()}", total=cfg.steps)

        def progress(step, steps, loss):
            bar.update(task, completed=step, description=f"training {g.name or g.hash()} loss {loss:.3f}")

        model, result = train(g, data, cfg, progress=progress)
    save_checkpoint(out, model, result, cfg, data)
    summary = {
        "name": g.name,
        "hash": g.hash(),
        "status": result.status,
        "val_loss": result.val_loss,
        "val_bpb": result.val_bpb,
        "unigram_bpb": data.unigram_bpb(),
        "tokens": result.tokens,
        "wall_s": result.wall_s,
        "tokens_per_s": result.tokens_per_s,
        "reason": result.reason,
        "out": str(out),
    }
    if as_json:
        emit_json(summary)
    else:
        console.print(
            f"{summary['status']}: val bpb {summary['val_bpb']:.3f} (unigram {summary['unigram_bpb']:.3f}) "
            f"after {result.tokens:,} tokens in {result.wall_s:.1f}s -> {out}"
        )
    if result.status != "ok":
        raise typer.Exit(1)


def generate_command(
    path: Path = typer.Argument(..., help="A checkpoint folder (PyTorch) or an export folder (onnxruntime only)."),
    prompt: str = typer.Option(..., "--prompt"),
    max_new: int = typer.Option(200, "--max-new"),
    seed: int = typer.Option(0, "--seed"),
    temperature: float = typer.Option(0.8, "--temperature"),
    top_k: int = typer.Option(40, "--top-k"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Generate text: prefill the prompt once, then decode token by token."""
    positive_int(max_new, "--max-new")
    if temperature < 0 or not math.isfinite(temperature):
        fail(f"--temperature must be >= 0, got {temperature}")
    if not path.is_dir():
        fail(f"not found: {path} (expected a checkpoint or export folder)")
    if (path / "manifest.json").is_file():
        from export.runtime import generate as ort_generate  # onnxruntime + numpy only: no torch

        text = ort_generate(path, prompt, max_new, seed=seed, temperature=temperature, top_k=top_k)
        engine = "onnxruntime"
    else:
        from factory.train import generate, load_checkpoint

        model, _ = load_checkpoint(path)
        text = generate(model, prompt, max_new, seed=seed, temperature=temperature, top_k=top_k)
        engine = "torch"
    if as_json:
        emit_json({"prompt": prompt, "text": text, "engine": engine, "seed": seed})
    else:
        print(prompt + text)


def _check_writable(out: Path) -> None:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if probe.exists() and not probe.is_dir():
        fail(f"--out {out}: {probe} is a file, not a folder")
    import os

    if not os.access(probe, os.W_OK):
        fail(f"--out {out}: {probe} is not writable")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("generate")(generate_command)
