"""Kill -9 of a running `factory search` once enough rows are committed: the resume tests' shared start."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest


def kill_search_midway(args: list[str], out: Path, committed: Callable[[Path], int], env: dict, cwd: Path,
                       at_least: int = 6, timeout_s: float = 180) -> None:
    """Start `python -m factory search ARGS --out OUT` in its own process group and SIGKILL the group (the search
    and its pool workers, like kill -9) as soon as `committed(out)` counts `at_least` rows; fail if the run ends
    first or nothing is committed in time."""
    proc = subprocess.Popen([sys.executable, "-m", "factory", "search", *args, "--out", str(out)], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            n = 0
            if (out / "search.db").exists():
                try:
                    n = committed(out)
                except sqlite3.OperationalError:  # the database is being created
                    pass
            if n >= at_least:
                return
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.05)
        pytest.fail(f"fewer than {at_least} rows committed within {timeout_s:.0f} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
