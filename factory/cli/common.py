"""What every command shares: the one JSON emitter and the one error boundary."""

from __future__ import annotations

import json
import sys

from rich.console import Console

from factory.errors import FactoryError
from factory.io import clean_json

# Progress and tables go to stderr so that stdout carries only the --json object.
console = Console(stderr=True)


def emit_json(obj: dict) -> None:
    """Print exactly one JSON object on stdout (every command's --json goes through here)."""
    sys.stdout.write(json.dumps(clean_json(obj), sort_keys=False) + "\n")
    sys.stdout.flush()


def fail(message: str) -> None:
    raise FactoryError(message)


def positive_int(value: int, name: str) -> int:
    if value is None or value <= 0:
        fail(f"{name} must be a positive integer, got {value}")
    return value
