"""DIR/search.db: every finished evaluation, the population of every generation, the final retraining.

SQLite in WAL mode with synchronous=FULL: each evaluation is its own committed transaction the moment it
finishes, so a kill at any point (even kill -9, even a power cut) loses at most the evaluations still running.
A generation (its population, hypervolume and counters) is committed in one transaction after its survival, so
`last_generation()` is the last generation that is complete. Values are JSON text (floats round-trip exactly);
nothing is pickled.

Multi-fidelity runs store one row per (genome, rung): the rung's token budget gives it its own train_config_hash,
and the row records its `rung` index and `tokens`. A database from before these columns is migrated in place
(its rows are rung 0; `tokens` is left NULL there, readers fall back to the run's budget).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT NOT NULL,
    train_config_hash TEXT NOT NULL,
    generation INTEGER NOT NULL,          -- the generation that first evaluated it
    rung INTEGER NOT NULL DEFAULT 0,      -- successive-halving rung (0: the run's base budget)
    tokens INTEGER,                       -- training tokens of that rung (NULL in databases from before rungs)
    status TEXT NOT NULL,                 -- ok | diverged | oom | error | rejected
    reason TEXT NOT NULL DEFAULT '',
    origin TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL DEFAULT '',
    objectives TEXT NOT NULL,             -- JSON {objective: value}
    violation REAL NOT NULL,              -- constraint violation (0 = feasible)
    static TEXT NOT NULL,                 -- JSON static metrics
    measurements TEXT NOT NULL,           -- JSON {stage: measurements}
    genome TEXT NOT NULL,                 -- JSON genome
    seed INTEGER NOT NULL,
    wall_s REAL NOT NULL DEFAULT 0,
    timings TEXT NOT NULL DEFAULT '{}',   -- JSON {stage_s: seconds, ...}
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_hash ON evaluations (hash, train_config_hash);
CREATE TABLE IF NOT EXISTS offspring (
    generation INTEGER NOT NULL, idx INTEGER NOT NULL, hash TEXT NOT NULL, origin TEXT NOT NULL,
    parents TEXT NOT NULL, PRIMARY KEY (generation, idx));
CREATE TABLE IF NOT EXISTS population (
    generation INTEGER NOT NULL, slot INTEGER NOT NULL, hash TEXT NOT NULL, rank INTEGER NOT NULL,
    crowding REAL, PRIMARY KEY (generation, slot));
CREATE TABLE IF NOT EXISTS generations (
    generation INTEGER PRIMARY KEY, hypervolume REAL NOT NULL, evaluated INTEGER NOT NULL,
    reused INTEGER NOT NULL, failed INTEGER NOT NULL, rejected INTEGER NOT NULL, best TEXT NOT NULL,
    finished_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS final (
    id INTEGER PRIMARY KEY AUTOINCREMENT, hash TEXT NOT NULL, name TEXT NOT NULL, role TEXT NOT NULL,
    seed INTEGER NOT NULL, tokens INTEGER NOT NULL, train_config_hash TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT NOT NULL, val_bpb REAL, params INTEGER NOT NULL, cache_bytes INTEGER NOT NULL,
    genome TEXT NOT NULL, wall_s REAL NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS final_key ON final (hash, seed, train_config_hash);
"""

# Columns added after the first schema: (name, declaration) for ALTER TABLE on an older database.
_ADDED_COLUMNS = (("rung", "INTEGER NOT NULL DEFAULT 0"), ("tokens", "INTEGER"))
_JSON_COLUMNS = ("objectives", "static", "measurements", "genome", "timings", "parents", "best")


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=True)


def _row(cursor: sqlite3.Cursor, row: tuple) -> dict:
    out = {}
    for (name, *_), value in zip(cursor.description, row):
        out[name] = json.loads(value) if name in _JSON_COLUMNS and isinstance(value, str) else value
    return out


def _with_rung(rows: list[dict]) -> list[dict]:
    """Rows read through a read-only connection from a database that predates the rung columns: rung 0."""
    for r in rows:
        r.setdefault("rung", 0)
        r.setdefault("tokens", None)
    return rows


class Store:
    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(evaluations)")}
            for name, decl in _ADDED_COLUMNS:
                if name not in have:
                    self.db.execute(f"ALTER TABLE evaluations ADD COLUMN {name} {decl}")
            if (self.get_meta("schema_version") or 0) < SCHEMA_VERSION:
                self.set_meta("schema_version", SCHEMA_VERSION)
        self._refuse_old_genomes()
        self.db.row_factory = _row

    def _refuse_old_genomes(self) -> None:
        """A database whose genomes are of an older genome schema is refused in one line (FactoryError)."""
        from factory.errors import FactoryError
        from factory.genome.schema import MIGRATED, SCHEMA_CHANGES
        from factory.genome.schema import SCHEMA_VERSION as GENOME_VERSION

        found = set()
        for table in ("evaluations", "final"):
            try:
                found |= {v for (v,) in self.db.execute(
                    f"SELECT DISTINCT json_extract(genome, '$.schema_version') FROM {table}")}
            except sqlite3.Error:  # a read-only database without this table, or text that is not JSON
                continue
        old = sorted(v for v in found if isinstance(v, int) and v != GENOME_VERSION and v not in MIGRATED)
        if old:
            self.db.close()
            why = f" ({SCHEMA_CHANGES[old[0]]})" if old[0] in SCHEMA_CHANGES else ""
            raise FactoryError(f"{self.path}: its genomes are of schema version {old[0]}, which this version no "
                               f"longer reads{why}; re-run the search with this version")
        if any(v in MIGRATED for v in found) and not self.readonly:
            self._migrate_genomes()

    def _migrate_genomes(self) -> None:
        """Rewrite genomes of a migrated schema in today's form, and every hash with them (one transaction), so a
        resumed run finds its evaluations under the hashes its genomes now have."""
        from factory.genome.schema import Genome

        renamed: dict[str, str] = {}
        self.db.execute("BEGIN IMMEDIATE")
        for table in ("evaluations", "final"):
            for rowid, old_hash, text in self.db.execute(f"SELECT id, hash, genome FROM {table}").fetchall():
                genome = Genome.from_dict(json.loads(text))
                renamed[old_hash] = genome.hash()
                self.db.execute(f"UPDATE {table} SET genome = ?, hash = ? WHERE id = ?",
                                (_dumps(genome.to_dict()), renamed[old_hash], rowid))
        for table in ("offspring", "population"):
            for old_hash, new_hash in renamed.items():
                self.db.execute(f"UPDATE {table} SET hash = ? WHERE hash = ?", (new_hash, old_hash))
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- meta ---------------------------------------------------------------------------------------------------
    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        value = row["value"] if isinstance(row, dict) else row[0]
        return json.loads(value)

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, _dumps(value)))

    # -- evaluations ----------------------------------------------------------------------------------------------
    def find(self, genome_hash: str, train_config_hash: str) -> dict | None:
        row = self.db.execute(
            "SELECT * FROM evaluations WHERE hash = ? AND train_config_hash = ? ORDER BY id LIMIT 1",
            (genome_hash, train_config_hash),
        ).fetchone()
        return _with_rung([row])[0] if row is not None else None

    def find_highest(self, genome_hash: str, train_config_hashes: list[str]) -> dict | None:
        """A genome's row at the highest rung it reached among these train configs (the first stored on a tie)."""
        row = self.db.execute(
            f"SELECT * FROM evaluations WHERE hash = ? AND train_config_hash IN "
            f"({', '.join('?' for _ in train_config_hashes)}) ORDER BY rung DESC, id LIMIT 1",
            (genome_hash, *train_config_hashes),
        ).fetchone()
        return _with_rung([row])[0] if row is not None else None

    def add_evaluation(self, **row) -> None:
        """Commit one finished evaluation (autocommit: durable when this returns)."""
        row.setdefault("created_at", time.time())
        for key in _JSON_COLUMNS:
            if key in row and not isinstance(row[key], str):
                row[key] = _dumps(row[key])
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.db.execute(f"INSERT INTO evaluations ({cols}) VALUES ({marks})", tuple(row.values()))

    def evaluations(self, train_config_hash: str | list[str] | None = None) -> list[dict]:
        """Rows in commit order; of one train config hash, or of any of a list (e.g. every rung of a run)."""
        if train_config_hash is None:
            return _with_rung(self.db.execute("SELECT * FROM evaluations ORDER BY id").fetchall())
        hashes = [train_config_hash] if isinstance(train_config_hash, str) else list(train_config_hash)
        return _with_rung(self.db.execute(
            f"SELECT * FROM evaluations WHERE train_config_hash IN ({', '.join('?' for _ in hashes)}) ORDER BY id",
            hashes).fetchall())

    # -- generations ----------------------------------------------------------------------------------------------
    def save_offspring(self, generation: int, candidates) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM offspring WHERE generation = ?", (generation,))
            self.db.executemany(
                "INSERT INTO offspring (generation, idx, hash, origin, parents) VALUES (?, ?, ?, ?, ?)",
                [(generation, i, c.hash, c.origin, _dumps(list(c.parents))) for i, c in enumerate(candidates)],
            )

    def save_generation(self, generation: int, members, hypervolume: float, counters: dict, best: dict) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM population WHERE generation = ?", (generation,))
            self.db.executemany(
                "INSERT INTO population (generation, slot, hash, rank, crowding) VALUES (?, ?, ?, ?, ?)",
                [(generation, i, m.hash, m.rank, m.crowding if m.crowding != float("inf") else None)
                 for i, m in enumerate(members)],
            )
            self.db.execute(
                "INSERT OR REPLACE INTO generations (generation, hypervolume, evaluated, reused, failed, rejected, "
                "best, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (generation, hypervolume, counters.get("evaluated", 0), counters.get("reused", 0),
                 counters.get("failed", 0), counters.get("rejected", 0), _dumps(best), time.time()),
            )

    def last_generation(self) -> int | None:
        row = self.db.execute("SELECT MAX(generation) AS g FROM generations").fetchone()
        return row["g"] if row else None

    def population(self, generation: int) -> list[dict]:
        return self.db.execute(
            "SELECT * FROM population WHERE generation = ? ORDER BY slot", (generation,)
        ).fetchall()

    def generations(self) -> list[dict]:
        return self.db.execute("SELECT * FROM generations ORDER BY generation").fetchall()

    def offspring(self, generation: int | None = None) -> list[dict]:
        if generation is None:
            return self.db.execute("SELECT * FROM offspring ORDER BY generation, idx").fetchall()
        return self.db.execute("SELECT * FROM offspring WHERE generation = ? ORDER BY idx", (generation,)).fetchall()

    # -- final retraining -----------------------------------------------------------------------------------------
    def find_final(self, genome_hash: str, seed: int, train_config_hash: str) -> dict | None:
        return self.db.execute(
            "SELECT * FROM final WHERE hash = ? AND seed = ? AND train_config_hash = ? ORDER BY id LIMIT 1",
            (genome_hash, seed, train_config_hash),
        ).fetchone()

    def add_final(self, **row) -> None:
        row.setdefault("created_at", time.time())
        if not isinstance(row.get("genome"), str):
            row["genome"] = _dumps(row["genome"])
        cols = ", ".join(row)
        self.db.execute(f"INSERT INTO final ({cols}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values()))

    def finals(self, train_config_hash: str | None = None) -> list[dict]:
        if train_config_hash is None:
            return self.db.execute("SELECT * FROM final ORDER BY id").fetchall()
        return self.db.execute("SELECT * FROM final WHERE train_config_hash = ? ORDER BY id",
                               (train_config_hash,)).fetchall()

    # -- helpers --------------------------------------------------------------------------------------------------
    def transaction(self):
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, *_):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
