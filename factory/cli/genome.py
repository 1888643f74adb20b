"""`factory genome list|show|random|validate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from factory.cli.common import console, emit_json, fail

app = typer.Typer(help="Architecture genomes: reference designs, static metrics, random genomes, validation.", no_args_is_help=True)

DTYPES = ("float32", "float16")


def resolve_genome(name_or_file: str):
    """A reference genome by name, or a genome JSON file. Bad input -> FactoryError naming the problem."""
    from factory.genome import Genome, GenomeError
    from factory.genome.references import reference_genomes

    refs = reference_genomes()
    if name_or_file in refs:
        return refs[name_or_file]
    path = Path(name_or_file)
    if not path.exists():
        fail(f"unknown genome {name_or_file!r}: not a reference name ({', '.join(refs)}) nor an existing file")
    if path.is_dir() and (path / "genome.json").is_file():
        path = path / "genome.json"  # a checkpoint folder
    try:
        genome = Genome.from_json(path.read_text())
        genome.validate()
    except (GenomeError, UnicodeDecodeError, IsADirectoryError) as e:
        fail(f"{path}: {e}")
    if not genome.name:
        from dataclasses import replace

        genome = replace(genome, name=path.stem)
    return genome


def describe(genome, context: int | None = None, dtype: str = "float32") -> dict:
    from factory.genome.metrics import static_metrics

    m = static_metrics(genome, context, dtype)
    from factory.ops import registry

    families = [registry.form(genome.layer_spec(i)) for i in range(genome.n_layers)]
    return {
        "name": genome.name,
        "hash": genome.hash(),
        "d_model": genome.d_model,
        "n_layers": genome.n_layers,
        "context": m.context,
        "dtype": dtype,
        "params": m.params,
        "cache_bytes": m.cache_bytes,
        "state_elements": m.state_elements,
        "flops_per_token": {"prefill": m.flops_prefill_per_token, "decode": m.flops_decode_per_token},
        "peak_memory_bytes": m.peak_memory_bytes,
        "layers": families,
        "latents": genome.latents,
    }


@app.command("list")
def list_genomes(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """The reference genomes shipped by name, with their static metrics at their own context."""
    from factory.genome.references import reference_genomes

    rows = [describe(g) for g in reference_genomes().values()]
    if as_json:
        emit_json({"genomes": rows})
        return
    from rich.table import Table

    table = Table("name", "params", "cache (KiB)", "MFLOPs/token decode", "layers")
    for r in rows:
        table.add_row(r["name"], f"{r['params']:,}", f"{r['cache_bytes'] / 1024:,.0f}",
                      f"{r['flops_per_token']['decode'] / 1e6:.2f}", " ".join(r["layers"]))
    console.print(table)


@app.command("show")
def show(
    genome: str = typer.Argument(..., help="Reference name or genome JSON file."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Context length for cache and FLOPs (default: the genome's)."),
    dtype: str = typer.Option("float32", "--dtype", help="Cache dtype: float32 | float16."),
    as_json: bool = typer.Option(False, "--json"),
):
    """A genome and its exact static metrics."""
    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if seq_len is not None and seq_len <= 0:
        fail(f"--seq-len must be a positive integer, got {seq_len}")
    g = resolve_genome(genome)
    info = describe(g, seq_len, dtype)
    if as_json:
        emit_json({**info, "genome": g.to_dict()})
        return
    console.print_json(json.dumps(g.to_dict()))
    for k, v in info.items():
        console.print(f"[bold]{k}[/]: {v}")


@app.command("random")
def random_genome(
    seed: int = typer.Option(..., "--seed"),
    n_layers: int = typer.Option(8, "--layers", help="Depth of the search space."),
    d_model: int = typer.Option(128, "--d-model"),
    context: int = typer.Option(256, "--context"),
    as_json: bool = typer.Option(False, "--json"),
):
    """A random valid genome from the search space (uniform genes, then repair)."""
    from factory.genome.space import SearchSpace

    if n_layers <= 0:
        fail(f"--layers must be a positive integer, got {n_layers}")
    space = SearchSpace.create(n_layers=n_layers, d_model=d_model, context=context)
    g = space.sample(seed)
    if as_json:
        emit_json({**describe(g), "genome": g.to_dict()})
    else:
        print(g.to_json())


@app.command("validate")
def validate(path: Path = typer.Argument(..., help="Genome JSON file.")):
    """Check a genome file; prints 'ok' or one line naming the bad field (exit 2)."""
    from factory.genome import Genome, GenomeError

    if not path.is_file():
        fail(f"genome file not found: {path}")
    try:
        g = Genome.from_json(path.read_text())
        errors = g.errors()
    except (GenomeError, UnicodeDecodeError) as e:
        fail(f"{path}: {e}")
    if errors:
        fail(f"{path}: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    print(f"ok {g.hash()}")
