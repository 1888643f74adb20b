"""What a run leaves for its user, all derived from the database: pareto.json, evaluations.csv, hypervolume.csv
(plus the plots and motifs, see `plots` and `analysis`). Files are written atomically (temp file + rename)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from factory.io import atomic_write, clean_json
from factory.search.algorithm import non_dominated
from factory.search.config import SearchConfig
from factory.search.store import Store

FAILED_STATUSES = ("diverged", "oom", "error")


def families_of(genome: dict) -> list[str]:
    classes = genome["classes"]
    return [classes[layer["op_class"]]["family"] for layer in genome["layers"]]


def feasible_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and r["violation"] <= 0]


def reached_rows(rows: list[dict]) -> list[dict]:
    """One row per genome: its result at the highest rung it reached (the first stored on a tie), in commit order.
    Without successive halving every genome has one row and this is `rows`."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["hash"] not in best or r["rung"] > best[r["hash"]]["rung"]:
            best[r["hash"]] = r
    chosen = {id(r) for r in best.values()}
    return [r for r in rows if id(r) in chosen]


def comparable_rows(rows: list[dict]) -> list[dict]:
    """The feasible results the front, the best values and the hypervolume are formed from: each genome at the
    highest rung it reached, kept only if that is the highest rung any feasible genome reached. Scores at different
    token budgets are not on one scale (bpb falls with training), so they are never compared with each other; the
    genomes that lost a promotion rank behind the ones that won it (see `algorithm`, survival by rung)."""
    ok = feasible_rows(reached_rows(rows))
    top = max((r["rung"] for r in ok), default=0)
    return [r for r in ok if r["rung"] == top]


def rows_of_run(store: Store, config: SearchConfig) -> list[dict]:
    """Every evaluation of this run, all rungs, in commit order."""
    return store.evaluations(config.rung_hashes())


def row_tokens(row: dict, config: SearchConfig) -> int:
    """Training tokens behind a row (rows from before the rung columns did not record them: the rung's budget)."""
    return row["tokens"] if row.get("tokens") is not None else config.rung_budgets()[row["rung"]]


def front_rows(rows: list[dict], objectives: list[str]) -> list[dict]:
    """The non-dominated comparable evaluations (the run's archive front), best first on the first objective."""
    ok = comparable_rows(rows)
    if not ok:
        return []
    F = np.array([[r["objectives"][o] for o in objectives] for r in ok], dtype=float)
    front = [ok[i] for i in non_dominated(F)]
    return sorted(front, key=lambda r: ([r["objectives"][o] for o in objectives], r["hash"]))


def member_summary(row: dict, objectives: list[str], with_genome: bool = True, tokens: int | None = None) -> dict:
    static = row["static"]
    out = {
        "hash": row["hash"],
        "name": row["name"],
        "origin": row["origin"],
        "generation": row["generation"],
        "rung": row["rung"],  # the objectives and val_bpb below are this rung's
        "tokens": tokens if tokens is not None else row.get("tokens"),
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
    rows = rows_of_run(store, config)
    gens = store.generations()
    objectives = list(config.objectives)
    last = gens[-1] if gens else None
    fidelity = {}
    if config.fidelity:
        fidelity = {"fidelity": {"eta": config.eta, "rungs": [
            {"rung": k, "tokens": t, "evaluated": sum(1 for r in rows if r["rung"] == k and r["status"] != "rejected")}
            for k, t in enumerate(config.rung_budgets())]}}
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
        **fidelity,
        "front": [member_summary(r, objectives, with_genomes, row_tokens(r, config))
                  for r in front_rows(rows, objectives)],
    }


def write_pareto(out: Path, store: Store, config: SearchConfig) -> dict:
    data = summary(store, config, with_genomes=True)
    data = {
        "format": "factory-search-pareto-1",
        "run": {"seed": config.seed, "train_config_hash": config.train_config_hash(),
                "metrics_context": config.context_for_metrics, "dtype": config.dtype,
                "budgets": config.budgets.to_dict(),
                "target": None if config.target is None else config.target.name,
                **({"rung_tokens": config.rung_budgets(), "rung_train_config_hashes": config.rung_hashes(),
                    "eta": config.eta} if config.fidelity else {})},
        **data,
        "hypervolume_by_generation": [
            {"generation": g["generation"], "hypervolume": g["hypervolume"]} for g in store.generations()
        ],
    }
    atomic_write(out / "pareto.json", json.dumps(clean_json(data), indent=2) + "\n")
    return data


def write_evaluations_csv(out: Path, store: Store, config: SearchConfig) -> None:
    objectives = list(config.objectives)
    cols = ["id", "hash", "name", "origin", "generation", "rung", "tokens", "status", "reason",
            *[f"obj_{o}" for o in objectives],
            "params", "cache_bytes", "flops_decode_per_token", "peak_memory_bytes", "val_bpb", "violation",
            "layers", "seed", "train_config_hash", "wall_s"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows_of_run(store, config):
        s = r["static"]
        w.writerow([
            r["id"], r["hash"], r["name"], r["origin"], r["generation"], r["rung"], row_tokens(r, config),
            r["status"], r["reason"],
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
