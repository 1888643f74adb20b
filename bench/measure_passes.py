"""Measuring a set of exports in passes, as the latency benchmarks do.

On a shared machine the speed drifts for minutes and drops in bursts of seconds, so one measurement of an export
says little. Every export is measured once per pass, round-robin (each pass in its own order), each pass after all
of the previous one (so the measurements of one export are spread over the whole run), and a benchmark keeps the
lowest value (interference only ever adds time). Exports are made before the first pass: an export is heavy
multi-threaded work that must not share the machine with a measurement.

The lowest value is not always the steadiest. Prefill (dense compute, milliseconds per repetition) also
runs slower or faster for minutes at a time, whatever is measured: the machine's speed drifts, and the
lowest pass is whichever one fell in a fast minute. `drift_corrected` divides each measurement by the drift of its
moment, read off the other exports measured just before and after it; the median of the corrected passes is then
the steadier value. Which aggregate a benchmark keeps for each quantity, and why: bench/research/pass_noise.py.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import numpy as np

DRIFT_NEIGHBOURS = 3  # measurements of other exports on each side in time that read the drift of a moment
DRIFT_ROUNDS = 3  # how often each export's typical value and the drift are re-read from the corrected passes


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


def export_for_target(model, target, out: Path, corpus: str | None = None) -> Path:
    """A release export (export/pipeline.py) of an in-memory model for the target into `out`: the folders these
    benchmarks keep and measure in passes. (The search measures a candidate through export.measure and keeps
    nothing.)"""
    import shutil
    import tempfile

    from export.pipeline import ExportRequest, export_checkpoint
    from factory import measure_gate
    from factory.data.corpus import load_corpus
    from factory.train import TrainConfig, TrainResult, save_checkpoint

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=".checkpoint-"))
    try:
        untrained = TrainResult(status="ok", val_loss=float("nan"), val_bpb=float("nan"), tokens=0, steps=0,
                                wall_s=0.0, tokens_per_s=0.0)
        save_checkpoint(scratch, model, untrained, TrainConfig(tokens=1), load_corpus(corpus))
        with measure_gate.working():  # heavy, multi-threaded: never beside a measurement
            export_checkpoint(ExportRequest(checkpoint=scratch, out=out, target=target, corpus=corpus))
        return out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
    instead of stopping the run; save() runs after every measurement; describe(result) is the progress line. Each
    result also records when it was taken ("measured_at", seconds since the epoch), which drift_corrected orders
    by."""
    from factory.errors import FactoryError

    for pass_ in range(1, passes + 1):
        # each pass in its own order (seeded by the pass), so that no export meets the same moment of a drift that
        # repeats with the passes: drift_corrected could not tell that from the export's own latency
        order = random.Random(pass_).sample(list(exports.items()), len(exports))
        for i, (key, export) in enumerate(order):
            entry = entries[key]
            if "failed" in entry or f"pass{pass_}" in entry:
                continue
            try:
                started = time.time()
                entry[f"pass{pass_}"] = {**measure(export), "measured_at": started}
            except FactoryError as e:
                entry["failed"] = str(e).splitlines()[0]
            save()
            shown = entry.get(f"pass{pass_}")
            print(f"[pass {pass_} {i + 1}/{len(exports)}] {key[:10]} "
                  + (describe(shown) if shown else f"FAILED: {entry['failed']}"), flush=True)


def lowest(entry: dict, passes: int, quantity: str) -> float:
    """The lowest value of `quantity` over an entry's passes 1..passes."""
    return min(entry[f"pass{p}"][quantity] for p in range(1, passes + 1))


def measurement_order(entries: dict[str, dict], passes: int) -> list[tuple[str, int]]:
    """(key, pass) of every measurement of entries' passes 1..passes (entries marked "failed" left out), in the
    order they were taken: by "measured_at", after any measurements from before it was recorded, which were taken
    pass by pass in the entries' order."""
    taken = [(key, p) for p in range(1, passes + 1) for key, entry in entries.items() if "failed" not in entry]
    at = [entries[key][f"pass{p}"].get("measured_at") for key, p in taken]
    # untimed measurements predate the timed ones, in the order they were listed (a stable sort keeps it)
    return [kp for _, kp in sorted(zip(at, taken), key=lambda x: (x[0] is not None, x[0] or 0.0))]


def drift_corrected(entries: dict[str, dict], passes: int, quantity: str, neighbours: int = DRIFT_NEIGHBOURS,
                    rounds: int = DRIFT_ROUNDS) -> dict[str, list[float]]:
    """{key: [value of pass p divided by the machine's drift when it was taken, for p in 1..passes]}.

    The drift of a moment is the median, over the `neighbours` measurements of other exports taken just before it
    and just after it, of each one's value over its export's typical value (1.0 when there are no other exports).
    An export's typical value is the median of its passes; that median itself met some drift, so it is re-read
    from the corrected passes and the drift with it, `rounds` times in all."""
    order = measurement_order(entries, passes)
    value = np.array([entries[key][f"pass{p}"][quantity] for key, p in order], dtype=float)
    of_key: dict[str, list[int]] = {}  # each export's measurements, as indices into order
    for i, (key, _) in enumerate(order):
        of_key.setdefault(key, []).append(i)

    def nearest(i: int, step: int) -> list[int]:  # the `neighbours` measurements of other exports nearest to the
        found, j = [], i + step                     # i-th in one direction
        while 0 <= j < len(order) and len(found) < neighbours:
            if order[j][0] != order[i][0]:
                found.append(j)
            j += step
        return found

    around = [nearest(i, -1) + nearest(i, +1) for i in range(len(order))]
    corrected = value.copy()
    for _ in range(rounds):
        ratio = np.empty_like(value)
        for key, at in of_key.items():
            ratio[at] = value[at] / np.median(corrected[at])
        drift = np.array([np.median(ratio[a]) if a else 1.0 for a in around])
        corrected = value / drift
    out: dict[str, list[float]] = {key: [0.0] * passes for key in of_key}
    for (key, p), v in zip(order, corrected):
        out[key][p - 1] = float(v)
    return out


def odd_even_gaps(values: np.ndarray, aggregate=np.min) -> np.ndarray:
    """|aggregate of the odd passes / aggregate of the even passes - 1| for each row of values (one export's
    passes): how far that aggregate moves within a run, the noise ceiling of a model judged against it."""
    return np.abs(aggregate(values[:, 0::2], axis=1) / aggregate(values[:, 1::2], axis=1) - 1.0)
