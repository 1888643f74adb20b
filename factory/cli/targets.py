"""`factory targets list|show|validate`: the hardware targets (TOML files; schema in the `targets` package)."""

from __future__ import annotations

import typer
from rich import box
from rich.table import Table

from factory.cli.common import console, emit_json
from targets import Target, list_targets, load_target, validate_target_file

app = typer.Typer(help="Hardware targets: list, show, validate.", no_args_is_help=True)


def _mib(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:g}GiB" if value >= 2**30 else f"{value / 2**20:.0f}MiB"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}ms"


@app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """List the built-in targets."""
    found = list_targets()
    if as_json:
        emit_json({"targets": [t.to_dict() for t in found]})
        return
    table = Table(title="targets (budgets: prefill p50, decode p95)", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for column in ("name", "EP", "threads", "prompt/ctx", "prefill", "decode", "memory", "quant"):
        table.add_column(column, no_wrap=column != "quant")
    for t in found:
        table.add_row(
            t.name, t.provider.replace("ExecutionProvider", ""), str(t.threads),
            f"{t.prompt_length}/{t.decode_context}", _ms(t.prefill_ms), _ms(t.decode_ms_p95),
            _mib(t.memory_limit_bytes),
            t.quantization if t.quantization_isa == "none" else f"{t.quantization} {t.quantization_isa}",
        )
    console.print(table)


def _print_target(t: Target) -> None:
    table = Table(title=f"{t.name} ({t.source})", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in t.to_dict().items():
        if key == "source":
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "-"
        table.add_row(key, "-" if value is None else str(value))
    console.print(table)


@app.command("show")
def show_command(
    target: str = typer.Argument(..., help="A built-in target name or a path to a .toml file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Show every setting of one target."""
    found = load_target(target)
    if as_json:
        emit_json(found.to_dict())
    else:
        _print_target(found)


@app.command("validate")
def validate_command(path: str = typer.Argument(..., help="A target .toml file.")) -> None:
    """Check a target file: prints "ok", or one line naming the bad field (exit 2)."""
    found = validate_target_file(path)
    console.print(f"{found.name}: valid target ({found.device_class}, {found.provider})")
    typer.echo("ok")
