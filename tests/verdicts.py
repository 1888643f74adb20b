"""The verdict that finalize's retrained values imply, recomputed here from the values alone (seed means, sample
stds, the tie rule, the resource comparison), to check final.json's verdict against."""

from __future__ import annotations

import math

import numpy as np


def _stats(values):
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def implied_comparisons(models: list[dict]) -> list[dict]:
    """(evolved hash, baseline name, verdict, beats, matches) for every evolved x baseline pair with results."""
    base = [m for m in models if m["role"] == "baseline" and m["values"]]
    evolved = [m for m in models if m["role"] == "evolved" and m["values"]]
    out = []
    for e in evolved:
        for b in base:
            (em, es), (bm, bs) = _stats(e["values"]), _stats(b["values"])
            spread, diff = max(es, bs), bm - em
            if len(e["values"]) < 2 or len(b["values"]) < 2:
                verdict = "inconclusive"
            else:
                verdict = "tie" if abs(diff) <= spread else ("better" if diff > 0 else "worse")
            smaller = e["cache_bytes"] < b["cache_bytes"] or e["params"] < b["params"]
            out.append({"evolved": e["hash"], "baseline": b["name"], "verdict": verdict,
                        "beats": verdict == "better" and smaller, "matches": verdict == "tie" and smaller})
    return out


def implied_verdict(models: list[dict]) -> tuple[str, set[str]]:
    """(the verdict's first word, the evolved hashes it may name)."""
    if not any(m["role"] == "baseline" and m["values"] for m in models):
        return "INCONCLUSIVE", set()
    comparisons = implied_comparisons(models)
    if not comparisons:
        return "NO", set()
    per: dict[str, list[dict]] = {}
    for c in comparisons:
        per.setdefault(c["evolved"], []).append(c)
    every = {h for h, cs in per.items() if all(c["beats"] for c in cs)}
    if every:
        return "YES", every
    some = {h for h, cs in per.items() if any(c["beats"] for c in cs)}
    if some:
        return "PARTLY", some
    if all(c["verdict"] == "inconclusive" for c in comparisons):
        return "INCONCLUSIVE", set()
    return "NO", {h for h, cs in per.items() if any(c["matches"] for c in cs)}


def check_final(final: dict) -> str:
    """Assert final.json's statistics, comparisons and verdict are what its values imply; returns the verdict."""
    for m in final["models"]:
        mean, std = _stats(m["values"])
        assert m["n_ok"] == len(m["values"])
        if m["values"]:
            assert math.isclose(m["mean"], mean, rel_tol=1e-12) and math.isclose(m["std"], std, abs_tol=1e-12), m
    implied = implied_comparisons(final["models"])
    got = [{k: c[k] for k in ("evolved", "baseline", "verdict", "beats", "matches")} for c in final["comparisons"]]
    assert sorted(got, key=str) == sorted(implied, key=str), (got, implied)
    word, named = implied_verdict(final["models"])
    verdict = final["verdict"]
    assert verdict.split(":")[0] == word, (verdict, word)
    if word in ("YES", "PARTLY") or (word == "NO" and named):
        assert any(h in verdict for h in named), (verdict, named)
    return verdict
