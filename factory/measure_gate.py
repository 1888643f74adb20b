"""A machine-wide gate that keeps heavy work off the cores while a latency measurement runs.

A search trains and exports candidates in several worker processes while others measure exported candidates with
onnxruntime. Measured beside that work, latency comes out slower by a random amount
(`bench/research/bench_gate.py` measures how much), and the search would rank candidates by noise. So a
measurement runs inside `measuring()` (the search's profile stage, `factory profile`, a run's re-measurement
of its winners), and heavy work (each training step, each export of the search) inside `working()`: while a
measurement holds the gate, new work waits; the measurement waits only for the work already running.
Measurements also exclude each other.

Two lock files in the temp folder, taken with flock: a turnstile, which a measurement holds exclusively from
before it waits until it is done (work passes through it shared, so new work queues behind a waiting
measurement), and the gate itself, held shared by work and exclusively by a measurement. The locks are per
machine (Ray workers on other nodes are not held up) and a process that dies releases its locks. Set
FACTORY_MEASURE_GATE=0 to turn the gate off; without POSIX flock (Windows) there is none.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

ENV = "FACTORY_MEASURE_GATE"
_fds: dict[tuple[int, int, Path], int] = {}
_held = threading.local()  # whether this thread is inside the gate already (nested use takes no second lock)


def enabled() -> bool:
    return fcntl is not None and os.environ.get(ENV, "1") != "0"


def lock_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"factory-measure-gate-{uid}"


def _fd(name: str) -> int:
    # flock belongs to an open file description: one per process and thread, so neither a forked child nor a
    # second thread shares (and silently converts) another's lock
    path = lock_dir() / name
    key = (os.getpid(), threading.get_ident(), path)
    if key not in _fds:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        _fds[key] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return _fds[key]


def _outermost() -> bool:
    return not getattr(_held, "inside", False)


@contextlib.contextmanager
def _inside():
    _held.inside = True
    try:
        yield
    finally:
        _held.inside = False


@contextlib.contextmanager
def working():
    """Around one unit of heavy work (a training step, an export): waits while a measurement runs."""
    if not enabled() or not _outermost():
        yield
        return
    turnstile, gate = _fd("turnstile"), _fd("gate")
    fcntl.flock(turnstile, fcntl.LOCK_SH)  # blocks while a measurement is waiting or running
    fcntl.flock(turnstile, fcntl.LOCK_UN)
    fcntl.flock(gate, fcntl.LOCK_SH)
    try:
        with _inside():
            yield
    finally:
        fcntl.flock(gate, fcntl.LOCK_UN)


@contextlib.contextmanager
def measuring():
    """Around a latency measurement: no new work starts, running work finishes first, other measurements wait."""
    if not enabled() or not _outermost():
        yield
        return
    turnstile, gate = _fd("turnstile"), _fd("gate")
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            with _inside():
                yield
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
    finally:
        fcntl.flock(turnstile, fcntl.LOCK_UN)
