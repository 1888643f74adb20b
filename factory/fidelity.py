"""Search fidelity: does a short training run rank architectures the way a longer one does?

Rank statistics (Spearman, Kendall tau-b), seed noise (spread, order flips between seeds), a seed-aware comparison
(`tie_or_win`) and successive-halving helpers (`rungs`, `promote`). numpy only: scipy is a dev dependency.

Scores here are "lower is better" (val bits per byte) unless a function says otherwise. Non-finite values
(a diverged run) are dropped where noted.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Hashable, Iterable, Sequence

import numpy as np


# -- rank correlation --------------------------------------------------------------------------------------------
def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values all get the average of the ranks they span (scipy's 'average' method)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # average of 1-based positions i+1 .. j+1
        i = j + 1
    return ranks


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    return a, b


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks. NaN if fewer than 2 items or a side is constant."""
    a, b = _pair(a, b)
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_a) (n0 - ties_b)) over all n0 pairs.

    A pair tied in one sequence counts in neither C nor D and shrinks that side's denominator; tied in both, it is
    left out entirely. O(n^2), fine for the tens of genomes a benchmark ranks. NaN if a side is constant.
    """
    a, b = _pair(a, b)
    n = len(a)
    if n < 2:
        return float("nan")
    i, j = np.triu_indices(n, k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    s = float((da * db).sum())  # +1 concordant, -1 discordant, 0 tied on either side
    n0 = len(i)
    ties_a, ties_b = int((da == 0).sum()), int((db == 0).sum())
    denom = math.sqrt((n0 - ties_a) * (n0 - ties_b))
    return s / denom if denom > 0 else float("nan")


# -- seed noise --------------------------------------------------------------------------------------------------
def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); 0 for a single value, since one seed shows no spread."""
    return float(np.std(values, ddof=1)) if len(values) >= 2 else 0.0


def seed_spread(values_by_seed: dict[Hashable, Sequence[float]]) -> dict:
    """Per genome: mean, sample std (ddof=1) and range (max - min) of its finite values over seeds; plus the mean
    std and mean range over genomes that have at least two finite values (one value has no spread to measure)."""
    per = {}
    for key, values in values_by_seed.items():
        v = _finite(values)
        per[key] = {
            "n": len(v),
            "mean": float(np.mean(v)) if v else float("nan"),
            "std": _std(v) if v else float("nan"),
            "range": float(max(v) - min(v)) if v else float("nan"),
        }
    multi = [p for p in per.values() if p["n"] >= 2]
    return {
        "per_genome": per,
        "genomes_with_spread": len(multi),
        "mean_std": float(np.mean([p["std"] for p in multi])) if multi else float("nan"),
        "mean_range": float(np.mean([p["range"] for p in multi])) if multi else float("nan"),
        "max_range": float(max(p["range"] for p in multi)) if multi else float("nan"),
    }


def flip_share(x: Sequence[float], y: Sequence[float]) -> float:
    """Share of item pairs strictly ordered one way by x and the other way by y (ties are not flips)."""
    x, y = _pair(x, y)
    if len(x) < 2:
        return float("nan")
    i, j = np.triu_indices(len(x), k=1)
    return float((np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) < 0).mean())


def top_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    """Share of the k best items by b (lowest values) that are also among the k best by a: what a search that
    keeps its top k by the cheap score a would keep of the truly best. Ties are broken by position."""
    a, b = _pair(a, b)
    k = min(k, len(a))
    if k < 1:
        return float("nan")
    best_a = set(np.argsort(a, kind="mergesort")[:k].tolist())
    best_b = set(np.argsort(b, kind="mergesort")[:k].tolist())
    return len(best_a & best_b) / k


def seed_noise(values_by_seed: dict[Hashable, Sequence[float]]) -> dict:
    """How much of a ranking is noise: for every pair of seed indices (s, t), rank the genomes that have finite
    values at both by seed s and by seed t; report the mean share of genome pairs whose order flips, and the mean
    Spearman between the two seeds' rankings (the best a single-seed ranking can agree with itself)."""
    n_seeds = max((len(v) for v in values_by_seed.values()), default=0)
    flips, rhos = [], []
    for s, t in combinations(range(n_seeds), 2):
        rows = [(v[s], v[t]) for v in values_by_seed.values() if len(v) > t and len(_finite([v[s], v[t]])) == 2]
        if len(rows) >= 2:
            xs, ys = zip(*rows)
            flips.append(flip_share(xs, ys))
            rhos.append(spearman(xs, ys))
    return {
        "seed_pairs": len(flips),
        "flip_share": float(np.mean(flips)) if flips else float("nan"),
        "seed_spearman": float(np.mean(_finite(rhos))) if _finite(rhos) else float("nan"),
    }


def rank_agreement(low: dict[Hashable, Sequence[float]], high: dict[Hashable, Sequence[float]]) -> dict:
    """Compare two budgets. `low` and `high` map a genome hash to its per-seed scores (same seed order).

    Spearman and Kendall are computed on per-genome seed means over the genomes with at least one finite value at
    both budgets. `flip_share` is the share of genome pairs the low budget orders the other way round from the high
    one; `top_quarter` is `top_overlap` with k = n // 4 (at least 1); `noise_low` / `noise_high` give the share of
    pairs that flip between seeds at the same budget, i.e. how much of any ranking at that budget is noise.
    `spread_low` / `spread_high` summarise `seed_spread`.
    """
    keys = [k for k in low if k in high and _finite(low[k]) and _finite(high[k])]
    lo = [float(np.mean(_finite(low[k]))) for k in keys]
    hi = [float(np.mean(_finite(high[k]))) for k in keys]

    def spread(values):
        s = seed_spread(values)
        return {k: s[k] for k in ("mean_std", "mean_range", "max_range", "genomes_with_spread")}

    return {
        "n": len(keys),
        "spearman": spearman(lo, hi),
        "kendall": kendall_tau(lo, hi),
        "flip_share": flip_share(lo, hi),
        "top_quarter": top_overlap(lo, hi, max(1, len(keys) // 4)) if keys else float("nan"),
        "noise_low": seed_noise({k: low[k] for k in keys}),
        "noise_high": seed_noise({k: high[k] for k in keys}),
        "spread_low": spread({k: low[k] for k in keys}),
        "spread_high": spread({k: high[k] for k in keys}),
    }


def tie_or_win(a_values: Sequence[float], b_values: Sequence[float], lower_is_better: bool = True) -> str:
    """'win' if a beats b, 'loss' if b beats a, 'tie' if the gap in means is within seed noise.

    Noise is the larger of the two sample stds (ddof=1; 0 with one seed): |mean_a - mean_b| <= max(std_a, std_b)
    is a tie. Non-finite values (diverged runs) are dropped; a side with none left loses (both empty: tie).
    """
    a, b = _finite(a_values), _finite(b_values)
    if not a or not b:
        return "tie" if not a and not b else ("loss" if not a else "win")
    diff = float(np.mean(a) - np.mean(b))
    if abs(diff) <= max(_std(a), _std(b)):
        return "tie"
    a_better = diff < 0 if lower_is_better else diff > 0
    return "win" if a_better else "loss"


# -- successive halving --------------------------------------------------------------------------------------------
def rungs(min_budget: int, max_budget: int, eta: float = 3) -> list[int]:
    """Budgets of a successive-halving ladder, smallest first: max_budget / eta^k for k = K..0, where K is the
    largest k with max_budget / eta^k >= min_budget (Hyperband's form: the top rung is exactly max_budget)."""
    if min_budget <= 0 or max_budget < min_budget or eta <= 1:
        raise ValueError(f"need 0 < min_budget <= max_budget and eta > 1, got {min_budget}, {max_budget}, {eta}")
    k = 0
    while max_budget / eta ** (k + 1) >= min_budget * (1 - 1e-12):  # tolerance: 900/3/3 must count as 100
        k += 1
    return [int(round(max_budget / eta**i)) for i in range(k, -1, -1)]


def promoted_count(n: int, eta: float = 3, fraction: float | None = None) -> int:
    """How many of n results advance to the next rung: floor(n / eta) (or floor(n * fraction)), at least one."""
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        return max(1, int(n * fraction + 1e-9))
    if eta <= 1:
        raise ValueError(f"eta must be > 1, got {eta}")
    return max(1, int(n / eta + 1e-9))


def promote(
    results: Sequence[tuple[Hashable, float]],
    eta: float = 3,
    fraction: float | None = None,
    lower_is_better: bool = True,
) -> list:
    """Ids advancing to the next rung, best first: the top floor(n / eta) (or floor(n * fraction) if `fraction`
    is given), at least one. Non-finite scores rank last; equal scores are broken by id so the result is
    deterministic (ids must be mutually comparable, e.g. all str)."""
    if not results:
        return []
    keep = promoted_count(len(results), eta, fraction)
    sign = 1.0 if lower_is_better else -1.0

    def key(item):
        ident, score = item
        ok = score is not None and math.isfinite(score)
        return (not ok, sign * score if ok else 0.0, ident)

    return [ident for ident, _ in sorted(results, key=key)[:keep]]
