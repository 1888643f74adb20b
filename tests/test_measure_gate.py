"""The measurement gate (factory.measure_gate): work waits for a running measurement, a measurement waits for
running work, and the gate can be turned off. Orderings are checked with timestamps the holder writes."""

import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from factory import measure_gate

pytestmark = pytest.mark.skipif(measure_gate.fcntl is None, reason="no POSIX flock on this platform")

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from factory import measure_gate
    kind, marks = sys.argv[1], Path(sys.argv[2])
    with getattr(measure_gate, kind)():
        (marks / "entered").write_text(str(time.time()))
        time.sleep(1.0)
        (marks / "leaving").write_text(str(time.time()))
""")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Locks in a private temp folder (in this process and the holder), not the machine's shared one."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(measure_gate.ENV, raising=False)
    return tmp_path


def _hold(kind: str, marks) -> subprocess.Popen:
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(marks)], env=os.environ.copy())
    deadline = time.time() + 60
    while not (marks / "entered").exists():
        assert proc.poll() is None and time.time() < deadline, "the holder did not enter the gate"
        time.sleep(0.01)
    return proc


def _leaving(marks) -> float:
    return float((marks / "leaving").read_text())


def test_work_waits_for_a_running_measurement(private_tmp):
    proc = _hold("measuring", private_tmp / "m")
    with measure_gate.working():
        started = time.time()
    proc.wait(timeout=60)
    assert started >= _leaving(private_tmp / "m")


def test_a_measurement_waits_for_running_work_and_for_another_measurement(private_tmp):
    proc = _hold("working", private_tmp / "w")
    with measure_gate.measuring():
        started = time.time()
    proc.wait(timeout=60)
    assert started >= _leaving(private_tmp / "w")
    proc = _hold("measuring", private_tmp / "m")
    with measure_gate.measuring():
        started = time.time()
    proc.wait(timeout=60)
    assert started >= _leaving(private_tmp / "m")


def test_work_runs_beside_other_work_and_the_gate_turns_off(private_tmp, monkeypatch):
    proc = _hold("working", private_tmp / "w")
    with measure_gate.working():  # shared: entered while the other step still runs
        assert not (private_tmp / "w" / "leaving").exists()
    proc.wait(timeout=60)
    monkeypatch.setenv(measure_gate.ENV, "0")
    proc = _hold("measuring", private_tmp / "m2")  # the holder inherits the setting: no lock anywhere
    with measure_gate.working():
        assert not (private_tmp / "m2" / "leaving").exists()
    proc.wait(timeout=60)


def test_nested_use_keeps_the_outer_lock(private_tmp):
    """Work inside work (an export that evaluates, say) must not release the outer lock when the inner one ends."""
    marks = private_tmp / "n"
    marks.mkdir()
    with measure_gate.working():
        with measure_gate.working():
            pass
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, "measuring", str(marks)], env=os.environ.copy())
        time.sleep(1.0)
        assert not (marks / "entered").exists()  # still held: the measurement waits
    holder.wait(timeout=60)
    assert (marks / "leaving").exists()
