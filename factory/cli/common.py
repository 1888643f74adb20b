"""What every command shares: the one JSON emitter and the one error boundary."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from factory.errors import FactoryError

# Progress and tables go to stderr so that stdout carries only the --json object.
console = Console(stderr=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def emit_json(obj: dict) -> None:
    """Print exactly one JSON object on stdout (every command's --json goes through here)."""
    sys.stdout.write(json.dumps(_jsonable(obj), sort_keys=False) + "\n")
    sys.stdout.flush()


def fail(message: str) -> None:
    raise FactoryError(message)


def positive_int(value: int, name: str) -> int:
    if value is None or value <= 0:
        fail(f"{name} must be a positive integer, got {value}")
    return value
