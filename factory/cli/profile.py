"""`factory profile EXPORT_DIR --target NAME`: measure an export on this machine with the profiling protocol."""

from __future__ import annotations

import typer
from rich.table import Table

from factory.cli.common import console, emit_json


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("within budget" if ok else "OVER BUDGET")


def _print_result(result: dict, budgets: dict) -> None:
    table = Table(title=f"{result['target']} / {result['variant']} on {result['machine']['hostname']} "
                        f"({result['provider']}, {result['threads']} threads, protocol {result['protocol_version']})")
    for column in ("measure", "p50", "p95", "budget", ""):
        table.add_column(column)
    within = result["within_budget"]
    table.add_row(f"prefill {result['prompt_length']} tokens", f"{result['prefill_ms']['p50']:.3f} ms",
                  f"{result['prefill_ms']['p95']:.3f} ms", budgets["prefill"], _verdict(within["prefill_ms"]))
    table.add_row(f"decode @ {result['decode_context']}", f"{result['decode_ms']['p50']:.3f} ms",
                  f"{result['decode_ms']['p95']:.3f} ms", budgets["decode"], _verdict(within["decode_ms_p95"]))
    table.add_row("tokens/s", f"{result['tokens_per_s']:.1f}", "", "", "")
    if "peak_rss_mb" in result:
        table.add_row("peak RSS", f"{result['peak_rss_mb']:.1f} MiB", "", budgets["memory"], _verdict(within["memory"]))
    table.add_row("file", f"{result['file_mb']:.2f} MiB", "", "", "")
    table.add_row("session create", f"{result['session_create_ms']:.1f} ms", "", "", "")
    console.print(table)
    for graph, ops in (result.get("top_ops") or {}).items():
        ops_table = Table(title=f"top operators, {graph}")
        for column in ("op", "ms/run", "share", "providers"):
            ops_table.add_column(column)
        for op in ops:
            ops_table.add_row(op["op"], f"{op['ms_per_run']:.3f}", f"{op['share']:.0%}", ", ".join(op["providers"]))
        console.print(ops_table)
    for note in result.get("notes", []):
        console.print(f"note: {note}")


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_command(
        export_dir: str = typer.Argument(..., help="An export folder (holds manifest.json)."),
        target: str = typer.Option(..., "--target", "-t", help="A built-in target name or a path to a .toml file."),
        variant: str = typer.Option(None, "--variant", help="Export variant to measure (default: the target's)."),
        repeats: int = typer.Option(20, "--repeats", min=1, help="Timed prefill runs (decode steps: 5x)."),
        top_ops: int = typer.Option(0, "--top-ops", min=0, help="Also report the N slowest operator types."),
        memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak RSS in a separate process."),
        record: bool = typer.Option(True, "--record/--no-record", help="Append the result to the measurement store."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    ) -> None:
        """Measure an export with onnxruntime for a target (its provider, threads, prompt and context)."""
        from profiles.profiler import prepare_profile, profile_artifact  # onnxruntime loads only for this command

        # Checks first, so that a bad argument is one line on stderr with no progress text before it.
        resolved, _, chosen = prepare_profile(export_dir, target, variant)
        console.print(
            f"profiling {export_dir} ({chosen}) for {resolved.name}: {resolved.provider}, {resolved.threads} threads"
        )
        from factory import measure_gate

        with measure_gate.measuring():  # a search training on this machine pauses meanwhile
            result = profile_artifact(
                export_dir, resolved, variant=variant, repeats=repeats, top_ops=top_ops, memory=memory, record=record
            )
        if as_json:
            emit_json(result)
            return
        budgets = {
            "prefill": "-" if resolved.prefill_ms is None else f"{resolved.prefill_ms:g} ms (p50)",
            "decode": "-" if resolved.decode_ms_p95 is None else f"{resolved.decode_ms_p95:g} ms (p95)",
            "memory": "-" if resolved.memory_limit_bytes is None else f"{resolved.memory_limit_bytes / 2**20:,.0f} MiB",
        }
        _print_result(result, budgets)
