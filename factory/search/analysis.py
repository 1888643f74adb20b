"""Motif analysis (STAR's analysis of evolved backbones): what the front is made of, against everything evaluated.

For each group of genomes (the archive front, the final population, every successfully evaluated genome):
- LIV class frequencies: share of layers of each family, and share of genomes that use it;
- sharing patterns: share of layers that tie weights to an earlier layer, or reuse an earlier layer's features,
  overall and per family; share of layers using the differential or augmented-shortcut variants;
- recurring k-layer motifs (k = 2, 3): family n-grams over consecutive layers, with the share of windows and of
  genomes containing them.
`enrichment` compares the front with all evaluated genomes (ratio of shares; > 1: the front favours it).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from factory.genome.schema import Genome
from factory.ops import registry
from factory.search.config import SearchConfig
from factory.io import atomic_write
from factory.search.outputs import feasible_rows, front_rows, reached_rows, rows_of_run
from factory.search.store import Store

MOTIF_LENGTHS = (2, 3)


def _families(g: Genome) -> list[str]:
    return [registry.form(g.layer_spec(i)) for i in range(g.n_layers)]  # short_conv / long_conv for the conv family


def group_stats(genomes: list[Genome]) -> dict:
    n = len(genomes)
    layers = Counter()
    having = Counter()
    tied, reuse, diff, shortcut = Counter(), Counter(), Counter(), Counter()
    motifs = {k: Counter() for k in MOTIF_LENGTHS}
    motif_genomes = {k: Counter() for k in MOTIF_LENGTHS}
    total_layers = 0
    for g in genomes:
        fams = _families(g)
        total_layers += len(fams)
        layers.update(fams)
        having.update(set(fams))
        owner, source = g.weight_owner(), g.feature_source()
        for i, fam in enumerate(fams):
            spec = g.layer_spec(i)
            if owner[i] != i:
                tied[fam] += 1
            if source[i] is not None:
                reuse[fam] += 1
            if spec.get("differential"):
                diff[fam] += 1
            if spec.get("shortcut"):
                shortcut[fam] += 1
        for k in MOTIF_LENGTHS:
            grams = ["-".join(fams[i : i + k]) for i in range(len(fams) - k + 1)]
            motifs[k].update(grams)
            motif_genomes[k].update(set(grams))

    def share(counter: Counter, denom: int) -> dict:
        return {key: round(v / denom, 4) for key, v in counter.most_common()} if denom else {}

    def per_family(counter: Counter) -> dict:
        return {fam: round(counter[fam] / layers[fam], 4) for fam in sorted(counter)}

    return {
        "genomes": n,
        "layers": total_layers,
        "family_layer_share": share(layers, total_layers),
        "family_genome_share": share(having, n),
        "sharing": {
            "tied_layer_share": round(sum(tied.values()) / total_layers, 4) if total_layers else 0.0,
            "feature_reuse_layer_share": round(sum(reuse.values()) / total_layers, 4) if total_layers else 0.0,
            "differential_layer_share": round(sum(diff.values()) / total_layers, 4) if total_layers else 0.0,
            "shortcut_layer_share": round(sum(shortcut.values()) / total_layers, 4) if total_layers else 0.0,
            "tied_by_family": per_family(tied),
            "feature_reuse_by_family": per_family(reuse),
        },
        "motifs": {
            str(k): [
                {"motif": m, "count": c, "window_share": round(c / sum(motifs[k].values()), 4),
                 "genome_share": round(motif_genomes[k][m] / n, 4)}
                for m, c in motifs[k].most_common()
            ]
            for k in MOTIF_LENGTHS
        },
    }


def _enrichment(front: dict, everyone: dict) -> dict:
    out = {"family_layer_share": {}, "motifs": {}}
    for fam, s in everyone["family_layer_share"].items():
        out["family_layer_share"][fam] = round(front["family_layer_share"].get(fam, 0.0) / s, 3) if s else None
    for k in map(str, MOTIF_LENGTHS):
        base = {m["motif"]: m["genome_share"] for m in everyone["motifs"][k]}
        top = {m["motif"]: m["genome_share"] for m in front["motifs"][k]}
        ranked = sorted(((round(top.get(m, 0.0) / s, 3), m) for m, s in base.items() if s), reverse=True)
        out["motifs"][k] = [{"motif": m, "ratio": r, "front_genome_share": top.get(m, 0.0), "all_genome_share": base[m]}
                            for r, m in ranked]
    return out


def analyse(store: Store, config: SearchConfig) -> dict:
    rows = rows_of_run(store, config)
    ok = feasible_rows(reached_rows(rows))  # each genome once (at the highest rung it reached)
    front = front_rows(rows, list(config.objectives))
    last = store.last_generation()
    final_pop = []
    if last is not None:
        by_hash = {r["hash"]: r for r in reached_rows(rows)}
        final_pop = [by_hash[p["hash"]] for p in store.population(last) if p["hash"] in by_hash]
    groups = {
        "front": group_stats([Genome.from_dict(r["genome"]) for r in front]),
        "final_population": group_stats([Genome.from_dict(r["genome"]) for r in final_pop]),
        "all_evaluated": group_stats([Genome.from_dict(r["genome"]) for r in ok]),
    }
    return {"format": "factory-search-motifs-1", "objectives": list(config.objectives), **groups,
            "enrichment_front_vs_all": _enrichment(groups["front"], groups["all_evaluated"])}


def write_motifs(out: Path, store: Store, config: SearchConfig) -> dict:
    data = analyse(store, config)
    atomic_write(Path(out) / "motifs.json", json.dumps(data, indent=2) + "\n")
    return data


def render(data: dict, console, top: int = 8) -> None:
    """Print the analysis as tables."""
    from rich.table import Table

    front, everyone = data["front"], data["all_evaluated"]
    t = Table(title=f"LIV classes: front ({front['genomes']} genomes) vs all evaluated ({everyone['genomes']})")
    for col in ("family", "front layers", "all layers", "ratio", "front genomes", "all genomes"):
        t.add_column(col, justify="left" if col == "family" else "right")
    for fam, s in everyone["family_layer_share"].items():
        ratio = data["enrichment_front_vs_all"]["family_layer_share"].get(fam)
        t.add_row(fam, f"{front['family_layer_share'].get(fam, 0):.0%}", f"{s:.0%}",
                  "-" if ratio is None else f"{ratio:.2f}", f"{front['family_genome_share'].get(fam, 0):.0%}",
                  f"{everyone['family_genome_share'].get(fam, 0):.0%}")
    console.print(t)
    s_front, s_all = front["sharing"], everyone["sharing"]
    t = Table(title="sharing and variants (share of layers)")
    for col in ("pattern", "front", "all"):
        t.add_column(col, justify="left" if col == "pattern" else "right")
    for key in ("tied_layer_share", "feature_reuse_layer_share", "differential_layer_share", "shortcut_layer_share"):
        t.add_row(key.replace("_layer_share", "").replace("_", " "), f"{s_front[key]:.0%}", f"{s_all[key]:.0%}")
    console.print(t)
    for k, motifs in data["enrichment_front_vs_all"]["motifs"].items():
        t = Table(title=f"{k}-layer motifs most enriched on the front (share of genomes containing them)")
        for col in ("motif", "front", "all", "ratio"):
            t.add_column(col, justify="left" if col == "motif" else "right")
        for m in motifs[:top]:
            t.add_row(m["motif"], f"{m['front_genome_share']:.0%}", f"{m['all_genome_share']:.0%}", f"{m['ratio']:.2f}")
        console.print(t)
