"""The latency benchmarks' measuring protocol (bench/measure_passes.py): exports first, round-robin passes, resume,
failures recorded, the lowest value kept."""

import importlib.util
from pathlib import Path

import pytest

from factory.errors import FactoryError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("measure_passes", ROOT / "bench" / "measure_passes.py")
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

    timings = iter([5.0, 7.0, 4.0, 9.0, 6.0, 3.0])

    def measure(path):
        events.append(("measure", path.name))
        return {"ms": next(timings)}

    measure_passes.measure_in_passes(exports, entries, 3, measure, lambda: saves.append(1), lambda m: f"{m['ms']}")
    # every export before any measurement; each pass visits every export before the next pass starts
    assert events == [("export", "a"), ("export", "b"), ("export", "c")] + [("measure", k) for k in "acacac"]
    assert [entries["a"][f"pass{p}"]["ms"] for p in (1, 2, 3)] == [5.0, 4.0, 6.0]
    assert measure_passes.lowest(entries["a"], 3, "ms") == 4.0 and measure_passes.lowest(entries["c"], 3, "ms") == 3.0
    assert "pass1" not in entries["b"] and len(saves) == 1 + 6

    # a rerun with more passes measures only the new ones
    events.clear()
    measure_passes.measure_in_passes(exports, entries, 4, lambda p: {"ms": 1.0}, lambda: None, str)
    assert entries["a"]["pass4"] == {"ms": 1.0} and entries["a"]["pass1"]["ms"] == 5.0 and events == []


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
