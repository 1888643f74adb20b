"""Architecture search, the fast parts: operators, NSGA-II steps, budgets, objectives, store, CLI errors.

Tiny spaces only (3-4 layers, width 32, context 64); nothing here trains a model.
"""

from __future__ import annotations

import ast
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from factory.cli import main as cli_main
from factory.errors import FactoryError
from factory.genome.metrics import static_metrics
from factory.genome.references import reference
from factory.ops import registry
from factory.search.algorithm import NSGA2, Member, hv_bounds, hypervolume, non_dominated
from factory.search.config import Budgets, SearchConfig, parse_count
from factory.search.objectives import (EvalRecord, Objective, get_objective, register_objective, register_stage,
                                       resolve_objectives, stages_for)
from factory.search.operators import BudgetRepair, LayerClassCrossover, PerGeneMutation, VectorLayout
from factory.search.problem import ArchitectureProblem
from factory.search.run import build_algorithm, rng_for, start_search
from factory.search.seeding import adapt_to_space, build_space
from factory.search.store import Store

FAMILIES = ("glu", "short_conv")
SMALL = dict(n_layers=4, d_model=32, context=64, families=FAMILIES, population=6, generations=3)


def _problem(**changes) -> ArchitectureProblem:
    return ArchitectureProblem.from_config(SearchConfig(**{**SMALL, **changes}))


# -- operators -----------------------------------------------------------------------------------------------------
def test_crossover_swaps_whole_layers_between_two_cut_points_and_whole_class_slots():
    problem = _problem()
    space = problem.space
    layout = VectorLayout.of(space)
    a, b = space.encode(space.sample(1)), space.encode(space.sample(2))
    for seed in range(20):
        c1, c2 = LayerClassCrossover(0.5).do(space, a, b, np.random.default_rng(seed))
        n = len(layout.layer_blocks)
        from_b = [all(c1[p] == b[p] for p in blk) for blk in layout.layer_blocks]
        from_a = [all(c1[p] == a[p] for p in blk) for blk in layout.layer_blocks]
        # the layers taken from b form one contiguous segment [lo, hi) (2-point crossover at layer boundaries)
        assert any(all(from_b[k] if lo <= k < hi else from_a[k] for k in range(n))
                   for lo in range(n + 1) for hi in range(lo, n + 1))
        for blk in layout.layer_blocks + layout.class_blocks:  # each block comes whole from one parent
            assert all(c1[p] == a[p] for p in blk) or all(c1[p] == b[p] for p in blk)
            assert [c1[p] for p in blk] + [c2[p] for p in blk] in ([a[p] for p in blk] + [b[p] for p in blk],
                                                                  [b[p] for p in blk] + [a[p] for p in blk])


def test_mutation_respects_rate_frozen_genes_and_families():
    problem = _problem()
    space = problem.space
    v = space.encode(space.sample(3))
    assert PerGeneMutation(0.0).do(space, v, np.random.default_rng(0)) == v
    m = PerGeneMutation(1.0).do(space, v, np.random.default_rng(0))
    for p, ub in enumerate(space.upper_bounds):
        if p in space.frozen_positions:
            assert m[p] == v[p]
        elif ub > 0 and p not in VectorLayout.of(space).family_positions:
            assert m[p] != v[p]
    genome = space.repair(m)
    assert {registry.form(genome.layer_spec(i)) for i in range(genome.n_layers)} <= set(FAMILIES)  # conv: short
    rate = np.mean([a != b for a, b in zip(v, PerGeneMutation(0.1).do(space, v, np.random.default_rng(1)))])
    assert 0.0 < rate < 0.3


def test_offspring_are_valid_distinct_and_replayed_from_the_same_seed():
    problem = _problem()
    algo = build_algorithm(SearchConfig(**SMALL), problem)
    pop = []
    for s in range(6):
        g = problem.space.sample(s)
        pop.append(Member(g.hash(), g, [float(s), float(6 - s)], 0.0, "ok"))
    kids1 = algo.offspring(pop, 6, rng_for(7, 1, "variation"), lambda *a: None)
    kids2 = algo.offspring(pop, 6, rng_for(7, 1, "variation"), lambda *a: None)
    assert [k.hash for k in kids1] == [k.hash for k in kids2]
    hashes = [k.hash for k in kids1]
    assert len(set(hashes)) == len(hashes) and not set(hashes) & {m.hash for m in pop}
    for k in kids1:
        assert k.genome.errors() == [] and problem.space.contains(k.genome)
        assert set(k.parents) <= {m.hash for m in pop}


# -- survival, elitism, hypervolume ---------------------------------------------------------------------------------
def _member(i, F, violation=0.0, status="ok"):
    g = reference("transformer++")
    return Member(f"h{i}", g, list(F), violation, status)


def test_survival_ranks_feasible_first_and_fills_with_least_violating():
    algo = build_algorithm(SearchConfig(**SMALL), _problem())
    pool = [_member(0, (1, 5)), _member(1, (5, 1)), _member(2, (3, 3)), _member(3, (4, 4)),
            _member(4, (0, 0), violation=2.0, status="diverged"), _member(5, (0, 0), violation=1.0, status="error")]
    survivors = algo.survive(pool, 5, np.random.default_rng(0))
    names = [m.hash for m in survivors]
    assert set(names[:4]) == {"h0", "h1", "h2", "h3"} and names[4] == "h5"
    ranks = {m.hash: m.rank for m in survivors}
    assert ranks["h0"] == ranks["h1"] == ranks["h2"] == 0 and ranks["h3"] == 1


def test_elitism_keeps_the_best_on_the_first_objective():
    algo = build_algorithm(SearchConfig(**{**SMALL, "elitism": 1}), _problem())
    # Ten points on one front; survival keeps 3 by crowding, and the extremes always survive anyway. Elitism
    # must hold even so: the best on the first objective is kept.
    pool = [_member(i, (i, 10 - i)) for i in range(10)]
    survivors = algo.survive(pool, 3, np.random.default_rng(0))
    assert "h0" in [m.hash for m in survivors]


def test_hypervolume_known_value_and_dominated_points_add_nothing():
    F = np.array([[0.2, 0.6], [0.5, 0.3]])
    assert hypervolume(F, [0, 0], [1, 1]) == pytest.approx(0.8 * 0.4 + 0.5 * 0.7 - 0.5 * 0.4)
    assert hypervolume(np.vstack([F, [[0.6, 0.7]]]), [0, 0], [1, 1]) == pytest.approx(hypervolume(F, [0, 0], [1, 1]))
    lo, hi = hv_bounds(np.array([[2.0, 100.0], [4.0, 300.0]]))
    assert lo == [0.0, 0.0] and hi == pytest.approx([4.4, 330.0])
    assert list(non_dominated(np.array([[1, 2], [2, 1], [2, 2]]))) == [0, 1]


# -- budgets --------------------------------------------------------------------------------------------------------
def test_budget_repair_pulls_a_genome_inside_the_budgets():
    problem = _problem(budgets=Budgets(max_params=20_000, max_cache_bytes=1024))
    space = problem.space
    over = next(g for g in (space.sample(s) for s in range(100)) if not problem.check(g).feasible)
    repaired = BudgetRepair(problem, max_steps=30)(over)
    assert repaired is not None and problem.check(repaired).feasible
    m = static_metrics(repaired, 64)
    assert m.params <= 20_000 and m.cache_bytes <= 1024


def test_budget_violation_and_parsing():
    b = Budgets(max_params=100, max_cache_bytes=0)
    v, reason = b.violation({"params": 150, "cache_bytes": 8, "peak_memory_bytes": 1})
    assert v > 0 and "params 150 > --max-params 100" in reason and "cache_bytes 8" in reason
    assert b.violation({"params": 100, "cache_bytes": 0, "peak_memory_bytes": 1}) == (0.0, "")
    assert parse_count("64KiB", "--max-cache-bytes") == 65536
    assert parse_count("0", "--max-cache-bytes", allow_zero=True) == 0
    for bad in ("-5", "lots", "0"):
        with pytest.raises(FactoryError):
            parse_count(bad, "--max-params", units=False)


def test_impossible_budget_fails_before_anything_is_written(tmp_path):
    config = SearchConfig(**{**SMALL, "budgets": Budgets(max_params=1000)})
    with pytest.raises(FactoryError, match="max-params"):
        start_search(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- references, objectives ---------------------------------------------------------------------------------------
def test_references_are_truncated_or_tiled_to_the_space():
    space = build_space(SearchConfig(n_layers=3, d_model=32, context=64))
    g, note = adapt_to_space(reference("transformer++"), space)
    assert [g.layer_spec(i).family for i in range(3)] == ["attention", "glu", "attention"]
    assert g.d_model == 32 and g.context == 64 and "truncated 8->3" in note and space.contains(g)
    space = build_space(SearchConfig(n_layers=10, d_model=32, context=64))
    g, note = adapt_to_space(reference("mamba-like"), space)
    assert g.n_layers == 10 and "tiled 6->10" in note
    restricted = build_space(SearchConfig(n_layers=4, d_model=32, context=64, families=FAMILIES))
    assert adapt_to_space(reference("transformer++"), restricted)[0] is None


def test_objective_registry_accepts_a_measured_objective_with_its_own_stage():
    register_stage("fake_profile", "tests_do_not_exist:profile")
    register_objective(Objective("fake_latency", lambda g, r, c: r.measurements["fake_profile"]["ms"],
                                 needs=("fake_profile",), label="ms"))
    objs = resolve_objectives(["quality", "fake_latency", "cache"])
    assert stages_for(objs) == ["train", "fake_profile"]
    record = EvalRecord("h", "ok", static={"cache_bytes": 10}, measurements={"fake_profile": {"ms": 1.5}})
    assert get_objective("fake_latency").fn(None, record, None) == 1.5
    with pytest.raises(FactoryError, match="unknown objective 'speed'"):
        resolve_objectives(["quality", "speed"])
    with pytest.raises(FactoryError, match="unknown evaluation stage"):
        register_objective(Objective("x", lambda *a: 0.0, needs=("nope",)))


def test_store_commits_each_evaluation_durably(tmp_path):
    with Store(tmp_path / "search.db") as store:
        store.add_evaluation(hash="abc", train_config_hash="t", generation=0, status="ok", reason="", origin="random",
                             name="", objectives={"quality": 1.25, "cache": math.inf}, violation=0.0, static={"params": 1},
                             measurements={"train": {"val_bpb": 1.25}}, genome={"g": 1}, seed=0)
        # visible to another connection at once, without closing this one
        other = sqlite3.connect(tmp_path / "search.db")
        assert other.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 1
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        row = store.find("abc", "t")
        assert row["objectives"] == {"quality": 1.25, "cache": math.inf} and row["measurements"]["train"]["val_bpb"] == 1.25
        assert store.find("abc", "other") is None


# -- CLI ------------------------------------------------------------------------------------------------------------
def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


@pytest.mark.parametrize("argv, message", [
    (["search", "--max-params", "-5", "--out", "{tmp}/a"], "--max-params"),
    (["search", "--max-cache-bytes", "lots", "--out", "{tmp}/a"], "--max-cache-bytes"),
    (["search", "--layers", "4", "--d-model", "32", "--context", "64", "--max-params", "2000", "--out", "{tmp}/a"],
     "max-params"),
    (["search", "--objectives", "quality,speed", "--out", "{tmp}/a"], "unknown objective 'speed'"),
    (["search", "--executor", "dask", "--out", "{tmp}/a"], "--executor"),
    (["search", "--d-model", "100", "--out", "{tmp}/a"], "--d-model"),
    (["search", "--out", "{tmp}/file.txt/run"], "--out"),
    (["search", "--resume", "{tmp}"], "not a search run"),
    (["search", "--resume", "{tmp}/missing"], "no such search run"),
    (["search", "status", "{tmp}"], "not a search run"),
    (["search", "--layers", "4"], "--out DIR is required"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "file.txt").write_text("x")
    code, out, err = _cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "a").exists()


def test_resume_refuses_settings_that_would_change_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = _cli(["search", "--layers", "3", "--d-model", "32", "--context", "64", "--families", "glu,short_conv",
                       "--objectives", "params,cache", "--population", "3", "--generations", "1", "--out", str(out),
                       "--json"], capsys)
    assert code in (0, None)
    code, out_text, err = _cli(["search", "--resume", str(out), "--tokens", "5"], capsys)
    assert code == 2 and "--tokens" in err and err.count("\n") == 1
    code, _, err = _cli(["search", "--layers", "3", "--out", str(out)], capsys)
    assert code == 2 and "--resume" in err


def test_cli_module_imports_nothing_heavy_at_module_level():
    tree = ast.parse(Path(__file__).parents[1].joinpath("factory/cli/search.py").read_text())
    allowed = {"__future__", "math", "pathlib", "typing", "typer", "factory.cli.common", "factory.errors",
               "factory.presets"}
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert all(a.name in allowed for a in node.names), ast.dump(node)
        elif isinstance(node, ast.ImportFrom):
            assert node.module in allowed, node.module
    # the preset table the help text reads is standard library only
    tree = ast.parse(Path(__file__).parents[1].joinpath("factory/presets.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert node.module in ("__future__", "dataclasses"), node.module
        assert not isinstance(node, ast.Import), ast.dump(node)


def test_static_only_search_never_evaluates_a_hash_twice_and_reuses_across_generations(tmp_path):
    # one GLU layer in one class slot: a space of a few dozen genomes, so later generations meet earlier ones
    config = SearchConfig(n_layers=1, n_classes=1, d_model=32, context=64, families=("glu",),
                          objectives=("params", "cache"), population=6, generations=6, seed=3)
    result = start_search(config, tmp_path / "run")
    db = sqlite3.connect(tmp_path / "run" / "search.db")
    assert db.execute("SELECT COUNT(*) FROM (SELECT hash FROM evaluations GROUP BY hash HAVING COUNT(*) > 1)").fetchone()[0] == 0
    reused = db.execute("SELECT SUM(reused) FROM generations").fetchone()[0]
    assert reused > 0  # a small space: later generations meet genomes evaluated before, and reuse them
    assert result["complete"] and result["generation"] == 5
    pareto = json.loads((tmp_path / "run" / "pareto.json").read_text())
    assert {m["hash"] for m in pareto["front"]} == {m["hash"] for m in result["front"]}


def test_final_verdict_counts_a_difference_within_the_seed_spread_as_a_tie():
    from factory.search.finalize import _sentence, compare

    base = {"hash": "b", "name": "transformer++", "role": "baseline", "mean": 2.00, "std": 0.05, "n_ok": 2,
            "params": 1000, "cache_bytes": 4096}
    close = {"hash": "e1", "name": "e1", "role": "evolved", "mean": 1.97, "std": 0.01, "n_ok": 2, "params": 900,
             "cache_bytes": 1024}
    clear = {**close, "hash": "e2", "name": "e2", "mean": 1.80}
    bigger = {**clear, "hash": "e3", "name": "e3", "params": 2000, "cache_bytes": 8192}
    assert compare(close, base)["verdict"] == "tie" and compare(close, base)["matches"]
    assert compare(clear, base)["beats"] and compare(clear, base)["cache_ratio"] == 0.25
    assert compare(bigger, base)["verdict"] == "better" and not compare(bigger, base)["beats"]
    assert compare({**close, "n_ok": 1, "std": float("nan")}, base)["verdict"] == "inconclusive"
    models = [base, close, clear]
    assert _sentence(models, [compare(close, base)]).startswith("NO")
    assert _sentence(models, [compare(close, base), compare(clear, base)]).startswith("YES: evolved e2")


def test_latency_is_a_built_in_objective_whose_import_errors_surface_as_themselves(monkeypatch):
    """latency and memory are registered with the other objectives (no plugin loading that could turn a broken
    import into "unknown objective"): a module of the latency loop that fails to import raises its ImportError."""
    import sys

    from factory.search.objectives import ObjectiveContext

    latency, memory = get_objective("latency"), get_objective("memory")
    assert latency.needs == memory.needs == ("profile",)
    record = EvalRecord("h", "ok", measurements={"profile": {"decode_ms_p95": 2.5, "prefill_ms_p50": 7.0,
                                                             "peak_rss_mb": 30.0}})
    from targets import load_target

    laptop, pi = load_target("laptop-cpu"), load_target("raspberry-pi-5")
    assert (laptop.latency_metric, pi.latency_metric) == ("prefill", "decode")
    assert latency.fn(None, record, ObjectiveContext(64, target=laptop)) == 7.0
    assert latency.fn(None, record, ObjectiveContext(64, target=pi)) == 2.5
    assert memory.fn(None, record, ObjectiveContext(64, target=pi)) == 30.0
    monkeypatch.setitem(sys.modules, "factory.search.latency", None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match="factory.search.latency"):
        latency.preflight(ObjectiveContext(64, target=laptop))


def test_extra_static_constraints_reject_before_training():
    from factory.search import objectives

    class NoShortConv:
        def violation(self, genome):
            n = sum(genome.layer_spec(i).family == "conv" for i in range(genome.n_layers))
            return float(n), f"{n} short_conv layers" if n else ""

    objectives.register_constraint("no-short-conv", lambda config, measurements: NoShortConv())
    try:
        problem = _problem()
        genomes = [problem.space.sample(s) for s in range(20)]
        for g in genomes:
            has = any(g.layer_spec(i).family == "conv" for i in range(g.n_layers))
            assert problem.check(g).feasible == (not has)
    finally:
        objectives._CONSTRAINTS.pop("no-short-conv")

