"""Silence chatty libraries (torch's exporter, optimum, the quantizer) so stdout stays free for --json."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet(logger_names: tuple[str, ...], level: int, include_root: bool = False):
    """Raise the named loggers (and optionally the root logger) to `level`, drop warnings and stdout; restore."""
    loggers = [logging.getLogger(n) for n in logger_names]
    if include_root:
        loggers.append(logging.getLogger())
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)
