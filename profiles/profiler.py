"""Profile one export on this machine for a target, with the protocol of `profiles.runner` (its docstring)."""

from __future__ import annotations

import platform
from pathlib import Path

from factory.errors import FactoryError
from profiles import runner, store
from profiles.store import record_measurement
from targets import Target, load_target

_ARM_MACHINES = ("arm64", "aarch64", "armv8l", "armv7l")


def read_export(export_dir: str | Path) -> dict:
    """The export's manifest; a missing or corrupt export is a one-line FactoryError."""
    try:
        return runner.read_manifest(str(export_dir))
    except runner.MeasurementError as e:
        raise FactoryError(str(e)) from None


def choose_variant(manifest: dict, target: Target, variant: str | None = None, export_dir: str | Path = "") -> str:
    """The variant to measure: the one asked for, else the first the target's quantization accepts.

    No silent substitution: a target that wants int8 is not measured on the float32 graph unless asked to be.
    """
    available = sorted(manifest["variants"])
    if variant is not None:
        if variant not in manifest["variants"]:
            raise FactoryError(f"{export_dir}: no variant {variant!r} in this export (it has: {', '.join(available)})")
        return variant
    for name in target.preferred_variants():
        if name in manifest["variants"]:
            return name
    raise FactoryError(
        f"{export_dir}: target {target.name} wants quantization {target.quantization} "
        f"(variant {' or '.join(target.preferred_variants())}) but the export has only {', '.join(available)}; "
        "re-export with that quantization or pass --variant"
    )


def _within_budget(result: dict, target: Target) -> dict:
    """Each budget of the target against the measurement: True / False, or None where the target sets none."""
    peak = result.get("peak_rss_mb")
    return {
        "prefill_ms": None if target.prefill_ms is None else result["prefill_ms"]["p50"] <= target.prefill_ms,
        "decode_ms_p95": None if target.decode_ms_p95 is None else result["decode_ms"]["p95"] <= target.decode_ms_p95,
        "memory": None
        if target.memory_limit_bytes is None or peak is None
        else peak * runner.MIB <= target.memory_limit_bytes,
    }


def _notes(manifest: dict, variant: str, target: Target, result: dict) -> list[str]:
    notes = []
    variant_isa = manifest["variants"][variant].get("isa")
    if target.precision == "int8" and variant_isa and variant_isa != target.quantization_isa:
        notes.append(f"variant {variant} was quantized with the {variant_isa} preset; the target uses {target.quantization_isa}")
    if target.quantization_isa == "arm64" and platform.machine().lower() not in _ARM_MACHINES:
        notes.append(f"measured on {platform.machine()}, not on the ARM target device: a proxy, not the device's numbers")
    if (manifest.get("parity") or {}).get("passed") is False:
        notes.append("the export failed its parity check: its outputs do not match the PyTorch model")
    cpus = (result.get("machine") or {}).get("cpu_count")
    if target.provider == "CPUExecutionProvider" and cpus and target.threads > cpus:
        notes.append(f"the target asks for {target.threads} threads but this machine has {cpus} CPUs: oversubscribed")
    if result.get("decode_past") == "zeros":
        notes.append(f"prefill of {target.decode_context} tokens failed; decode was timed on a zero past of that length")
    return notes


def check_provider(target: Target) -> None:
    try:
        runner.check_provider(target.provider)
    except runner.ProviderUnavailable as e:
        raise FactoryError(f"target {target.name}: {e}") from None


def prepare_profile(export_dir: str | Path, target: Target | str, variant: str | None = None) -> tuple[Target, dict, str]:
    """Every check that needs no measuring: (target, manifest, variant), or a one-line FactoryError."""
    target = load_target(target)
    check_provider(target)  # first: a target whose provider is missing here is not measurable, whatever the export holds
    manifest = read_export(export_dir)
    return target, manifest, choose_variant(manifest, target, variant, export_dir)


def profile_artifact(
    export_dir: str | Path,
    target: Target | str,
    variant: str | None = None,
    repeats: int = runner.DEFAULT_REPEATS,
    decode_repeats: int | None = None,
    top_ops: int = 0,
    memory: bool = True,
    record: bool = True,
) -> dict:
    """Measure an export for `target` on this machine (see the protocol in profiles/runner.py).

    Returns prefill_ms / decode_ms ({p50, p95, mean, stdev, min, max, n}), tokens_per_s, peak_rss_mb, file_mb,
    session_create_ms, provider, threads, protocol_version, versions, variant, machine, prompt_length,
    decode_context, within_budget and notes (plus top_ops when asked). With `record`, the result is appended to the
    target's measurement store as a "local" measurement.
    """
    if repeats < 1:
        raise FactoryError(f"repeats must be a positive integer, got {repeats}")
    if decode_repeats is not None and decode_repeats < 1:
        raise FactoryError(f"decode_repeats must be a positive integer, got {decode_repeats}")
    if top_ops < 0:
        raise FactoryError(f"top_ops must be zero or a positive integer, got {top_ops}")
    target, manifest, chosen = prepare_profile(export_dir, target, variant)
    if record and not manifest.get("genome_hash"):  # say so before measuring, not after
        raise FactoryError(f"{export_dir}: manifest.json has no genome_hash, so the measurement cannot be stored (use record=False)")
    if record:
        store.archive_genome(manifest)
    result = measure_variant(export_dir, manifest, chosen, target, repeats, decode_repeats, top_ops, memory)
    if record:
        record_measurement(target, result, source="local")
    return result


def measure_variant(export_dir: str | Path, manifest: dict, variant: str, target: Target,
                    repeats: int = runner.DEFAULT_REPEATS, decode_repeats: int | None = None, top_ops: int = 0,
                    memory: bool = True) -> dict:
    """Measure one variant of the graphs `manifest` describes (paths relative to `export_dir`) for `target`: the
    protocol's result with the target's name, fingerprint, budgets and notes. Nothing is recorded."""
    try:
        result = runner.measure(
            str(export_dir),
            variant,
            target.providers,
            target.session_provider_options(),
            target.threads,
            target.prompt_length,
            target.decode_context,
            repeats=repeats,
            decode_repeats=decode_repeats,
            top_ops=top_ops,
            memory=memory,
            manifest=manifest,
        )
    except runner.MeasurementError as e:
        raise FactoryError(f"{export_dir}: {e}" if str(export_dir) not in str(e) else str(e)) from None
    result.update(
        {
            "target": target.name,
            "target_fingerprint": target.fingerprint(),
            "export_dir": str(Path(export_dir).resolve()),
            "within_budget": _within_budget(result, target),
            "notes": _notes(manifest, variant, target, result),
        }
    )
    return result
