"""Architecture search end to end, with real (tiny) training: kill -9 and resume, determinism, Ray vs process pool,
a diverging candidate, budgets, dedup, pareto.json against the database, `status --json`.

Every run: 3 layers of width 32, context 64, families glu and short_conv (the operators known to be finished),
1,024 training tokens per candidate, population 4, 3 generations.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from factory.search.config import Budgets, SearchConfig
from factory.search.run import start_search
from search_kill import kill_search_midway
from verdicts import check_final

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_layers=3, d_model=32, context=64, families=("glu", "short_conv"), population=4, generations=3,
            tokens=1024, seq_len=32, batch_size=8)
TINY_CLI = ["--layers", "3", "--d-model", "32", "--context", "64", "--families", "glu,short_conv", "--population", "4",
            "--generations", "3", "--tokens", "1024", "--seq-len", "32", "--batch-size", "8"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# -- evaluator hooks (run in-process by the inline executor) ----------------------------------------------------
EVALUATED: list[str] = []


def counting_evaluator(request: dict) -> dict:
    """The real evaluator, recording which genomes reached it."""
    from factory.search.evaluate import evaluate_request

    EVALUATED.append(request["hash"])
    return evaluate_request(request)


def diverging_evaluator(request: dict) -> dict:
    """The real evaluator, with a learning rate of 1e6 for about half the genomes (by hash): they really diverge."""
    from factory.search.evaluate import evaluate_request

    EVALUATED.append(request["hash"])
    if int(request["hash"], 16) % 2 == 0:
        settings = request["settings"]
        request = {**request, "settings": {**settings, "train": {**settings["train"], "lr": 1e6}}}
    return evaluate_request(request)


# -- helpers -----------------------------------------------------------------------------------------------------
def db_rows(run: Path) -> dict:
    db = sqlite3.connect(run / "search.db")
    db.row_factory = sqlite3.Row
    out = {r["hash"]: dict(r) for r in db.execute("SELECT * FROM evaluations")}
    db.close()
    return out


def comparable(run: Path) -> dict:
    """Database contents without timings, row ids or wall-clock stamps."""
    db = sqlite3.connect(run / "search.db")
    evals = sorted(db.execute("SELECT hash, train_config_hash, generation, status, reason, origin, name, objectives, "
                              "violation, static, measurements, genome, seed FROM evaluations").fetchall())
    population = db.execute("SELECT generation, slot, hash, rank, crowding FROM population ORDER BY generation, slot").fetchall()
    offspring = db.execute("SELECT generation, idx, hash, origin, parents FROM offspring ORDER BY generation, idx").fetchall()
    generations = db.execute("SELECT generation, hypervolume, evaluated, reused, failed, rejected, best FROM generations "
                             "ORDER BY generation").fetchall()
    db.close()
    return {"evaluations": evals, "population": population, "offspring": offspring, "generations": generations}


def cli(*args, check=True, timeout=300):
    """`factory ...` in a fresh process (what a user runs)."""
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"factory {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stderr[-2000:]}")
    return proc


def cli_here(capsys, *args) -> tuple[int, str, str]:
    """`factory ...` in this process (cheaper, for read-only commands)."""
    from factory.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return e.value.code or 0, cap.out, cap.err


def status_of(capsys, run: Path) -> dict:
    code, out, err = cli_here(capsys, "search", "status", run, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted run through the default executor (a process pool, one worker per core)."""
    out = tmp_path_factory.mktemp("search") / "reference"
    result = start_search(SearchConfig(**TINY), out)
    assert result["complete"]
    return out


# -- tests -----------------------------------------------------------------------------------------------------
def test_killed_run_resumes_without_losing_or_repeating_evaluations(tmp_path, reference_run, capsys):
    out = tmp_path / "killed"
    kill_search_midway(TINY_CLI, out, lambda o: len(db_rows(o)), env=ENV, cwd=REPO)  # after some evaluations
    before = db_rows(out)
    assert len(before) >= 6

    status = status_of(capsys, out)
    assert status["complete"] is False and status["evaluated"] == len(before)

    cli("search", "--resume", out, "--json")
    after = db_rows(out)
    for h, row in before.items():  # nothing lost, nothing re-evaluated: the same committed rows
        assert after[h] == row
    db = sqlite3.connect(out / "search.db")
    assert db.execute("SELECT COUNT(*) FROM (SELECT hash FROM evaluations GROUP BY hash HAVING COUNT(*) > 1)").fetchone()[0] == 0
    # and the resumed trajectory is the uninterrupted one
    assert comparable(out) == comparable(reference_run)


def test_same_seed_gives_the_same_database(tmp_path, reference_run, capsys):
    # In-process this time (the reference used a process pool): the executor must not matter either.
    result = start_search(SearchConfig(**TINY, executor="inline"), tmp_path / "again")
    assert comparable(tmp_path / "again") == comparable(reference_run)
    assert result["front"] == status_of(capsys, reference_run)["front"]


def test_ray_executor_gives_the_same_results_as_the_process_pool(tmp_path, reference_run, capsys):
    pytest.importorskip("ray", reason="ray is not installed (pip install -c constraints.txt ray)")
    result = start_search(SearchConfig(**TINY, executor="ray"), tmp_path / "ray")
    assert comparable(tmp_path / "ray") == comparable(reference_run)
    assert result["front"] == status_of(capsys, reference_run)["front"]


def test_a_diverging_candidate_is_recorded_and_the_search_goes_on(tmp_path):
    EVALUATED.clear()
    config = SearchConfig(**{**TINY, "generations": 2}, executor="inline", evaluator="test_search:diverging_evaluator")
    result = start_search(config, tmp_path / "div")
    rows = db_rows(tmp_path / "div")
    diverged = [r for r in rows.values() if r["status"] == "diverged"]
    assert diverged, "the injected learning rate should make some candidates diverge"
    assert all("non-finite" in r["reason"] and r["violation"] >= 1.0 for r in diverged)
    assert result["complete"] and result["generation"] == 1
    assert result["failed"] == len(diverged)
    assert not {m["hash"] for m in result["front"]} & {r["hash"] for r in diverged}
    assert sorted(EVALUATED) == sorted(h for h, r in rows.items() if r["status"] != "rejected")  # each once


def test_over_budget_genomes_are_never_trained(tmp_path):
    EVALUATED.clear()
    budgets = Budgets(max_params=16_000, max_cache_bytes=768)
    config = SearchConfig(**{**TINY, "generations": 2}, budgets=budgets, executor="inline",
                          evaluator="test_search:counting_evaluator")
    start_search(config, tmp_path / "budget")
    rows = db_rows(tmp_path / "budget")
    assert EVALUATED and len(EVALUATED) == len(set(EVALUATED))  # dedup: never the same genome twice
    for h in EVALUATED:
        static = json.loads(rows[h]["static"])
        assert static["params"] <= 16_000 and static["cache_bytes"] <= 768
    rejected = [r for r in rows.values() if r["status"] == "rejected"]
    for r in rejected:
        assert r["hash"] not in EVALUATED and json.loads(r["measurements"]) == {} and "over budget" in r["reason"]
    # budget-repaired or rejected: something had to be done about over-budget proposals here
    assert rejected or any("budget-repaired" in r["origin"] for r in rows.values())


def test_pareto_json_matches_the_database(reference_run):
    pareto = json.loads((reference_run / "pareto.json").read_text())
    rows = [r for r in db_rows(reference_run).values() if r["status"] == "ok" and r["violation"] == 0]
    F = {r["hash"]: [json.loads(r["objectives"])[o] for o in pareto["objectives"]] for r in rows}

    def dominated(h):
        return any(all(a <= b for a, b in zip(F[o], F[h])) and F[o] != F[h] for o in F)

    assert {m["hash"] for m in pareto["front"]} == {h for h in F if not dominated(h)}
    by_hash = {r["hash"]: r for r in rows}
    for m in pareto["front"]:
        r = by_hash[m["hash"]]
        static = json.loads(r["static"])
        assert m["params"] == static["params"] and m["cache_bytes"] == static["cache_bytes"]
        assert m["val_bpb"] == json.loads(r["measurements"])["train"]["val_bpb"]
        assert m["objectives"] == {o: v for o, v in zip(pareto["objectives"], F[m["hash"]])}
        assert m["genome"] == json.loads(r["genome"])
    db = sqlite3.connect(reference_run / "search.db")
    hv = [g for (g,) in db.execute("SELECT hypervolume FROM generations ORDER BY generation")]
    assert [g["hypervolume"] for g in pareto["hypervolume_by_generation"]] == hv
    assert hv == sorted(hv)  # hypervolume of the archive never decreases
    for name in ("evaluations.csv", "hypervolume.csv", "motifs.json", "pareto_quality_cache.png",
                 "pareto_quality_params.png", "run.json"):
        assert (reference_run / name).stat().st_size > 0
    motifs = json.loads((reference_run / "motifs.json").read_text())
    assert motifs["front"]["genomes"] == len(pareto["front"])
    assert abs(sum(motifs["all_evaluated"]["family_layer_share"].values()) - 1) < 1e-3
    lines = (reference_run / "evaluations.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + len(db_rows(reference_run))


def test_status_json_has_the_documented_keys(reference_run, capsys):
    code, out, _ = cli_here(capsys, "search", "status", reference_run, "--json")
    data = json.loads(out)
    assert code == 0 and out.count("\n") == 1
    for key in ("evaluated", "failed", "generation", "hypervolume", "front"):
        assert key in data
    assert data["generation"] == TINY["generations"] - 1 and data["complete"] is True
    assert data["evaluated"] == len(db_rows(reference_run)) and data["failed"] == 0
    for m in data["front"]:
        assert {"hash", "params", "cache_bytes", "val_bpb"} <= set(m)
    assert np.isfinite(data["hypervolume"])
    code, out, err = cli_here(capsys, "search", "motifs", reference_run)
    assert code == 0 and "LIV classes" in out + err


def test_finalize_retrains_front_and_baselines_with_two_seeds(reference_run, capsys):
    ckpts = reference_run / "checkpoints"
    code, out, err = cli_here(capsys, "search", "finalize", reference_run, "--top-k", "1", "--multiplier", "1",
                              "--seeds", "2", "--executor", "inline", "--checkpoints", ckpts, "--json")
    assert code == 0, err
    data = json.loads(out)
    for m in data["models"]:  # every successful retraining left a checkpoint for export
        saved = [p for p in ckpts.glob(f"{m['hash']}-seed*") if (p / "model.safetensors").is_file()]
        assert len(saved) == m["n_ok"]
    final = json.loads((reference_run / "final.json").read_text())
    assert final["verdict"] == data["verdict"]
    check_final(data)  # the statistics, comparisons and verdict are what the retrained values imply
    roles = {m["role"] for m in data["models"]}
    assert "baseline" in roles and {m["name"] for m in data["models"] if m["role"] == "baseline"} <= {
        "transformer++", "striped-hybrid"}
    for m in data["models"]:
        assert len(m["values"]) + len(m["failures"]) == 2  # every model, every seed: a value or a recorded failure
    db = sqlite3.connect(reference_run / "search.db")
    n = db.execute("SELECT COUNT(*) FROM final").fetchone()[0]
    assert n == 2 * len(data["models"])
    cli_here(capsys, "search", "finalize", reference_run, "--top-k", "1", "--multiplier", "1", "--seeds", "2",
             "--executor", "inline", "--json")
    assert db.execute("SELECT COUNT(*) FROM final").fetchone()[0] == n  # stored results are reused, not retrained


# -- Perceiver-AR inside the search ------------------------------------------------------------------------------
PERCEIVER_TINY = dict(n_layers=3, d_model=32, context=128, families=("attention", "glu"), population=8, generations=3,
                      tokens=1024, seq_len=32, batch_size=8, executor="inline", seed=0)


def test_latents_are_a_free_gene_that_mutation_changes_and_repair_keeps_valid():
    import random

    from factory.genome.codec import GLOBAL_DOMAINS
    from factory.search.operators import PerGeneMutation
    from factory.search.seeding import adapted_references, build_space

    space = build_space(SearchConfig(**PERCEIVER_TINY))
    pos = list(GLOBAL_DOMAINS).index("latents")
    assert pos not in space.frozen_positions
    refs = {name: (g, note) for name, g, note in adapted_references(space)}
    perceiver, note = refs["perceiver-ar"]
    assert perceiver is not None and perceiver.latents == 64, note  # kept: 64 < context 128
    # Mutating only the latents gene (rate 1 on that position, 0 elsewhere) visits every other count; repair keeps
    # those below the context and switches the rest off.
    v = space.encode(perceiver)
    seen = set()
    for seed in range(40):
        child = list(v)
        child[pos] = PerGeneMutation(rate=1.0).do(space, v, np.random.default_rng(seed))[pos]
        g = space.repair(child)
        seen.add(g.latents)
        assert g.latents == (GLOBAL_DOMAINS["latents"][child[pos]] if GLOBAL_DOMAINS["latents"][child[pos]] < 128 else 0)
    assert seen == {0, 16, 32}, seen  # 64 itself is never redrawn; 128 is not below the context
    # Random samples of the space reach Perceiver-AR too (where layer 0 happens to be dense attention).
    assert any(space.sample(random.Random(s).randint(0, 2**31)).latents > 0 for s in range(200))


def test_a_tiny_search_trains_perceiver_ar_genomes(tmp_path):
    result = start_search(SearchConfig(**PERCEIVER_TINY), tmp_path / "perceiver")
    assert result["complete"]
    rows = db_rows(tmp_path / "perceiver")
    latent = [r for r in rows.values() if json.loads(r["genome"])["global"]["latents"] > 0]
    assert latent, "no Perceiver-AR genome was evaluated"
    for r in latent:
        assert r["status"] == "ok", r["reason"]
        assert np.isfinite(json.loads(r["measurements"])["train"]["val_bpb"])
    assert any(r["origin"] == "reference:perceiver-ar" for r in latent)


def test_a_database_of_version_1_genomes_is_refused_in_one_line(tmp_path, reference_run, capsys):
    """Every command that reads a search database whose genomes are of schema version 1 fails with one line
    (exit 2) naming the version, before reading anything else."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(reference_run, old)
    db = sqlite3.connect(old / "search.db")
    for table in ("evaluations", "final"):
        for rowid, genome in db.execute(f"SELECT rowid, genome FROM {table}").fetchall():
            db.execute(f"UPDATE {table} SET genome = ? WHERE rowid = ?",
                       (json.dumps({**json.loads(genome), "schema_version": 1}), rowid))
    db.commit()
    db.close()
    before = (old / "search.db").read_bytes()
    for argv in (["search", "status", old, "--json"], ["search", "motifs", old], ["search", "--resume", old],
                 ["search", "finalize", old, "--top-k", "1", "--multiplier", "1", "--seeds", "2",
                  "--executor", "inline"]):
        code, out, err = cli_here(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (argv, err)
        assert "schema version 1" in lines[0] and "re-run the search" in lines[0], lines[0]
    assert (old / "search.db").read_bytes() == before
