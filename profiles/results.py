"""Importing a board's results file (written by runner.py) into the measurement store, after checking it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from factory.errors import FactoryError
from profiles import runner
from profiles.store import append_records, make_record, measurements_path
from targets import Target, load_target


def _number(where: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise FactoryError(f"{where}: must be a positive number, got {value!r}")
    return float(value)


def _check_stats(where: str, stats) -> None:
    if not isinstance(stats, dict):
        raise FactoryError(f"{where}: missing or not an object")
    p50 = _number(f"{where}.p50", stats.get("p50"))
    p95 = _number(f"{where}.p95", stats.get("p95"))
    if p50 > p95:
        raise FactoryError(f"{where}: p50 {p50} is above p95 {p95}")


def _check_candidate(cid: str, entry) -> None:
    where = f"candidates.{cid}"
    if not isinstance(entry, dict):
        raise FactoryError(f"{where}: not an object")
    if entry.get("status") not in ("ok", "error"):
        raise FactoryError(f"{where}.status: must be 'ok' or 'error', got {entry.get('status')!r}")
    if entry["status"] == "error":
        return
    for key in ("genome_hash", "variant", "provider"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise FactoryError(f"{where}.{key}: missing")
    if entry.get("protocol_version") != runner.PROTOCOL_VERSION:
        raise FactoryError(f"{where}.protocol_version: {entry.get('protocol_version')!r}, expected {runner.PROTOCOL_VERSION}")
    _check_stats(f"{where}.prefill_ms", entry.get("prefill_ms"))
    _check_stats(f"{where}.decode_ms", entry.get("decode_ms"))
    for key in ("tokens_per_s", "file_mb", "session_create_ms"):
        _number(f"{where}.{key}", entry.get(key))
    if "peak_rss_mb" in entry:  # absent when the runner ran with --no-memory
        _number(f"{where}.peak_rss_mb", entry.get("peak_rss_mb"))


def read_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"results file not found: {path}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FactoryError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(results, dict) or results.get("format") != runner.RESULTS_FORMAT:
        raise FactoryError(f"{path}: not a {runner.RESULTS_FORMAT} file (written by runner.py)")
    if results.get("protocol_version") != runner.PROTOCOL_VERSION:
        raise FactoryError(
            f"{path}: measured with protocol {results.get('protocol_version')!r}, this factory uses "
            f"{runner.PROTOCOL_VERSION}: re-run a fresh pack with its own runner.py"
        )
    for key in ("target", "settings", "device", "candidates"):
        if key not in results:
            raise FactoryError(f"{path}: {key}: missing")
    if not isinstance(results["candidates"], dict):
        raise FactoryError(f"{path}: candidates: must be an object keyed by candidate id")
    try:
        for cid, entry in results["candidates"].items():
            _check_candidate(cid, entry)
    except FactoryError as e:
        raise FactoryError(f"{path}: {e}") from None
    return results


def _check_settings(results: dict, target: Target, allow_overrides: bool) -> None:
    """The results must have been measured with the target's settings (or the user accepts that they were not)."""
    settings = results["settings"]
    if results["target"] != target.name:
        raise FactoryError(f"the results are for target {results['target']!r}, not {target.name!r}")
    expected = {
        "provider": target.provider,
        "threads": target.threads,
        "prompt_length": target.prompt_length,
        "decode_context": target.decode_context,
    }
    actual = {
        "provider": (settings.get("providers") or [None])[0],
        "threads": settings.get("threads"),
        "prompt_length": settings.get("prompt_length"),
        "decode_context": settings.get("decode_context"),
    }
    for key, want in expected.items():
        if actual[key] != want:
            if key in ("prompt_length", "decode_context") or not allow_overrides:
                hint = "" if key in ("prompt_length", "decode_context") else " (pass --allow-overrides to keep them)"
                raise FactoryError(
                    f"{key}: the results were measured with {actual[key]!r} but target {target.name} says {want!r}{hint}"
                )


def import_results(
    path: str | Path, target: Target | str, allow_overrides: bool = False, dry_run: bool = False
) -> dict:
    """Check a results file and append its successful measurements to the target's store; returns a summary."""
    target = load_target(target)
    results = read_results(path)
    _check_settings(results, target, allow_overrides)
    hostname = (results.get("device") or {}).get("hostname") or "unknown"
    source = f"board:{hostname}"
    records, failed = [], {}
    for cid, entry in results["candidates"].items():
        if entry["status"] != "ok":
            failed[cid] = entry.get("error", "")
            continue
        measurement = dict(entry)
        measurement["machine"] = results["device"]
        measurement["target"] = target.name
        measurement["settings_overridden"] = list(results["settings"].get("overridden") or [])
        records.append(make_record(target, measurement, source))
    written, skipped = (0, 0) if dry_run else append_records(target.name, records)
    return {
        "target": target.name,
        "source": source,
        "measured": len(records),
        "imported": written,
        "already_present": skipped,
        "failed_on_device": failed,
        "store": str(measurements_path(target.name)),
        "dry_run": dry_run,
    }
