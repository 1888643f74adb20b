"""Measuring a set of exports in passes, as the latency benchmarks do.

On a shared machine the speed drifts for minutes and drops in bursts of seconds, so one measurement of an export
says little. Every export is measured once per pass, round-robin, each pass after all of the previous one (so the
measurements of one export are spread over the whole run), and what a benchmark keeps is the lowest value
(interference only ever adds time). Exports are made before the first pass: an export is heavy multi-threaded
work that must not share the machine with a measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def distinct_samples(space, n: int) -> list:
    """The first n distinct genomes of space.sample(0), space.sample(1), ... (the benchmarks share these seeds, so
    their exports can be reused across them)."""
    genomes, seen, seed = [], set(), 0
    while len(genomes) < n:
        g = space.sample(seed)
        seed += 1
        if g.hash() not in seen:
            seen.add(g.hash())
            genomes.append(g)
    return genomes


def export_all(entries: dict[str, dict], export: Callable[[str], Path], save: Callable[[], None]) -> dict[str, Path]:
    """{key: export(key)} for every entry not marked "failed"; an export that raises FactoryError marks its entry
    failed (saved) instead of stopping the run."""
    from factory.errors import FactoryError

    exports = {}
    for i, (key, entry) in enumerate(entries.items()):
        if "failed" not in entry:
            try:
                exports[key] = export(key)
            except FactoryError as e:
                entry["failed"] = str(e).splitlines()[0]
                save()
        print(f"[export {i + 1}/{len(entries)}] {key[:10]} " + entry.get("failed", "ok"), flush=True)
    return exports


def measure_in_passes(exports: dict[str, Path], entries: dict[str, dict], passes: int,
                      measure: Callable[[Path], dict], save: Callable[[], None],
                      describe: Callable[[dict], str]) -> None:
    """Fill entries[key][f"pass{p}"] = measure(exports[key]) for p in 1..passes, skipping what is already there
    (a rerun resumes) and entries marked "failed". A measurement that raises FactoryError marks its entry failed
    instead of stopping the run; save() runs after every measurement; describe(result) is the progress line."""
    from factory.errors import FactoryError

    for pass_ in range(1, passes + 1):
        for i, (key, export) in enumerate(exports.items()):
            entry = entries[key]
            if "failed" in entry or f"pass{pass_}" in entry:
                continue
            try:
                entry[f"pass{pass_}"] = measure(export)
            except FactoryError as e:
                entry["failed"] = str(e).splitlines()[0]
            save()
            shown = entry.get(f"pass{pass_}")
            print(f"[pass {pass_} {i + 1}/{len(exports)}] {key[:10]} "
                  + (describe(shown) if shown else f"FAILED: {entry['failed']}"), flush=True)


def lowest(entry: dict, passes: int, quantity: str) -> float:
    """The lowest value of `quantity` over an entry's passes 1..passes."""
    return min(entry[f"pass{p}"][quantity] for p in range(1, passes + 1))
