"""Latency-loop benchmark for a target measurable on this machine (default laptop-cpu):

1. latency-model accuracy: N random genomes of the search space (random weights: latency does not depend on
   them) are exported and measured with onnxruntime under the target's protocol, in --passes passes (decode: the
   lowest pass; prefill: the median of the drift-corrected passes, bench/measure_passes.py); the per-target
   latency model is cross-validated on them (k-fold: every genome predicted by a model fitted without it).
   Goal: >= 95% of predictions within +-10% (nn-Meter reports 99% on a phone CPU, for CNNs).
2. repeatability: two exports profiled 3 times each; spread of decode p50/p95 and prefill p50 (max/min - 1).
3. constraint satisfaction: with --run DIR (a `factory run` folder), the share of its re-measured models that meet
   the target's budgets.
4. with --holdout-last K, the model fitted on all but the last K genomes sampled predicts those K (genomes added
   after the features were chosen); a learning curve: the model fitted on n random genomes predicting the others,
   for growing n (how many measurements a target needs); with --compare SAMPLES_JSON, how much faster or slower
   the same exports measure in this session than in another (the machine's drift).

    .venv/bin/python bench/bench_latency.py [--target laptop-cpu] [--threads 2] [--genomes 24] [--repeats 30]
        [--passes 10] [--run runs/demo] [--holdout-last 8] [--compare bench/out/other/samples.json]

Measurements go to a private store under --out (not the user's), results to --out/latency.json and latency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from measure_passes import (distinct_samples, drift_corrected, export_all, export_for_target,  # bench/measure_passes.py: the measuring
                            measure_in_passes, odd_even_gaps)               # protocol of the benchmarks


LEARNING_SIZES = (8, 16, 32, 64, 128, 192, 256, 320)  # genomes the learning curve fits on (if 10 are left to judge)
LEARNING_SPLITS = 10  # random draws of the fitted genomes per size


def _without(*prefixes):  # the features but those starting with prefixes
    return lambda f: {k: v for k, v in f.items() if not k.startswith(prefixes)}


FEATURE_SETS = {
    # one price per family and quantity (factory.features, view "per_family")
    "per family": lambda f: f,
    # one price per quantity (view "pooled")
    "pooled": lambda f: __import__("factory.features", fromlist=["pooled"]).pooled(f),
    # per family without the dispatched-operation counts (per family and per operator): the genome's formulas alone
    "per family, without kops": _without("kops", "calls_"),
    # the operation count alone
    "kops only": lambda f: {"kops": sum(v for k, v in f.items() if k.startswith("kops"))},
}
def _written_unsplit(features: dict) -> dict:
    out = {k: v for k, v in features.items() if not k.startswith(("small_mb_", "large_mb_"))}
    for k, v in features.items():
        if k.startswith(("small_mb_", "large_mb_")):
            name = "written_mb_" + k.split("_mb_")[1]
            out[name] = out.get(name, 0.0) + v
    return out


COUNTED_ABLATIONS = {  # what is counted as PyTorch runs the model: label -> (metrics that have it, ablated features)
    "without the calls per operator": (("decode", "prefill"), _without("calls_")),
    "without the MB written as PyTorch runs": (("prefill",), _without("small_mb_", "large_mb_")),
    "MB written not split by tensor size": (("prefill",), _written_unsplit),
    "without the narrow products' GFLOP": (("prefill",), _without("narrow_gflop_")),
}


def live_intermediates_only(genome, prefill_features: dict, prompt_length: int) -> dict:
    """The prefill features with act_mb counting each operator's live intermediates (the peak-memory formula,
    registry.activation_elements) instead of its traffic (registry.traffic_elements): the ablation of the
    convolutions' unrolled inputs and the grouped projections' copies."""
    from factory.features import layer_family
    from factory.ops import registry

    out = dict(prefill_features)
    out.pop("shared_mb", None)  # the live-intermediate formula counts every layer's mask itself
    for i in range(genome.n_layers):
        spec, d = genome.layer_spec(i), genome.d_model
        extra = registry.traffic_elements(d, spec, prompt_length) - registry.activation_elements(d, spec, prompt_length)
        out[f"act_mb_{layer_family(genome, i)}"] -= extra * 4 / 1e6  # float32, as latency_features counts
    return out


def masks_per_layer(genome, prefill_features: dict, prompt_length: int) -> dict:
    """The prefill features with every masked attention layer counting its own mask in act_mb (as before
    shared_mb): the ablation of counting each distinct mask once per graph."""
    from factory.features import layer_family
    from factory.ops import registry

    out = dict(prefill_features)
    out.pop("shared_mb", None)
    for i in range(genome.n_layers):
        spec = genome.layer_spec(i)
        shared = sum(registry.shared_elements(genome.d_model, spec, prompt_length).values())
        out[f"act_mb_{layer_family(genome, i)}"] += shared * (2 if spec.get("differential") else 1) * 4 / 1e6
    return out


QUANTITIES = {"decode_p50": "decode", "decode_p95": "decode", "prefill_p50": "prefill", "prefill_min": "prefill"}
# A genome's measured value of each quantity over its passes: the aggregate whose odd and even halves agreed most
# often in five sessions' runs (bench/research/pass_noise.py; bench/research/NOTES.md). A decode step
# only ever gets slower: the lowest pass. Prefill also drifts with the machine's speed for minutes: the median of
# the drift-corrected passes.
AGGREGATES = {"decode_p50": "lowest", "decode_p95": "lowest",
              "prefill_p50": "drift-corrected median", "prefill_min": "drift-corrected median"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="measure with this many intra-op threads instead of the target's (recorded in the results)")
    ap.add_argument("--genomes", type=int, default=24)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None,
                    help="prefill repetitions per profile (default: the search's, profiles.latency.PROFILE_REPEATS)")
    ap.add_argument("--passes", type=int, default=10,
                    help="profile every export this many times, each pass after all of the previous one")
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--holdout-last", type=int, default=0, metavar="K",
                    help="also fit on all but the last K genomes sampled and predict those K (genomes never seen "
                         "while the features were chosen, when K covers the ones added since)")
    ap.add_argument("--compare", type=Path, default=None, metavar="SAMPLES_JSON",
                    help="another session's samples.json: how much faster or slower the same exports measure now")
    ap.add_argument("--out", type=Path, default=Path("bench/out/latency"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["FACTORY_HOME"] = str((args.out / "home").resolve())  # a private measurement store

    from dataclasses import replace

    from factory.features import VIEWS, latency_features
    from factory.genome.space import SearchSpace
    from factory.model import LIVModel
    from profiles.latency import PROFILE_REPEATS, STATISTICS, representative_here
    from factory.search.outputs import atomic_write
    from profiles.profiler import profile_artifact
    from profiles.latency_model import (_fit_views, _held_out_errors, accuracy_summary, cross_validate, fit_best_view,
                                        relative_errors)
    from profiles.runner import PROTOCOL_VERSION
    from targets import load_target

    args.repeats = PROFILE_REPEATS if args.repeats is None else args.repeats
    if args.repeats < 1:
        raise SystemExit("--repeats must be a positive integer")
    if not 0 <= args.holdout_last < args.genomes - 2:
        raise SystemExit("--holdout-last must be 0 or leave at least 3 of --genomes to fit on")
    other_session = None
    if args.compare:  # read before measuring: a bad file must not surface after an hour of passes
        try:
            other_session = json.loads(args.compare.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--compare {args.compare}: cannot read it as a samples.json ({e})") from None
    target = load_target(args.target)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be a positive integer")
        target = replace(target, threads=args.threads)
    ok, why = representative_here(target)
    if not ok:
        raise SystemExit(f"{target.name} is not measurable on this machine: {why}")
    space = SearchSpace.create(n_layers=args.layers, d_model=args.d_model, context=args.context)
    genomes = distinct_samples(space, args.genomes)

    # Every genome is exported once (kept under --out/exports), all before the first measurement, then measured
    # in --passes round-robin passes (bench/measure_passes.py says why). The aggregate of the passes (AGGREGATES)
    # is what the model is fitted on and judged against, and how far that aggregate moves (odd passes against even
    # ones) is the noise ceiling of any model. Measurements are cached per genome and protocol settings: a rerun
    # with more --genomes or --passes only measures what is new.
    cache_path = args.out / "samples.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    setting = (f"{target.fingerprint()}:threads={target.threads}:repeats={args.repeats}:protocol={PROTOCOL_VERSION}"
               ":with_min")  # entries from before the fastest prefill run was kept lack it

    def save_cache():
        atomic_write(cache_path, json.dumps(cache, indent=1))

    def profile(export_dir: Path) -> dict:  # timing only: peak memory is not what this benchmark models
        m = profile_artifact(export_dir, target, repeats=args.repeats, memory=False, record=True)
        return {q: m[f"{q.split('_')[0]}_ms"][q.split("_")[1]] for q in QUANTITIES}

    def exported(g) -> Path:
        export_dir = args.out / "exports" / g.hash()
        if not (export_dir / "manifest.json").is_file():
            export_for_target(LIVModel(g).eval(), target, export_dir)
        return export_dir

    t0 = time.time()
    if args.passes < 1:
        raise SystemExit("--passes must be a positive integer")
    passes = range(1, args.passes + 1)
    by_hash = {g.hash(): g for g in genomes}
    entries = {h: cache.setdefault(f"{h}:{setting}", {"hash": h}) for h in by_hash}
    exports = export_all(entries, lambda h: exported(by_hash[h]), save_cache)
    measure_in_passes(exports, entries, args.passes, profile, save_cache,
                      lambda m: f"decode p50/p95 {m['decode_p50']:.3f}/{m['decode_p95']:.3f} ms, "
                                f"prefill p50 {m['prefill_p50']:.2f} ms")

    measured = {h: e for h, e in entries.items() if "failed" not in e}
    per_pass = {q: (drift_corrected(measured, args.passes, q) if AGGREGATES[q].startswith("drift-corrected")
                    else {h: [e[f"pass{p}"][q] for p in passes] for h, e in measured.items()}) for q in QUANTITIES}
    aggregate = {q: np.median if AGGREGATES[q].endswith("median") else np.min for q in QUANTITIES}
    samples, failed = [], []
    for g in genomes:
        entry = cache[f"{g.hash()}:{setting}"]
        if "failed" in entry:
            failed.append(entry)
            continue
        s = {"hash": g.hash(), "passes": [entry[f"pass{p}"] for p in passes]}
        s["lowest"] = {q: min(p[q] for p in s["passes"]) for q in QUANTITIES}
        s.update({q: float(aggregate[q](per_pass[q][g.hash()])) for q in QUANTITIES})
        s["features"] = {metric: latency_features(g, metric, target.prompt_length, target.decode_context)
                         for metric in ("decode", "prefill")}
        s["features"]["prefill, live intermediates only"] = live_intermediates_only(
            g, s["features"]["prefill"], target.prompt_length)
        s["features"]["prefill, masks per layer"] = masks_per_layer(g, s["features"]["prefill"], target.prompt_length)
        samples.append(s)

    # How far one measurement moves (the spread, max/min - 1, of each genome's passes), and how far the measured
    # value moves: the aggregate of the odd passes against that of the even ones, each half spread over the whole
    # run (the noise ceiling of a model judged against the aggregate), and the same for the lowest value.
    def ceiling(prefix: str, gaps: np.ndarray) -> dict:
        return {f"{prefix}within_10pct": float(np.mean(gaps <= 0.10)),
                f"{prefix}within_5pct": float(np.mean(gaps <= 0.05)), f"{prefix}median_gap": float(np.median(gaps))}

    noise = {}
    for q in QUANTITIES:
        raw = np.array([[p[q] for p in s["passes"]] for s in samples])
        gaps = raw.max(axis=1) / raw.min(axis=1) - 1.0
        noise[q] = {"passes_within_10pct": float(np.mean(gaps <= 0.10)), "median_gap": float(np.median(gaps)),
                    "max_gap": float(gaps.max())}
        if args.passes >= 2:
            values = np.array([per_pass[q][s["hash"]] for s in samples])
            noise[q].update({**ceiling("lowest_halves_", odd_even_gaps(raw, np.min)), "aggregate": AGGREGATES[q],
                             **ceiling("halves_", odd_even_gaps(values, aggregate[q]))})

    def steady_key(metric: str) -> str:  # what the factory fits a metric's model on (profiles.latency.STATISTICS)
        return f"{metric}_{STATISTICS[metric][0]}"

    rows_of = {metric: {v: [view(s["features"][metric]) for s in samples] for v, view in VIEWS.items()}
               for metric in set(QUANTITIES.values())}  # each genome's features in every view

    def chosen_and_predicted(metric: str, fitted_on, target, train, test):
        """The factory's model (view chosen by held-out error) fitted on the `train` genomes' `fitted_on` values,
        scaled to `target`, predicting the `test` genomes."""
        rows = rows_of[metric]
        chosen, _ = _fit_views(metric, {v: [r[i] for i in train] for v, r in rows.items()},
                               [fitted_on[i] for i in train], 5, [target[i] for i in train])
        return chosen.predict([rows[chosen.view][i] for i in test])

    accuracy = {}
    for quantity, metric in QUANTITIES.items():
        y = [s[quantity] for s in samples]
        steady = [s[steady_key(metric)] for s in samples]
        # what the factory fits: the view with the lower held-out error, its accuracy nested (chosen without the
        # held-out genomes), fitted on the steady statistic and scaled to this one
        rows_by_view = rows_of[metric]
        factory_model = fit_best_view(metric, rows_by_view, steady, target=y)
        accuracy[f"{quantity} (factory: {factory_model.view} view)"] = {
            k: v for k, v in factory_model.accuracy.items() if k != "views"}
        if AGGREGATES[quantity] != "lowest":  # the same model fitted on and judged against the lowest of the passes
            lowest_model = fit_best_view(metric, rows_by_view, [s["lowest"][steady_key(metric)] for s in samples],
                                         target=[s["lowest"][quantity] for s in samples])
            accuracy[f"{quantity} (factory, the lowest of the passes)"] = {
                k: v for k, v in lowest_model.accuracy.items() if k != "views"}
        for name, transform in FEATURE_SETS.items():
            rows = [transform(s["features"][metric]) for s in samples]
            accuracy[f"{quantity} ({name})"] = cross_validate(metric, rows, y)
        if metric == "prefill":  # what counting the convolutions' unrolled inputs adds
            rows = [s["features"]["prefill, live intermediates only"] for s in samples]
            accuracy[f"{quantity} (per family, act_mb of live intermediates only)"] = cross_validate(metric, rows, y)
            rows = [s["features"]["prefill, masks per layer"] for s in samples]  # what counting masks once adds
            accuracy[f"{quantity} (per family, each layer's attention mask counted)"] = cross_validate(metric, rows, y)
        for label, (metrics, transform) in COUNTED_ABLATIONS.items():  # what the counts of a PyTorch run add,
            if metric in metrics:                                         # fitted as the factory fits
                ablated = {v: [view(transform(s["features"][metric])) for s in samples] for v, view in VIEWS.items()}
                accuracy[f"{quantity} (factory, {label})"] = {
                    k: v for k, v in fit_best_view(metric, ablated, steady, target=y).accuracy.items() if k != "views"}
        # the same model judged against a single measurement (the first pass), as a search that measures once sees
        single = [s["passes"][0][quantity] for s in samples]
        single_steady = [s["passes"][0][steady_key(metric)] for s in samples]
        accuracy[f"{quantity} (factory, one pass)"] = {
            k: v for k, v in fit_best_view(metric, rows_by_view, single_steady, target=single).accuracy.items()
            if k != "views"}
        # fitted on single measurements as a search stores them, judged against the aggregate of the passes: with
        # and without the steady statistic
        for label, fitted_on in (("factory", single_steady), (f"fitted on {quantity} itself", single)):
            errors = _held_out_errors(np.asarray(y), 5, 0, lambda train, test, fitted_on=fitted_on:
                                      chosen_and_predicted(metric, fitted_on, single, train, test))
            accuracy[f"{quantity} ({label}, fitted on one pass, judged against all passes)"] = \
                accuracy_summary(errors)

    if args.holdout_last:
        if not 0 < args.holdout_last < len(samples) - 2:
            raise SystemExit(f"--holdout-last must leave at least 3 of the {len(samples)} genomes to fit on")
        fit, fresh = samples[: -args.holdout_last], samples[-args.holdout_last :]
        for quantity, metric in QUANTITIES.items():
            value = lambda s, q: s[q]  # noqa: E731  the aggregate of the passes
            variants = {"factory": (lambda f: f, value),
                        **{f"factory, {label}": (t, value) for label, (metrics, t) in COUNTED_ABLATIONS.items()
                           if metric in metrics}}
            if AGGREGATES[quantity] != "lowest":
                variants["factory, the lowest of the passes"] = (lambda f: f, lambda s, q: s["lowest"][q])
            for label, (transform, value) in variants.items():
                model = fit_best_view(
                    metric, {v: [view(transform(s["features"][metric])) for s in fit] for v, view in VIEWS.items()},
                    [value(s, steady_key(metric)) for s in fit], target=[value(s, quantity) for s in fit])
                predicted = model.predict([VIEWS[model.view](transform(s["features"][metric])) for s in fresh])
                measured = np.array([value(s, quantity) for s in fresh])
                accuracy[f"{quantity} ({label}, fitted on the first {len(fit)}, predicting the last {len(fresh)})"] = {
                    **accuracy_summary(relative_errors(predicted, measured)),
                    "median_signed_error": float(np.median(predicted / measured - 1.0))}

    # Learning curve: the factory's model fitted on n genomes drawn at random, judged on all the others, for
    # growing n (LEARNING_SPLITS draws each). How many measurements a target's store needs before the model is
    # trusted: the search already uses it from MIN_SAMPLES_TO_PREDICT on, as a pre-filter at PREFILTER_MARGIN.
    learning = {}
    for quantity, metric in QUANTITIES.items():
        steady = [s[steady_key(metric)] for s in samples]
        y = np.array([s[quantity] for s in samples])
        for n in [n for n in LEARNING_SIZES if n <= len(samples) - 10]:
            within, mean_error = [], []
            for split in range(LEARNING_SPLITS):
                order = np.random.default_rng(split).permutation(len(samples))
                train, test = order[:n], order[n:]
                errors = relative_errors(chosen_and_predicted(metric, steady, y, train, test), y[test])
                within.append(float(np.mean(errors <= 0.10)))
                mean_error.append(float(np.mean(errors)))
            learning[f"{quantity} {n}"] = {"quantity": quantity, "fitted_on": n, "splits": LEARNING_SPLITS,
                                           "within_10pct": float(np.mean(within)),
                                           "within_10pct_range": [min(within), max(within)],
                                           "mean_relative_error": float(np.mean(mean_error))}

    drift = None
    if other_session is not None:  # the same exports measured in another session: the machine's drift between the two
        ratios = {q: [] for q in QUANTITIES}
        for s in samples:
            entry = other_session.get(f"{s['hash']}:{setting}", {})
            then = [v for k, v in entry.items() if k.startswith("pass")]
            if then:
                for q in QUANTITIES:
                    ratios[q].append(s["lowest"][q] / min(p[q] for p in then))
        drift = {q: {"genomes": len(r), "median_now_over_then": float(np.median(r)) if r else None,
                     "min": float(min(r)) if r else None, "max": float(max(r)) if r else None}
                 for q, r in ratios.items()}

    # Repeatability: the first two genomes, each profiled three more times.
    repeated, spread = {}, {}
    for s in samples[:2]:
        repeat = [profile(exports[s["hash"]]) for _ in range(3)]
        for q in QUANTITIES:
            values = [r[q] for r in repeat]
            repeated[f"{s['hash'][:10]} {q}"] = values
            spread[f"{s['hash'][:10]} {q}"] = max(values) / min(values) - 1.0

    satisfaction = None
    if args.run:
        report = json.loads((args.run / "report.json").read_text())
        rows = [r for r in report["comparison"] if r.get("within_budget")]
        met = [r for r in rows if all(r["within_budget"].values())]
        satisfaction = {"models": len(rows), "within_all_budgets": len(met),
                        "share": len(met) / len(rows) if rows else None}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"target": target.name, "threads": target.threads,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_1min_at_end": load},
              "genomes": len(samples), "failed": failed, "wall_s": round(time.time() - t0, 1), "accuracy": accuracy,
              "learning_curve": learning, "measurement_noise": noise, "drift": drift, "repeatability": repeated,
              "repeatability_spread": spread, "constraint_satisfaction": satisfaction,
              "samples": samples, "command": " ".join(["bench/bench_latency.py"] + os.sys.argv[1:])}
    (args.out / "latency.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Latency loop on {target.name} ({target.threads} threads)", "",
             f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, 1-minute load at the end "
             f"{load}. Command: `.venv/bin/python {result['command']}`", "",
             f"{len(samples)} genomes measured, {len(failed)} failed to export or measure.", "",
             "| measure | value |", "|---|---|"]
    for k, a in accuracy.items():
        signed = f" / {a['median_signed_error']:+.1%} median signed error" if "median_signed_error" in a else ""
        lines.append(f"| {k}: held-out within +-10% / mean rel. error (n={a['n']}) | "
                     f"{a['within_10pct']:.0%} / {a['mean_relative_error']:.1%}{signed} |")
    for c in learning.values():
        lines.append(f"| {c['quantity']} (factory), fitted on {c['fitted_on']} random genomes, judged on the other "
                     f"{len(samples) - c['fitted_on']}: within +-10% (range over {c['splits']} draws) / mean rel. "
                     f"error | {c['within_10pct']:.0%} ({c['within_10pct_range'][0]:.0%}-"
                     f"{c['within_10pct_range'][1]:.0%}) / {c['mean_relative_error']:.1%} |")
    for q, n in noise.items():
        lines.append(f"| {q}: genomes whose {args.passes} passes agree within 10% / median spread | "
                     f"{n['passes_within_10pct']:.0%} / {n['median_gap']:.1%} |")
        if "halves_within_10pct" in n and n["aggregate"] != "lowest":
            lines.append(f"| {q}: {n['aggregate']} of odd passes vs of even passes within 10% / within 5% / median "
                         f"gap (noise ceiling) | {n['halves_within_10pct']:.0%} / {n['halves_within_5pct']:.0%} / "
                         f"{n['halves_median_gap']:.1%} |")
        if "lowest_halves_within_10pct" in n:
            lines.append(f"| {q}: lowest of odd passes vs lowest of even passes within 10% / within 5% / median gap "
                         f"(noise ceiling) | {n['lowest_halves_within_10pct']:.0%} / "
                         f"{n['lowest_halves_within_5pct']:.0%} / {n['lowest_halves_median_gap']:.1%} |")
    if drift is not None and not any(d["genomes"] for d in drift.values()):
        lines.append(f"| {args.compare} | no exports in common measured with these settings ({setting}) |")
    for q, d in (drift or {}).items():
        if d["genomes"]:
            lines.append(f"| {q}: this session over {args.compare} for the same {d['genomes']} exports, lowest "
                         f"values (median, range) | {d['median_now_over_then']:.3f}x ({d['min']:.2f}-{d['max']:.2f}) |")
    for k, s in spread.items():
        lines.append(f"| repeatability of {k} over 3 profiles (max/min - 1) | {s:.1%} |")
    if satisfaction:
        lines.append(f"| winners within all target budgets (re-measured) | {satisfaction['within_all_budgets']}"
                     f"/{satisfaction['models']} |")
    (args.out / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
