"""The files every part of the factory writes: one JSON cleaner, one atomic write, one out-folder check.

Standard library only (profiles/ and export/ use it without torch). `profiles/runner.py` keeps its own copies:
it is a single file copied to boards and must not import this package.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from factory.errors import FactoryError


def clean_json(value: Any) -> Any:
    """JSON for files and stdout: non-finite floats become null (JSON has no NaN or infinity), keys become strings,
    tuples lists, paths strings, numpy / torch scalars Python numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0 and not isinstance(value, (str, bytes)):
        return clean_json(value.item())
    return value


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, data: str | bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder and os.replace: readers see the old file or
    the new one, never a part. The file gets the user's usual mode (mkstemp's are private); on any failure the
    temp file is removed. The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if isinstance(data, str):
            f = os.fdopen(fd, "w", encoding="utf-8", newline="")
        else:
            f = os.fdopen(fd, "wb")
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_json(path: Path | str, data: Any, indent: int | None = 2) -> Path:
    """`atomic_write` of `clean_json(data)` (strict JSON: no NaN; other objects as their str), final newline."""
    return atomic_write(path, json.dumps(clean_json(data), indent=indent, allow_nan=False, default=str) + "\n")


def check_out_folder(out: Path | str, kind: str, markers: tuple[str, ...] = (), *, ours: str = "refuse",
                     others: str = "refuse", resume: str | None = None) -> Path:
    """The one check of an --out folder before anything is written there; returns it as a Path.

    The folder may be new or empty. One that holds any of `markers` is "ours" (a previous `kind`, named with its
    article: "an export"): `ours` says what then: "refuse" (with `resume`, the command that continues it, in the
    message) or "replace" (the caller replaces it at the end). A non-empty folder that is not ours: `others` = "refuse" or "allow" (the search
    inside `factory run`, whose folder already holds job.json). A file is always refused. The folder (or, with
    ours="replace", its parent) is created and must be writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FactoryError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        mine = any((out / m).exists() for m in markers)
        if mine and ours == "refuse":
            hint = f"; continue it with {resume}" if resume else ""
            raise FactoryError(f"--out {out} already holds {kind}{hint}")
        if not mine and others == "refuse" and any(out.iterdir()):
            no = f" (no {' or '.join(markers)})" if markers else ""
            raise FactoryError(f"--out {out} is a non-empty folder that is not {kind}{no}; refusing to overwrite it")
    folder = out if ours != "replace" else (out.parent if out.parent != Path("") else Path("."))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FactoryError(f"--out {out}: cannot create {folder} ({e.strerror or e})") from None
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FactoryError(f"--out {out}: {folder} is not writable ({e.strerror or e})") from None
    return out
