"""Search fidelity: rank statistics on hand-checked inputs, seed-aware comparison, successive halving, and the
fidelity benchmark end to end on a tiny configuration (resumes from its cache)."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from factory.fidelity import (
    flip_share,
    kendall_tau,
    promote,
    rank_agreement,
    rankdata,
    rungs,
    seed_noise,
    seed_spread,
    spearman,
    tie_or_win,
    top_overlap,
)

ROOT = Path(__file__).resolve().parents[1]


# -- rank correlation --------------------------------------------------------------------------------------------
def test_average_ranks_for_ties():
    assert rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert rankdata([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]


def test_monotone_and_reversed():
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(a, [x**3 for x in a]) == pytest.approx(1.0)
    assert kendall_tau(a, [math.exp(x) for x in a]) == pytest.approx(1.0)
    assert spearman(a, a[::-1]) == pytest.approx(-1.0)
    assert kendall_tau(a, a[::-1]) == pytest.approx(-1.0)


def test_hand_computed_values():
    # ranks b = 1,3,2,4: sum d^2 = 2, rho = 1 - 6*2 / (4*15) = 0.8; one discordant pair of 6: tau = 4/6
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # a has one tied pair: C=2, D=0, tau-b = 2 / sqrt((3-1) * 3)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    # ranks a = 1.5,1.5,3 vs 1,2,3: Pearson of the ranks is sqrt(3)/2
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)


def test_degenerate_inputs_are_nan():
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendall_tau([2, 2], [1, 2]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 15))
        a, b = rng.integers(0, 4, n).astype(float), rng.integers(0, 5, n).astype(float)
        if len(set(a)) < 2 or len(set(b)) < 2:
            continue
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


# -- seed noise and agreement ------------------------------------------------------------------------------------
def test_seed_spread():
    s = seed_spread({"a": [1.0, 3.0], "b": [2.0, 2.0], "c": [5.0], "d": [float("nan"), 4.0]})
    assert s["per_genome"]["a"] == {"n": 2, "mean": 2.0, "std": pytest.approx(math.sqrt(2)), "range": 2.0}
    assert s["per_genome"]["c"]["std"] == 0.0 and s["per_genome"]["d"]["n"] == 1  # NaN (diverged) dropped
    assert s["genomes_with_spread"] == 2  # a and b; one value shows no spread
    assert s["mean_range"] == pytest.approx(1.0) and s["mean_std"] == pytest.approx(math.sqrt(2) / 2)


def test_flips_and_noise_share():
    assert flip_share([1, 2, 3], [1, 2, 3]) == 0.0
    assert flip_share([1, 2, 3], [3, 2, 1]) == 1.0
    assert flip_share([1, 2, 3], [2, 1, 3]) == pytest.approx(1 / 3)
    assert top_overlap([1, 2, 3, 4], [2, 1, 4, 3], 2) == 1.0
    assert top_overlap([1, 2, 3, 4], [1, 3, 2, 4], 2) == 0.5
    # seeds 0 and 1 disagree on x vs y only: 1 of 3 pairs
    noise = seed_noise({"x": [1.0, 2.0], "y": [2.0, 1.0], "z": [3.0, 3.0]})
    assert noise["seed_pairs"] == 1 and noise["flip_share"] == pytest.approx(1 / 3)


def test_rank_agreement_on_seed_means():
    low = {"a": [1.0, 1.2], "b": [2.0, 2.2], "c": [3.0, 2.6], "d": [float("nan"), 4.0], "e": [9.0, 9.0]}
    high = {"a": [0.5, 0.6], "b": [0.8, 0.9], "c": [0.7, 0.7], "d": [1.0, 1.1]}  # e never ran long
    r = rank_agreement(low, high)
    assert r["n"] == 4  # e has no long-budget result; d keeps its one finite short seed
    # means low a<b<c<d, high a<c<b<d: one swapped pair of 6
    assert r["flip_share"] == pytest.approx(1 / 6)
    assert r["kendall"] == pytest.approx(4 / 6) and r["spearman"] == pytest.approx(0.8)
    assert r["spread_high"]["genomes_with_spread"] == 4
    assert r["top_quarter"] == 1.0  # k = 1: a is best at both budgets


def test_tie_or_win():
    assert tie_or_win([1.0, 1.1], [2.0, 2.1]) == "win"  # lower bpb is better
    assert tie_or_win([2.0, 2.1], [1.0, 1.1]) == "loss"
    assert tie_or_win([1.0, 1.4], [1.2, 1.3]) == "tie"  # gap 0.05 < std 0.28
    assert tie_or_win([0.9, 1.0], [1.0, 1.1], lower_is_better=False) == "loss"
    assert tie_or_win([1.0], [1.0]) == "tie" and tie_or_win([1.0], [1.01]) == "win"  # one seed: no spread
    assert tie_or_win([float("nan")], [3.0]) == "loss" and tie_or_win([], [float("nan")]) == "tie"
    # exactly at the noise level counts as a tie: |0.1| <= std of (1.0, 1.2)... std = 0.1414
    assert tie_or_win([1.0, 1.2], [1.2, 1.2]) == "tie"


# -- successive halving ------------------------------------------------------------------------------------------
def test_rungs():
    assert rungs(100, 900, 3) == [100, 300, 900]
    assert rungs(100, 1000, 3) == [111, 333, 1000]  # the top rung is the full budget
    assert rungs(1, 16, 2) == [1, 2, 4, 8, 16]
    assert rungs(50, 50, 3) == [50]
    for bad in [(0, 10, 3), (10, 5, 3), (1, 10, 1)]:
        with pytest.raises(ValueError):
            rungs(*bad)


def test_promote_keeps_the_best_and_breaks_ties_by_id():
    results = [("d", 4.0), ("b", 1.0), ("a", 2.0), ("c", 1.0), ("e", float("nan")), ("f", 3.0)]
    assert promote(results, eta=3) == ["b", "c"]  # floor(6 / 3); b and c tie, id order decides
    assert promote(results, fraction=0.5) == ["b", "c", "a"]
    assert promote(results, eta=2, lower_is_better=False) == ["d", "f", "a"]  # NaN still last
    assert promote(list(reversed(results)), eta=3) == ["b", "c"]  # input order does not matter
    assert promote([("x", 1.0)], eta=3) == ["x"]  # at least one advances
    assert promote([], eta=3) == []
    assert promote([("e", float("nan")), ("z", 5.0)], eta=2) == ["z"]


# -- the benchmark script ------------------------------------------------------------------------------------------
def _corpus(tmp_path: Path) -> Path:
    rng = random.Random(0)
    words = "the king queen said to and of love war night day sword crown".split()
    path = tmp_path / "tiny.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    return path


def _seed_means(res: dict, budget: str) -> dict:
    return {g["hash"]: float(np.mean(g[budget])) for g in res["genomes"]}


def test_benchmark_end_to_end_and_resumes(tmp_path):
    from scipy.stats import kendalltau, spearmanr

    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench/fidelity/run.py"), "--genomes", "3", "--tokens", "2048",
           "--multiplier", "2", "--seq-len", "32", "--batch-size", "4", "--mad-steps", "2",
           "--mad-tasks", "compression,memorization", "--corpus", str(_corpus(tmp_path)), "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "jobs: 15 run, 0 cached, 0 failed" in first.stdout

    res = json.loads((out / "results.json").read_text())
    # transformer++ and Perceiver-AR on the same layers with fewer latents (16) than the training windows (32)
    assert [g["name"] for g in res["genomes"]] == ["transformer++", "perceiver-ar-16", "gqa-transformer"]
    assert res["agreement"]["n"] == 3
    rows = [json.loads(line) for line in (out / "cache.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and all(r["status"] == "ok" for r in rows)
    # results.json holds the recorded values, and its statistics are what those values give (scipy as reference)
    recorded = {(r["hash"], r["tokens"], r["seed"]): r["val_bpb"] for r in rows if r["kind"] == "train"}
    for g in res["genomes"]:
        assert g["low"] == [recorded[(g["hash"], 2048, s)] for s in range(2)]
        assert g["high"] == [recorded[(g["hash"], 4096, s)] for s in range(2)]
        assert g["mad"] == next(r["mad"]["mean"] for r in rows if r["kind"] == "mad" and r["hash"] == g["hash"])
    low, high = _seed_means(res, "low"), _seed_means(res, "high")
    keys = sorted(low)
    assert res["agreement"]["spearman"] == pytest.approx(spearmanr([low[k] for k in keys], [high[k] for k in keys])[0])
    assert res["agreement"]["kendall"] == pytest.approx(kendalltau([low[k] for k in keys], [high[k] for k in keys])[0])
    # Perceiver-AR is not full attention here: it predicts the latent positions only, so its bpb differs
    assert res["genomes"][1]["low"] != res["genomes"][0]["low"]
    md = (out / "results.md").read_text()
    assert "Goal Spearman >= 0.8" in md and "torch" in md and "--genomes 3" in md
    assert f"| perceiver-ar-16 | `{res['genomes'][1]['hash'][:10]}` |" in md

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "jobs: 0 run, 15 cached, 0 failed" in again.stdout  # nothing retrained
    assert json.loads((out / "results.json").read_text())["genomes"] == res["genomes"]

    # a run killed mid-way: two results lost and a line cut short; the resume retrains exactly those two and
    # reproduces their values (training is seeded)
    lines = (out / "cache.jsonl").read_text().splitlines()
    lost = [json.loads(line) for line in lines[6:8]]
    (out / "cache.jsonl").write_text("\n".join(lines[:6] + lines[8:]) + "\n" + lines[6][: len(lines[6]) // 2])
    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "jobs: 2 run, 13 cached, 0 failed" in resumed.stdout
    redone = {r["key"]: r for r in map(json.loads, (out / "cache.jsonl").read_text().splitlines()[-2:])}
    for r in lost:
        assert redone[r["key"]]["val_bpb"] == r["val_bpb"] and redone[r["key"]]["steps"] == r["steps"]
    assert json.loads((out / "results.json").read_text())["agreement"] == res["agreement"]

    # a second corpus the first run never saw, compared with the first: the transfer table
    second = tmp_path / "second.txt"
    rng = random.Random(1)
    words = "def return import class self value print list open file error none true false".split()
    second.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    other = tmp_path / "other"
    cmd2 = [a if a != str(out) else str(other) for a in cmd]
    cmd2[cmd2.index("--corpus") + 1] = str(second)
    cmd2 += ["--mad-steps", "0", "--compare-with", str(out)]
    third = subprocess.run(cmd2, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert third.returncode == 0, third.stderr
    transfer = json.loads((other / "results.json").read_text())["transfer"]
    assert transfer["other_corpus"] == "tiny.txt" and transfer["this_corpus"] == "second.txt"
    mine = json.loads((other / "results.json").read_text())
    this_high = _seed_means(mine, "high")
    for budget in ("low", "high"):
        theirs = _seed_means(res, budget)
        keys = sorted(this_high)
        x = transfer[f"other_{budget}_vs_this_high"]
        assert x["n"] == 3
        assert x["spearman"] == pytest.approx(spearmanr([theirs[k] for k in keys], [this_high[k] for k in keys])[0])
    assert "## Transfer from corpus `tiny.txt` to `second.txt`" in (other / "results.md").read_text()
    bad = subprocess.run(cmd2[:-1] + [str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "no results.json" in bad.stderr.strip().splitlines()[-1]
