"""Successive halving inside the search (`--rungs`, `--eta`): who is promoted, what the front compares, how rung
results are stored, and that a run killed at any rung resumes to the uninterrupted result.

Most runs here use a fake evaluator (instant, deterministic scores from the genome hash and the token budget, run
in-process); one kill test trains for real through the CLI, like tests/test_search.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from factory.cli import main as cli_main
from factory.genome.references import reference
from factory.search.algorithm import Member
from factory.search.config import SearchConfig
from factory.search.outputs import comparable_rows, front_rows, reached_rows
from factory.search.problem import ArchitectureProblem
from factory.search.run import build_algorithm, read_run, resume_search, start_search
from factory.search.store import Store
from search_kill import kill_search_midway

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
SPACE = dict(n_layers=3, d_model=32, context=64, families=("glu", "short_conv"), seq_len=32, batch_size=8)
# Fake scores: 8 offspring per generation -> 4 promoted to rung 1 -> 2 promoted to rung 2.
FAKE = dict(**SPACE, population=8, generations=3, tokens=1024, rungs=3, eta=2, executor="inline",
            evaluator="test_search_fidelity:fake_evaluator")


# -- evaluator hooks (run in-process by the inline executor) ----------------------------------------------------
def fake_score(genome_hash: str, tokens: int) -> float:
    """A val bpb that falls with the budget, with a per-(genome, budget) jitter larger than the fall between two
    genomes, so the order at one rung differs from the order at the next."""
    jitter = int(hashlib.sha256(f"{genome_hash}:{tokens}".encode()).hexdigest()[:8], 16) / 2**32
    return 8.0 - 0.25 * math.log2(tokens / 1024) + jitter


_CALLS = [0]


def fake_evaluator(request: dict) -> dict:
    """Instant fake training. With FIDELITY_KILL_AT=N in the environment, the N-th call of this process kills it
    with SIGKILL (kill -9) before returning: the earlier results are committed, that one is lost."""
    _CALLS[0] += 1
    if _CALLS[0] == int(os.environ.get("FIDELITY_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    tokens = request["settings"]["train"]["tokens"]
    return {"hash": request["hash"], "status": "ok", "reason": "", "timings": {}, "wall_s": 0.0,
            "measurements": {"train": {"val_bpb": fake_score(request["hash"], tokens), "tokens": tokens}}}


# -- helpers -----------------------------------------------------------------------------------------------------
def comparable(run: Path) -> dict:
    """Database contents without timings, row ids or wall-clock stamps, rung columns included."""
    db = sqlite3.connect(run / "search.db")
    evals = sorted(db.execute("SELECT hash, train_config_hash, rung, tokens, generation, status, reason, origin, "
                              "objectives, violation, static, measurements, genome, seed FROM evaluations").fetchall())
    population = db.execute("SELECT generation, slot, hash, rank, crowding FROM population "
                            "ORDER BY generation, slot").fetchall()
    offspring = db.execute("SELECT generation, idx, hash, origin, parents FROM offspring "
                           "ORDER BY generation, idx").fetchall()
    generations = db.execute("SELECT generation, hypervolume, evaluated, reused, failed, rejected, best "
                             "FROM generations ORDER BY generation").fetchall()
    db.close()
    return {"evaluations": evals, "population": population, "offspring": offspring, "generations": generations}


def rows_by_key(run: Path) -> dict:
    db = sqlite3.connect(run / "search.db")
    db.row_factory = sqlite3.Row
    out = {(r["hash"], r["rung"]): dict(r) for r in db.execute("SELECT * FROM evaluations")}
    db.close()
    return out


def _cli(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main([str(a) for a in argv])
    cap = capsys.readouterr()
    return e.value.code or 0, cap.out, cap.err


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fidelity") / "fake"
    assert start_search(SearchConfig(**FAKE), out)["complete"]
    return out


# -- promotion ---------------------------------------------------------------------------------------------------
def test_the_best_1_over_eta_of_each_rung_advance_and_the_rest_do_not(fake_run):
    config = read_run(fake_run)
    with Store(fake_run / "search.db", readonly=True) as store:
        rows = store.evaluations(config.rung_hashes())
        offspring = store.offspring()
    at = {(r["hash"], r["rung"]): r for r in rows}
    for g in range(FAKE["generations"]):
        pool = [o["hash"] for o in offspring if o["generation"] == g]
        assert len(pool) == 8
        for rung in (1, 2):
            scores = {h: at[(h, rung - 1)]["objectives"]["quality"] for h in pool}
            assert all(s == fake_score(h, 1024 * 2 ** (rung - 1)) for h, s in scores.items())
            best = sorted(pool, key=lambda h: (scores[h], h))[: len(pool) // 2]
            for h in pool:  # exactly the best half went on to the next rung
                if h in best:
                    assert (h, rung) in at, (g, rung, h)
                else:  # (unless an earlier generation promoted the same genome)
                    assert (h, rung) not in at or at[(h, rung)]["generation"] < g, (g, rung, h)
            pool = best
        assert len(pool) == 2  # 8 -> 4 -> 2
    # the order changes between rungs (the fake scores say so), so rung 2 was decided on rung 1's scores
    gen0 = [o["hash"] for o in offspring if o["generation"] == 0]
    r0 = sorted(gen0, key=lambda h: at[(h, 0)]["objectives"]["quality"])[:4]
    r1 = sorted(r0, key=lambda h: at[(h, 1)]["objectives"]["quality"])[:2]
    assert {h for h in gen0 if (h, 2) in at} == set(r1)


def test_rung_rows_record_their_rung_tokens_and_train_config(fake_run):
    config = read_run(fake_run)
    assert config.rung_budgets() == [1024, 2048, 4096]
    hashes = config.rung_hashes()
    assert hashes[0] == config.train_config_hash() and len(set(hashes)) == 3
    rows = list(rows_by_key(fake_run).values())
    assert {r["rung"] for r in rows} == {0, 1, 2}
    for r in rows:
        assert r["tokens"] == 1024 * 2 ** r["rung"] and r["train_config_hash"] == hashes[r["rung"]]
        assert json.loads(r["measurements"])["train"]["tokens"] == r["tokens"]  # trained at that rung's budget
    with open(fake_run / "evaluations.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {(c["hash"], int(c["rung"]), int(c["tokens"])) for c in csv_rows} == \
        {(r["hash"], r["rung"], r["tokens"]) for r in rows}


# -- the front compares like with like ---------------------------------------------------------------------------
def _row(h, rung, quality, cache, status="ok"):
    return {"hash": h, "rung": rung, "tokens": 1024 * 3 ** rung, "status": status, "violation": 0.0,
            "objectives": {"quality": quality, "cache": cache}}


def test_the_front_is_formed_at_the_highest_rung_reached():
    rows = [_row("a", 0, 2.0, 100), _row("b", 0, 2.5, 50), _row("c", 0, 1.0, 10),  # c: best numbers, never promoted
            _row("a", 1, 1.8, 100), _row("b", 1, 1.9, 50), _row("a", 2, 1.5, 100), _row("b", 2, 1.6, 50),
            _row("d", 0, 2.1, 5), _row("d", 1, math.inf, 5, status="diverged")]  # d failed after its promotion
    assert [(r["hash"], r["rung"]) for r in reached_rows(rows)] == [("c", 0), ("a", 2), ("b", 2), ("d", 1)]
    assert {(r["hash"], r["rung"]) for r in comparable_rows(rows)} == {("a", 2), ("b", 2)}
    front = front_rows(rows, ["quality", "cache"])
    assert [(r["hash"], r["rung"], r["objectives"]["quality"]) for r in front] == [("a", 2, 1.5), ("b", 2, 1.6)]


def test_the_front_of_a_run_holds_only_top_rung_results(fake_run):
    pareto = json.loads((fake_run / "pareto.json").read_text())
    assert pareto["run"]["rung_tokens"] == [1024, 2048, 4096] and pareto["fidelity"]["eta"] == 2
    assert pareto["front"] and all(m["rung"] == 2 and m["tokens"] == 4096 for m in pareto["front"])
    by_key = rows_by_key(fake_run)
    for m in pareto["front"]:
        stored = json.loads(by_key[(m["hash"], 2)]["objectives"])["quality"]
        assert m["val_bpb"] == fake_score(m["hash"], 4096) == stored
    top = {h: json.loads(r["objectives"]) for (h, rung), r in by_key.items() if rung == 2}
    F = {h: [o["quality"], o["cache"]] for h, o in top.items()}
    dominated = {h for h in F if any(all(a <= b for a, b in zip(F[o], F[h])) and F[o] != F[h] for o in F)}
    assert {m["hash"] for m in pareto["front"]} == set(F) - dominated


def _member(h, F, rung, violation=0.0):
    return Member(h, reference("transformer++"), list(F), violation, "ok" if violation == 0 else "diverged",
                  rung=rung)


def test_survival_ranks_by_rung_reached_before_pareto_rank():
    config = SearchConfig(**{**FAKE, "elitism": 1})
    algo = build_algorithm(config, ArchitectureProblem.from_config(config))
    pool = [_member("low-best", (1.0, 1.0), rung=0),  # dominates everything numerically, but only at rung 0
            _member("top-a", (3.0, 4.0), rung=2), _member("top-b", (4.0, 3.0), rung=2),
            _member("top-c", (5.0, 5.0), rung=2),  # dominated at its rung
            _member("mid", (2.0, 2.0), rung=1), _member("failed", (0.5, 0.5), rung=2, violation=1.0)]
    survivors = algo.survive(pool, 4, np.random.default_rng(0))
    ranks = {m.hash: m.rank for m in survivors}
    assert set(ranks) == {"top-a", "top-b", "top-c", "mid"}  # the rung-0 member ranks behind every promoted one
    assert ranks["top-a"] == ranks["top-b"] == 0 and ranks["top-c"] == 1 and ranks["mid"] == 2
    assert {m.hash for m in algo.survive(pool, 5, np.random.default_rng(0))} == set(ranks) | {"low-best"}
    # one rung only: plain NSGA-II (the rung shift is off), so low-best dominates
    flat = [Member(m.hash, m.genome, m.F, m.violation, m.status) for m in pool]
    assert algo.survive(flat, 1, np.random.default_rng(0))[0].hash == "low-best"


# -- kill and resume ---------------------------------------------------------------------------------------------
def test_a_run_killed_at_several_rungs_resumes_to_the_uninterrupted_result(tmp_path, fake_run):
    """Three kill -9s at chosen calls: mid rung 1 of generation 0 (call 10 of 8 + 4 + 2), then, counting from the
    resume, the first call of rung 2 and a call of generation 1's rung 0. The last resume finishes the run."""
    out = tmp_path / "killed"
    config = SearchConfig(**FAKE)
    script = ("import sys; from pathlib import Path; from factory.search.config import SearchConfig; "
              "from factory.search.run import start_search, resume_search; import json; "
              f"out = Path({str(out)!r}); "
              "resume_search(out) if (out / 'run.json').exists() else "
              "start_search(SearchConfig.from_dict(json.loads(sys.argv[1])), out)")
    seen = []
    for kill_at in (10, 4, 5):
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(config.to_dict())], cwd=REPO, timeout=120,
                              env={**ENV, "FIDELITY_KILL_AT": str(kill_at)}, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        rows = rows_by_key(out)
        for key, row in seen[-1].items() if seen else ():
            assert rows[key] == row  # nothing committed before a kill is lost or rewritten
        seen.append(rows)
    assert len(seen[0]) == 8 + 1 and {rung for _, rung in seen[0]} == {0, 1}  # killed mid rung 1
    assert len(seen[1]) == 8 + 4 and {rung for _, rung in seen[1]} == {0, 1}  # killed at rung 2's first call
    gen0 = {k for k, r in seen[2].items() if r["generation"] == 0}
    assert len(gen0) == 8 + 4 + 2 and len(seen[2]) - len(gen0) == 2  # generation 1 killed at its 3rd evaluation
    resume_search(out)  # in-process: no kill
    after = rows_by_key(out)
    for key, row in seen[-1].items():
        assert after[key] == row
    assert comparable(out) == comparable(fake_run)
    front = [json.loads((run / "pareto.json").read_text())["front"] for run in (out, fake_run)]
    assert front[0] == front[1]


def test_a_killed_run_with_real_training_resumes_without_redoing_a_rung(tmp_path):
    """The pattern of tests/test_search.py: `factory search` in a process pool, kill -9 of its process group once
    some rung results are committed, `--resume`, then the same database as an uninterrupted run."""
    tiny = dict(**SPACE, population=4, generations=3, tokens=1024, rungs=2, eta=2)
    reference_out = tmp_path / "reference"
    reference = start_search(SearchConfig(**tiny, executor="inline"), reference_out)
    out = tmp_path / "killed"
    args = ["--layers", "3", "--d-model", "32", "--context", "64", "--families", "glu,short_conv", "--population", "4",
            "--generations", "3", "--tokens", "1024", "--seq-len", "32", "--batch-size", "8", "--rungs", "2",
            "--eta", "2"]
    # after generation 0's rung-1 results, before the end (6 rows a generation)
    kill_search_midway(args, out, lambda o: len(rows_by_key(o)), env=ENV, cwd=REPO)
    before = rows_by_key(out)
    assert any(rung == 1 for _, rung in before) and len(before) < len(rows_by_key(reference_out))
    resume = subprocess.run([sys.executable, "-m", "factory", "search", "--resume", str(out), "--json"], env=ENV,
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-2000:]
    after = rows_by_key(out)
    for key, row in before.items():
        assert after[key] == row
    assert comparable(out) == comparable(reference_out)
    summary = json.loads(resume.stdout)
    assert summary["fidelity"] == reference["fidelity"] and summary["front"] == reference["front"]
    assert all(m["rung"] == 1 and m["tokens"] == 2048 for m in summary["front"])


# -- settings and CLI --------------------------------------------------------------------------------------------
def test_fidelity_is_off_by_default_and_older_run_files_load():
    config = SearchConfig(**SPACE)
    assert not config.fidelity and config.rung_budgets() == [config.tokens]
    assert config.rung_hashes() == [config.train_config_hash()]
    old = {k: v for k, v in config.to_dict().items() if k not in ("rungs", "eta")}  # a run.json from before
    assert SearchConfig.from_dict(old) == config
    on = SearchConfig(**SPACE, rungs=3, eta=3)
    assert SearchConfig.from_dict(on.to_dict()) == on and on.rung_budgets() == [on.tokens * 3**k for k in range(3)]


def test_an_old_database_gains_the_rung_columns(tmp_path):
    db = sqlite3.connect(tmp_path / "search.db")
    db.execute("CREATE TABLE evaluations (id INTEGER PRIMARY KEY AUTOINCREMENT, hash TEXT NOT NULL, "
               "train_config_hash TEXT NOT NULL, generation INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT NOT "
               "NULL DEFAULT '', origin TEXT NOT NULL DEFAULT '', name TEXT NOT NULL DEFAULT '', objectives TEXT NOT "
               "NULL, violation REAL NOT NULL, static TEXT NOT NULL, measurements TEXT NOT NULL, genome TEXT NOT NULL, "
               "seed INTEGER NOT NULL, wall_s REAL NOT NULL DEFAULT 0, timings TEXT NOT NULL DEFAULT '{}', "
               "created_at REAL NOT NULL)")
    db.execute("INSERT INTO evaluations (hash, train_config_hash, generation, status, objectives, violation, static, "
               "measurements, genome, seed, created_at) VALUES ('h', 't', 0, 'ok', '{}', 0, '{}', '{}', '{}', 0, 0)")
    db.commit()
    db.close()
    with Store(tmp_path / "search.db", readonly=True) as store:  # `status` on an old run: read-only, rung 0
        assert store.find("h", "t")["rung"] == 0 and store.evaluations("t")[0]["tokens"] is None
    with Store(tmp_path / "search.db") as store:
        row = store.find("h", "t")
        assert row["rung"] == 0 and row["tokens"] is None
        store.add_evaluation(hash="h", train_config_hash="t3", generation=1, rung=1, tokens=3072, status="ok",
                             objectives={}, violation=0.0, static={}, measurements={}, genome={}, seed=0)
        assert store.find_highest("h", ["t", "t3"])["rung"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--rungs", "0"], "--rungs must be an integer from 1 (off) to 8, got 0"),
    (["--rungs", "3", "--eta", "1"], "--eta must be an integer of at least 2, got 1"),
    (["--eta", "3"], "--eta 3 only matters with successive halving: add --rungs 2 or more"),
    (["--rungs", "2", "--objectives", "params,cache"], "the objectives must include quality"),
])
def test_cli_fidelity_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    code, out, err = _cli(["search", "--layers", "3", "--d-model", "32", "--context", "64", *argv,
                           "--out", tmp_path / "a"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "a").exists()


def test_resume_refuses_to_change_the_rungs(fake_run, capsys):
    code, _, err = _cli(["search", "--resume", fake_run, "--rungs", "2"], capsys)
    assert code == 2 and "--rungs" in err and err.count("\n") == 1


def test_finalists_train_at_a_multiple_of_the_top_rung():
    from factory.search.finalize import final_tokens

    config = SearchConfig(**{**FAKE, "rungs": 3, "eta": 2})
    assert config.rung_budgets() == [FAKE["tokens"], 2 * FAKE["tokens"], 4 * FAKE["tokens"]]
    assert final_tokens(config, 3) == 12 * FAKE["tokens"]
    assert final_tokens(SearchConfig(**{**FAKE, "rungs": 1}), 3) == 3 * FAKE["tokens"]
