"""Live progress of a search on stderr: generation, evaluations done / total, failures, best per objective and
hypervolume. With a terminal it is a rich live bar; without one (logs, CI) one line per generation."""

from __future__ import annotations

import math


def _fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.4g}"


class Progress:
    """The interface the search loop reports to; this base class reports nothing."""

    def start(self, total: int, done: int = 0) -> None: ...

    def update(self, *, generation: int, done: int, failed: int, rejected: int, best: dict, hypervolume: float,
               note: str = "") -> None: ...

    def log(self, message: str) -> None: ...

    def stop(self) -> None: ...


class RichProgress(Progress):
    """Reports to a rich Console (the CLI's, on stderr)."""

    def __init__(self, console, generations: int = 0):
        self.console = console
        self.generations = generations
        self._bar = None
        self._task = None
        self._last_line = ""

    def start(self, total, done=0):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        if self.console.is_terminal:
            self._bar = Bar(TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"), console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task("", total=total, completed=done)

    def update(self, *, generation, done, failed, rejected, best, hypervolume, note=""):
        best_text = " ".join(f"{k}={_fmt(v)}" for k, v in best.items())
        line = (f"gen {generation + 1}/{self.generations} | evals {done} | failed {failed} | rejected {rejected} | "
                f"best {best_text or '-'} | HV {_fmt(hypervolume)}" + (f" | {note}" if note else ""))
        if self._bar is not None:
            self._bar.update(self._task, completed=done, description=line)
        self._last_line = line

    def log(self, message):
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            self.console.print(message, highlight=False, soft_wrap=True)

    def stop(self):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
