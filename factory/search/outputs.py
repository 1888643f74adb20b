"""What a run leaves for its user, all derived from the database: pareto.json, evaluations.csv, hypervolume.csv
(plus the plots and motifs, see `plots` and `analysis`). Files are written atomically (temp file + rename)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from factory.search.algorithm import non_dominated
from factory.search.config import SearchConfig
from factory.search.store import Store

FAILED_STATUSES = ("diverged", "oom", "error")


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; users expect their usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean(value):
    """JSON for users: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return clean(value.item())
    return value


def families_of(genome: dict) -> list[str]:
    classes = genome["classes"]
    return [classes[layer["op_class"]]["family"] for layer in genome["layers"]]


def feasible_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and r["violation"] <= 0]


def front_rows(rows: list[dict], objectives: list[str]) -> list[dict]:
    """The non-dominated feasible evaluations (the run's archive front), best first on the first objective."""
    ok = feasible_rows(rows)
    if not ok:
        return []
    F = np.array([[r["objectives"][o] for o in objectives] for r in ok], dtype=float)
    front = [ok[i] for i in non_dominated(F)]
    return sorted(front, key=lambda r: ([r["objectives"][o] for o in objectives], r["hash"]))


def member_summary(row: dict, objectives: list[str], with_genome: bool = True) -> dict:
    static = row["static"]
    out = {
        "hash": row["hash"],
        "name": row["name"],
        "origin": row["origin"],
        "generation": row["generation"],
        "objectives": {o: row["objectives"].get(o) for o in objectives},
        "params": static["params"],
        "cache_bytes": static["cache_bytes"],
        "flops_decode_per_token": static["flops_decode_per_token"],
        "peak_memory_bytes": static["peak_memory_bytes"],
        "val_bpb": row["measurements"].get("train", {}).get("val_bpb"),
        "layers": families_of(row["genome"]),
    }
    if "mad" in row["measurements"]:
        out["mad_mean"] = row["measurements"]["mad"].get("mean")
    if with_genome:
        out["genome"] = row["genome"]
    return out


def summary(store: Store, config: SearchConfig, with_genomes: bool = False) -> dict:
    """What `factory search status` reports (and what a finished run returns)."""
    tch = config.train_config_hash()
    rows = store.evaluations(tch)
    gens = store.generations()
    objectives = list(config.objectives)
    last = gens[-1] if gens else None
    return {
        "evaluated": sum(1 for r in rows if r["status"] != "rejected"),
        "failed": sum(1 for r in rows if r["status"] in FAILED_STATUSES),
        "rejected": sum(1 for r in rows if r["status"] == "rejected"),
        "generation": last["generation"] if last else None,
        "generations": config.generations,
        "complete": bool(store.get_meta("complete", False)) and last is not None
        and last["generation"] >= config.generations - 1,
        "hypervolume": last["hypervolume"] if last else None,
        "objectives": objectives,
        "front": [member_summary(r, objectives, with_genomes) for r in front_rows(rows, objectives)],
    }


def write_pareto(out: Path, store: Store, config: SearchConfig) -> dict:
    data = summary(store, config, with_genomes=True)
    data = {
        "format": "factory-search-pareto-1",
        "run": {"seed": config.seed, "train_config_hash": config.train_config_hash(),
                "metrics_context": config.context_for_metrics, "dtype": config.dtype,
                "budgets": config.budgets.to_dict(), "target": config.target},
        **data,
        "hypervolume_by_generation": [
            {"generation": g["generation"], "hypervolume": g["hypervolume"]} for g in store.generations()
        ],
    }
    atomic_write(out / "pareto.json", json.dumps(clean(data), indent=2) + "\n")
    return data


def write_evaluations_csv(out: Path, store: Store, config: SearchConfig) -> None:
    objectives = list(config.objectives)
    cols = ["id", "hash", "name", "origin", "generation", "status", "reason", *[f"obj_{o}" for o in objectives],
            "params", "cache_bytes", "flops_decode_per_token", "peak_memory_bytes", "val_bpb", "violation",
            "layers", "seed", "train_config_hash", "wall_s"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in store.evaluations(config.train_config_hash()):
        s = r["static"]
        w.writerow([
            r["id"], r["hash"], r["name"], r["origin"], r["generation"], r["status"], r["reason"],
            *[_num(r["objectives"].get(o)) for o in objectives],
            s["params"], s["cache_bytes"], s["flops_decode_per_token"], s["peak_memory_bytes"],
            _num(r["measurements"].get("train", {}).get("val_bpb")), r["violation"],
            "-".join(families_of(r["genome"])), r["seed"], r["train_config_hash"], r["wall_s"],
        ])
    atomic_write(out / "evaluations.csv", buf.getvalue())


def write_hypervolume_csv(out: Path, store: Store) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["generation", "hypervolume", "evaluated", "reused", "failed", "rejected"])
    for g in store.generations():
        w.writerow([g["generation"], g["hypervolume"], g["evaluated"], g["reused"], g["failed"], g["rejected"]])
    atomic_write(out / "hypervolume.csv", buf.getvalue())


def _num(value):
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value
