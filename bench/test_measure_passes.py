"""Self-check of the latency benchmarks' measuring protocol (bench/measure_passes.py): exports first, round-robin
passes, resume, failures recorded, the lowest value kept, the machine's drift read off neighbouring measurements.

Not part of the default suite (pyproject's testpaths is tests/, which never imports bench/):
    .venv/bin/python -m pytest -q bench/test_measure_passes.py
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from factory.errors import FactoryError

_spec = importlib.util.spec_from_file_location("measure_passes", Path(__file__).resolve().parent / "measure_passes.py")
measure_passes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(measure_passes)


def test_exports_all_then_measures_round_robin_and_resumes(tmp_path):
    entries = {key: {} for key in ("a", "b", "c")}
    events, saves = [], []

    def export(key):
        events.append(("export", key))
        if key == "b":
            raise FactoryError("parity missed\nsecond line")
        return tmp_path / key

    exports = measure_passes.export_all(entries, export, lambda: saves.append(1))
    assert list(exports) == ["a", "c"] and entries["b"] == {"failed": "parity missed"}

    timings = {"a": iter([5.0, 4.0, 6.0]), "c": iter([7.0, 9.0, 3.0])}

    def measure(path):
        events.append(("measure", path.name))
        return {"ms": next(timings[path.name])}

    measure_passes.measure_in_passes(exports, entries, 3, measure, lambda: saves.append(1), lambda m: f"{m['ms']}")
    # every export before any measurement; each pass visits every export before the next pass starts
    assert events[:3] == [("export", "a"), ("export", "b"), ("export", "c")]
    measured = [name for _, name in events[3:]]
    assert [sorted(measured[i:i + 2]) for i in (0, 2, 4)] == [["a", "c"]] * 3
    assert [entries["a"][f"pass{p}"]["ms"] for p in (1, 2, 3)] == [5.0, 4.0, 6.0]
    assert measure_passes.lowest(entries["a"], 3, "ms") == 4.0 and measure_passes.lowest(entries["c"], 3, "ms") == 3.0
    assert "pass1" not in entries["b"] and len(saves) == 1 + 6
    # every measurement records when it was taken, and each pass was taken after the previous one
    taken = [[entries[k][f"pass{p}"]["measured_at"] for k in "ac"] for p in (1, 2, 3)]
    assert max(taken[0]) <= min(taken[1]) and max(taken[1]) <= min(taken[2])

    # a rerun with more passes measures only the new ones
    events.clear()
    measure_passes.measure_in_passes(exports, entries, 4, lambda p: {"ms": 1.0}, lambda: None, str)
    assert entries["a"]["pass4"]["ms"] == 1.0 and entries["a"]["pass1"]["ms"] == 5.0 and events == []


def test_each_pass_takes_the_exports_in_its_own_order(tmp_path):
    entries = {f"e{i}": {} for i in range(8)}
    order = []
    measure_passes.measure_in_passes({k: tmp_path / k for k in entries}, entries, 3,
                                     lambda path: order.append(path.name) or {"ms": 1.0}, lambda: None, str)
    passes = [order[0:8], order[8:16], order[16:24]]
    assert all(sorted(p) == sorted(entries) for p in passes) and len({tuple(p) for p in passes}) == 3
    assert measure_passes.measurement_order(entries, 3) == [(k, p + 1) for p in range(3) for k in passes[p]]


def test_a_failed_measurement_is_recorded_and_not_retried(tmp_path):
    entries = {"a": {}, "b": {}}
    calls = []

    def measure(path):
        calls.append(path.name)
        if path.name == "a":
            raise FactoryError("session could not start")
        return {"ms": 2.0}

    measure_passes.measure_in_passes({k: tmp_path / k for k in entries}, entries, 2, measure, lambda: None, str)
    assert entries["a"] == {"failed": "session could not start"}
    assert calls == ["a", "b", "b"]
    with pytest.raises(KeyError):
        measure_passes.lowest(entries["a"], 2, "ms")


def _drifting_run(genomes: int, passes: int, seed: int = 0):
    """Entries as measure_in_passes leaves them, for genomes of known latency measured on a machine whose speed
    drifts slowly (up to +-15%) and that adds a little noise: (entries, true latency by key)."""
    rng = np.random.default_rng(seed)
    true = {f"g{i}": float(rng.uniform(2.0, 20.0)) for i in range(genomes)}
    entries, clock = {key: {} for key in true}, 0
    for p in range(1, passes + 1):
        for key in rng.permutation(list(true)):  # each pass in its own order, as measure_in_passes takes them
            speed = 1.0 + 0.15 * np.sin(clock / 40.0)  # minutes-long drift, shared by every genome
            entries[key][f"pass{p}"] = {"ms": true[key] * speed * float(rng.uniform(1.0, 1.03)),
                                        "measured_at": 1000.0 + clock}
            clock += 1
    return entries, true


def test_drift_correction_recovers_latency_a_drifting_machine_hides():
    entries, true = _drifting_run(genomes=60, passes=6)
    corrected = {k: np.median(v) for k, v in measure_passes.drift_corrected(entries, 6, "ms").items()}
    keys = list(true)
    ratio = np.array([corrected[k] / true[k] for k in keys])
    lowest = np.array([measure_passes.lowest(entries[k], 6, "ms") / true[k] for k in keys])
    # up to one common factor (the run's typical speed), the corrected values are each genome's latency
    assert np.max(np.abs(ratio / np.median(ratio) - 1.0)) < 0.02
    # the lowest pass of a genome keeps whichever moment of the drift it happened to meet
    assert np.max(np.abs(lowest / np.median(lowest) - 1.0)) > 0.05


def test_drift_correction_orders_by_time_taken_and_reads_only_other_genomes():
    # a measured out of order (its pass 2 taken first): with time stamps, order follows them
    entries = {"a": {"pass1": {"ms": 1.0, "measured_at": 5.0}, "pass2": {"ms": 1.0, "measured_at": 1.0}},
               "b": {"pass1": {"ms": 2.0, "measured_at": 6.0}, "pass2": {"ms": 2.0, "measured_at": 2.0}},
               "c": {"failed": "export failed"}}
    assert measure_passes.measurement_order(entries, 2) == [("a", 2), ("b", 2), ("a", 1), ("b", 1)]
    # without them (caches written before they were recorded), pass by pass in the entries' order
    for key in "ab":
        for p in (1, 2):
            del entries[key][f"pass{p}"]["measured_at"]
    assert measure_passes.measurement_order(entries, 2) == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    # one genome alone has no neighbours to read the drift from: its values are kept as measured
    alone = {"a": {"pass1": {"ms": 3.0}, "pass2": {"ms": 5.0}, "pass3": {"ms": 4.0}}}
    assert measure_passes.drift_corrected(alone, 3, "ms") == {"a": [3.0, 5.0, 4.0]}
    # b ran 20% slow in pass 2 while a, measured beside it, ran at its usual speed: not drift, kept
    pair = {"a": {"pass1": {"ms": 1.0}, "pass2": {"ms": 1.0}, "pass3": {"ms": 1.0}},
            "b": {"pass1": {"ms": 2.0}, "pass2": {"ms": 2.4}, "pass3": {"ms": 2.0}}}
    assert measure_passes.drift_corrected(pair, 3, "ms")["b"] == [2.0, 2.4, 2.0]
