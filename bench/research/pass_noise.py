"""Which aggregate of a genome's passes is steadiest, from measurements the latency benchmark already cached.

Every genome of a bench_latency run was measured in --passes round-robin passes (bench/measure_passes.py). This
splits each genome's passes into the odd ones and the even ones (each half spread over the whole run), aggregates
each half alone, and counts the genomes whose two halves agree within 10% and within 5%: the noise ceiling of a
model judged against that aggregate. No model is fitted here, so the choice of aggregate cannot favour one.

Aggregates: the lowest pass, the median pass, and both again after the drift correction (each measurement divided
by the drift of its moment, read off the --neighbours measurements of other genomes on each side in time).

    .venv/bin/python bench/research/pass_noise.py bench/out/latency-v6/samples.json bench/out/latency-v9/samples.json ...
        [--neighbours 2 3 4 6] [--out bench/out/pass-noise]

Results go to --out/pass-noise.json and pass-noise.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the measuring helpers it shares

from bench_latency import QUANTITIES  # noqa: E402  what bench_latency measures per pass
from measure_passes import DRIFT_NEIGHBOURS, drift_corrected, odd_even_gaps  # noqa: E402


def halves_agree(values: np.ndarray, aggregate) -> tuple[float, float]:
    """Shares of rows (genomes) whose odd-pass and even-pass aggregates agree within 10% and within 5%."""
    gap = odd_even_gaps(values, aggregate)
    return float(np.mean(gap <= 0.10)), float(np.mean(gap <= 0.05))


def one_run(path: Path, neighbours: list[int]) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read it as a bench_latency samples.json ({e})") from None
    # one measurement setting (the most common one) and the passes every one of its genomes has
    settings = Counter(key.split(":", 1)[1] for key in cache if ":" in key)
    if not settings:
        raise SystemExit(f"{path}: no measurements in it")
    setting = settings.most_common(1)[0][0]
    entries = {k: e for k, e in cache.items() if k.endswith(setting) and "failed" not in e and "pass1" in e}
    passes = min(sum(1 for k in e if k.startswith("pass")) for e in entries.values())
    if passes < 2:
        raise SystemExit(f"{path}: needs at least 2 passes per genome, has {passes}")
    rows = {}
    for q in QUANTITIES:
        raw = np.array([[e[f"pass{p}"][q] for p in range(1, passes + 1)] for e in entries.values()])
        rows[f"{q}, lowest"] = halves_agree(raw, np.min)
        rows[f"{q}, median"] = halves_agree(raw, np.median)
        for n in neighbours:
            corrected = np.array(list(drift_corrected(entries, passes, q, n).values()))
            rows[f"{q}, drift-corrected lowest ({n} neighbours)"] = halves_agree(corrected, np.min)
            rows[f"{q}, drift-corrected median ({n} neighbours)"] = halves_agree(corrected, np.median)
    return {"samples": str(path), "setting": setting, "genomes": len(entries), "passes": passes, "ceilings": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", type=Path, nargs="+", help="bench_latency samples.json files (one per session)")
    ap.add_argument("--neighbours", type=int, nargs="+", default=[DRIFT_NEIGHBOURS])
    ap.add_argument("--out", type=Path, default=Path("bench/out/pass-noise"))
    args = ap.parse_args()
    if any(n < 1 for n in args.neighbours):
        raise SystemExit("--neighbours must be positive integers")
    runs = [one_run(p, args.neighbours) for p in args.samples]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pass-noise.json").write_text(json.dumps({"runs": runs}, indent=2))
    header = " | ".join(f"{r['samples']} ({r['genomes']} genomes, {r['passes']} passes)" for r in runs)
    lines = ["# Noise ceilings: odd passes against even passes, within 10% / within 5%", "",
             f"| aggregate | {header} |", "|---" * (len(runs) + 1) + "|"]
    for row in runs[0]["ceilings"]:
        lines.append(f"| {row} | " + " | ".join(f"{r['ceilings'][row][0]:.1%} / {r['ceilings'][row][1]:.0%}"
                                                 for r in runs) + " |")
    (args.out / "pass-noise.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
