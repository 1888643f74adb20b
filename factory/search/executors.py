"""Where evaluations run: in-process, a local process pool (default) or Ray.

Every executor runs the same worker function on the same JSON-able requests with the same torch thread count
(`threads_per_worker`), so results do not depend on the executor. `map()` hands each result to `on_result` as soon
as it finishes (the caller commits it to the database right away) and returns the results in *submission* order,
which is the order the algorithm consumes them: completion order never changes the trajectory.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from factory.errors import FactoryError

OnResult = Callable[[int, dict], None]


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // max(1, workers))


def _die_with_parent() -> None:
    """Pool worker initializer: on Linux, ask the kernel to kill this worker when the search process dies (even
    by kill -9), so no orphan keeps training after its run is gone."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the call above
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _call(evaluator: str, request: dict) -> dict:
    from factory.search.evaluate import resolve

    return resolve(evaluator)(request)


def _crash_result(request: dict, reason: str) -> dict:
    return {"hash": request["hash"], "status": "error", "reason": reason, "measurements": {}, "timings": {},
            "wall_s": 0.0}


class Executor:
    name = "base"

    def __init__(self, evaluator: str, workers: int):
        self.evaluator = evaluator
        self.workers = workers
        self.threads = threads_per_worker(workers)

    def map(self, requests: list[dict], on_result: OnResult) -> list[dict]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InlineExecutor(Executor):
    """In this process, one at a time (no isolation: for debugging and tests)."""

    name = "inline"

    def map(self, requests, on_result):
        results = []
        for i, request in enumerate(requests):
            result = _call(self.evaluator, {**request, "threads": self.threads})
            on_result(i, result)
            results.append(result)
        return results


class ProcessPoolExecutor(Executor):
    """A pool of spawned processes (spawn, not fork: forking a parent that already runs torch threads can hang).

    A worker that dies (killed by the OOM killer, a crash in native code) breaks the pool; the pool is rebuilt
    and the unfinished candidates run again; one that was running during two such deaths is recorded as an
    error instead of being retried forever."""

    name = "local"

    def __init__(self, evaluator: str, workers: int):
        super().__init__(evaluator, workers)
        self._pool = None

    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor as Pool

        return Pool(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_die_with_parent)

    def map(self, requests, on_result):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        results: list[dict | None] = [None] * len(requests)
        crashes = [0] * len(requests)
        queue = list(range(len(requests)))
        in_flight: dict = {}
        dead_pools = 0  # pools that died in a row without returning anything: workers cannot even start
        # At most `workers` in flight, so that a dead worker is blamed only on what was running.
        while queue or in_flight:
            if dead_pools >= 3:
                raise FactoryError("evaluation worker processes keep dying before returning any result "
                                   "(3 pools in a row); see the messages above")
            if self._pool is None:
                self._pool = self._new_pool()
            while queue and len(in_flight) < self.workers:
                i = queue.pop(0)
                in_flight[self._pool.submit(_call, self.evaluator, {**requests[i], "threads": self.threads})] = i
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            broken = False
            for fut in sorted(done, key=lambda f: in_flight[f]):
                i = in_flight.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    broken = True
                    crashes[i] += 1
                    if crashes[i] < 2:
                        queue.insert(0, i)
                        continue
                    result = _crash_result(requests[i], "worker process died while evaluating it")
                except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be sent back
                    first = str(e).splitlines()[0] if str(e) else ""
                    result = _crash_result(requests[i], f"{type(e).__name__}: {first}".rstrip(": "))
                results[i] = result
                on_result(i, result)
                if result.get("pid") is not None:
                    dead_pools = 0  # a worker did come back with a result
            if broken:
                dead_pools += 1
                for fut, i in sorted(in_flight.items(), key=lambda t: -t[1]):
                    queue.insert(0, i)  # still running in the dead pool: run again
                in_flight.clear()
                queue.sort()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        return results  # type: ignore[return-value]

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Ray tasks, at most `workers` in flight. Without an address a local Ray instance is started (and stopped
    on close); with one, the cluster must have this package importable on its workers."""

    name = "ray"

    def __init__(self, evaluator: str, workers: int, address: str | None = None):
        super().__init__(evaluator, workers)
        try:
            import ray
        except ImportError:
            raise FactoryError("--executor ray needs Ray: pip install 'ray>=2.9' (or use --executor local)") from None
        self.ray = ray
        self._started_here = False
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                          configure_logging=True)
            if address:
                ray.init(address=address, **kwargs)
            else:
                # Workers must import the same code as this process (an editable install or a source checkout).
                path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
                ray.init(num_cpus=available_cores(), runtime_env={"env_vars": {"PYTHONPATH": path}}, **kwargs)
            self._started_here = True
        self._task = ray.remote(num_cpus=1, max_retries=1)(_call)

    def map(self, requests, on_result):
        ray = self.ray
        results: list[dict | None] = [None] * len(requests)
        queue = list(range(len(requests)))
        in_flight: dict = {}
        while queue or in_flight:
            while queue and len(in_flight) < self.workers:
                i = queue.pop(0)
                in_flight[self._task.remote(self.evaluator, {**requests[i], "threads": self.threads})] = i
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                i = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a task or worker failure is one failed candidate
                    result = _crash_result(requests[i], f"ray: {type(e).__name__}")
                results[i] = result
                on_result(i, result)
        return results  # type: ignore[return-value]

    def close(self):
        if self._started_here:
            self.ray.shutdown()
            self._started_here = False


def make_executor(kind: str, evaluator: str, workers: int, ray_address: str | None = None) -> Executor:
    if kind == "local":
        return ProcessPoolExecutor(evaluator, workers)
    if kind == "ray":
        return RayExecutor(evaluator, workers, ray_address)
    if kind == "inline":
        return InlineExecutor(evaluator, workers)
    raise FactoryError(f"--executor must be local or ray, got {kind!r}")
