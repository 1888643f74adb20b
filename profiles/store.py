"""The measurement store: one JSON-lines file per target, appended by local profiling and by board imports.

Each line is one record:

    {"record_version": 1, "id": "...", "genome_hash": "...", "target": "raspberry-pi-5",
     "target_fingerprint": "...", "protocol_version": 2, "source": "local" | "board:<hostname>",
     "variant": "int8-dynamic", "recorded_at": "2026-...Z", "measurement": {... the profiler's dict ...}}

The latency model fits on `load_measurements(target, protocol_version=PROTOCOL_VERSION)`. Lines are appended under a lock with one write each, so a
crash can at worst leave a partial last line, which readers skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable

from factory.errors import FactoryError
from factory.io import atomic_write

RECORD_VERSION = 1
HOME_ENV = "FACTORY_HOME"

try:  # advisory lock on POSIX; elsewhere one write per record is the only guard
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def measurements_path(target_name: str) -> Path:
    """The store file of one target: $FACTORY_HOME/measurements/<target>.jsonl, by default under the user's cache
    ($XDG_CACHE_HOME or ~/.cache)/edge-model-factory. The one place that decides where measurements live."""
    if os.environ.get(HOME_ENV):
        home = Path(os.environ[HOME_ENV]).expanduser()
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
        home = cache / "edge-model-factory"
    return home / "measurements" / f"{target_name}.jsonl"


def genome_archive_path(genome_hash: str) -> Path:
    """Where the genome JSON of a measured model is kept, so a latency model can be fitted from the store alone
    (board results carry only the hash)."""
    return measurements_path("_").parent.parent / "genomes" / f"{genome_hash}.json"


def archive_genome(manifest: dict) -> None:
    """Keep the manifest's genome under its hash (idempotent; written atomically)."""
    genome_hash, genome = manifest.get("genome_hash"), manifest.get("genome")
    if not genome_hash or not isinstance(genome, dict):
        return
    path = genome_archive_path(genome_hash)
    if path.exists():
        return
    atomic_write(path, json.dumps(genome, indent=1))


def load_archived_genome(genome_hash: str) -> dict | None:
    path = genome_archive_path(genome_hash)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _target_name_and_fingerprint(target) -> tuple[str, str | None]:
    if isinstance(target, str):
        return target, None
    return target.name, target.fingerprint()


def make_record(target, measurement: dict, source: str = "local") -> dict:
    name, fingerprint = _target_name_and_fingerprint(target)
    genome_hash = measurement.get("genome_hash")
    if not isinstance(genome_hash, str) or not genome_hash:
        raise FactoryError("measurement has no genome_hash: the export's manifest must carry one")
    if source != "local" and not source.startswith("board:"):
        raise FactoryError(f"source must be 'local' or 'board:<hostname>', got {source!r}")
    body = json.dumps(measurement, sort_keys=True, default=str)
    # Same measurement from the same source for the same target = same id, so importing a file twice is harmless.
    record_id = hashlib.sha256(f"{name}\n{source}\n{body}".encode()).hexdigest()[:24]
    return {
        "record_version": RECORD_VERSION,
        "id": record_id,
        "genome_hash": genome_hash,
        "target": name,
        "target_fingerprint": fingerprint,
        "protocol_version": measurement.get("protocol_version"),
        "source": source,
        "variant": measurement.get("variant"),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "measurement": measurement,
    }


def append_records(target_name: str, records: Iterable[dict], skip_known_ids: bool = True,
                   path: Path | None = None) -> tuple[int, int]:
    """Append records to the target's store (or to the store file `path`: a search run keeps its own); returns
    (written, skipped as already present)."""
    path = path or measurements_path(target_name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+", encoding="utf-8") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            f.seek(0)
            existing = f.read()
            known = {r["id"] for r in _parse_lines(existing)} if skip_known_ids else set()
            lines = []
            skipped = 0
            for record in records:
                if record["id"] in known:
                    skipped += 1
                    continue
                known.add(record["id"])
                lines.append(json.dumps(record, sort_keys=False) + "\n")
            if lines:
                # A partial last line (a crash mid-write) must not swallow the next record.
                prefix = "\n" if existing and not existing.endswith("\n") else ""
                f.write(prefix + "".join(lines))
                f.flush()
                os.fsync(f.fileno())
            return len(lines), skipped
    except OSError as e:
        raise FactoryError(f"cannot write the measurement store {path}: {e.strerror or e}") from None


def record_measurement(target, measurement: dict, source: str = "local", path: Path | None = None) -> dict:
    """Store one measurement (a `profile_artifact` result) for `target` (a Target or a name) in its store (or in the
    store file `path`); returns the record."""
    record = make_record(target, measurement, source)
    append_records(record["target"], [record], skip_known_ids=False, path=path)
    return record


def _parse_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a partial line left by a crash
        if isinstance(record, dict) and "id" in record and "measurement" in record:
            records.append(record)
    return records


def load_measurements(target, protocol_version: int | None = None, genome_hash: str | None = None,
                      path: Path | None = None) -> list[dict]:
    """Every stored record of `target` (a Target or a name), oldest first, optionally filtered; from the store file
    `path` when given."""
    name, _ = _target_name_and_fingerprint(target)
    path = path or measurements_path(name)
    if not path.is_file():
        return []
    try:
        records = _parse_lines(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FactoryError(f"cannot read the measurement store {path}: {e.strerror or e}") from None
    return [
        r
        for r in records
        if (protocol_version is None or r.get("protocol_version") == protocol_version)
        and (genome_hash is None or r.get("genome_hash") == genome_hash)
    ]
