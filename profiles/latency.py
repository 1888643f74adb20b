"""The measuring half of the latency loop, behind five calls (numpy + onnxruntime; no torch):

    representative_here(target)            can a measurement on this machine stand for the target?
    measure(graphs, target)                one variant's prefill + decode ONNX files, measured with the protocol
    fit(records, target, metric, featurize) -> LatencyModel | None
    predict(model, features)               one genome's predicted ms
    Prefilter(target, records, featurize)  rejects a genome predicted far over the target's latency budget

and the measurements they read: `RunMeasurements`, one store per search run (DIR/measurements.jsonl, the run's own
measurements, each with its genome) plus the shared board data the run recorded. Board data is what
`factory profiles import` appended to the target's store in FACTORY_HOME; a run uses the records that store held
when it started, recorded in run.json by count and content hash (`board_data`), so the same run reads the same
board data on resume and a changed store is an error, not another run.

Genome features come from the caller (`featurize(genome, metric) -> {view: feature row}`, or None for a genome this
version cannot build: factory.features counts what the model dispatches, which needs torch).
"""

from __future__ import annotations

import hashlib
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from factory.errors import FactoryError
from profiles import store
from profiles.latency_model import LatencyModel, fit_best_view
from profiles.profiler import check_provider, measure_variant
from profiles.runner import PROTOCOL_VERSION

# Prefill repetitions per candidate in the search. The median of a few runs of a millisecond-scale prefill moves
# with every burst of interference on a shared machine; enough runs make a genome's lowest pass repeatable and the
# latency model's held-out prefill accuracy better (figures and command: bench/research/NOTES.md).
PROFILE_REPEATS = 30
# What the latency model is fitted on and what it predicts, per metric: (steady statistic, budget statistic). The
# fastest of a profile's prefill runs moves far less between profiles than their median on a shared machine, so a
# model fitted on it and scaled to the median predicts the median better from single profiles
# (bench/research/NOTES.md).
STATISTICS = {"prefill": ("min", "p50"), "decode": ("p50", "p95")}
PREFILTER_MARGIN = 1.5  # reject before training only when the prediction is this far over budget
MIN_SAMPLES_TO_PREDICT = 8
RUN_STORE = "measurements.jsonl"  # a search run's own measurements, in its folder

Featurize = Callable[[object, str], Optional[dict]]  # (genome or its dict, metric) -> {view: row} | None


# -- the target ------------------------------------------------------------------------------------------------------
def _machine_isa() -> str:
    m = platform.machine().lower()
    return "arm64" if m in ("arm64", "aarch64") else "x86_64"


def representative_here(target) -> tuple[bool, str]:
    """Can a measurement on this machine stand for the target? (provider available, same instruction set)"""
    import onnxruntime as ort

    if target.provider not in ort.get_available_providers():
        return False, f"{target.provider} is not available on this machine"
    isa, here = target.quantization_isa or "none", _machine_isa()
    if isa == "arm64" and here != "arm64":
        return False, f"target {target.name} is an arm64 device and this machine is {here}"
    if isa in ("avx2", "avx512_vnni") and here != "x86_64":
        return False, f"target {target.name} is an x86 device ({isa}) and this machine is {here}"
    return True, ""


def budget_ms(target) -> float | None:
    """The budget of the target's latency metric (decode p95 or prefill p50), None where it sets none."""
    return target.decode_ms_p95 if target.latency_metric == "decode" else target.prefill_ms


def latency_ms(profile: dict, target) -> float:
    """The latency objective's value from a profile stage's result: the statistic the target's budget is about."""
    decode = target is None or target.latency_metric == "decode"
    return float(profile["decode_ms_p95"] if decode else profile["prefill_ms_p50"])


# -- measuring -------------------------------------------------------------------------------------------------------
def measure(graphs, target, repeats: int = PROFILE_REPEATS) -> dict:
    """Measure one variant's graphs for `target` with the protocol of profiles/runner.py; nothing is recorded.

    `graphs` (export.measure.MeasuredGraphs) names the files (`prefill`, `decode`) and what the protocol feeds them
    (`variant`, `state`: the manifest's state entries, `vocab_size`, `genome_hash`, `isa`, `parity`)."""
    check_provider(target)
    manifest = {
        "genome_hash": graphs.genome_hash,
        "tokenizer": {"vocab_size": graphs.vocab_size},
        "state": graphs.state,
        "parity": graphs.parity,
        "variants": {graphs.variant: {"prefill": str(graphs.prefill), "decode": str(graphs.decode),
                                      "isa": graphs.isa}},
    }
    result = measure_variant(Path(graphs.prefill).parent, manifest, graphs.variant, target, repeats=repeats)
    result.pop("export_dir")  # a scratch folder, gone once measured
    return result


# -- one run's measurements ------------------------------------------------------------------------------------------
def _board_records(target) -> list[dict]:
    return [r for r in store.load_measurements(target) if str(r.get("source", "")).startswith("board:")]


def _content_hash(records: list[dict]) -> str:
    return hashlib.sha256("\n".join(r["id"] for r in records).encode()).hexdigest()[:16]


def board_data(target) -> dict:
    """What a new run records of the shared board data it uses: the target, how many records and their hash."""
    records = _board_records(target)
    return {"target": target.name, "store": "board records of FACTORY_HOME/measurements/<target>.jsonl",
            "records": len(records), "sha256": _content_hash(records)}


@dataclass
class RunMeasurements:
    """One search run's measurement store: its own measurements (`folder`/measurements.jsonl; none without a
    folder) and the board data recorded in its run.json (`board`, from `board_data`; None: no board data)."""

    target: object
    folder: Path | None = None
    board: dict | None = None
    _board: list | None = field(default=None, repr=False)

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else Path(self.folder) / RUN_STORE

    def board_records(self) -> list[dict]:
        """The board records the run recorded, checked against their hash (a FactoryError if they changed)."""
        if self.board is None or not self.board["records"]:
            return []
        if self._board is None:
            records = _board_records(self.target)[: self.board["records"]]
            if len(records) < self.board["records"] or _content_hash(records) != self.board["sha256"]:
                raise FactoryError(
                    f"the board measurements of {self.target.name} this run recorded ({self.board['records']} "
                    f"records, sha256 {self.board['sha256']}) are no longer in {store.measurements_path(self.target.name)}: "
                    "restore that file to continue this run")
            self._board = records
        return self._board

    def own_records(self) -> list[dict]:
        return [] if self.path is None else store.load_measurements(self.target, path=self.path)

    def records(self, board_only: bool = False) -> list[dict]:
        return self.board_records() + ([] if board_only else self.own_records())

    def add(self, measurement: dict, genome: dict) -> dict:
        """Append one of the run's measurements, with the genome measured (so the run's store fits a model alone)."""
        record = {**store.make_record(self.target, measurement, "local"), "genome": genome}
        store.append_records(self.target.name, [record], skip_known_ids=False, path=self.path)
        return record


# -- fitting and predicting ------------------------------------------------------------------------------------------
def comparable(measurement: dict, target) -> bool:
    """Measured with the target's current settings (a threads override or an edited prompt length is not)."""
    return (measurement.get("threads") == target.threads and measurement.get("provider") == target.provider
            and measurement.get("prompt_length") == target.prompt_length
            and measurement.get("decode_context") == target.decode_context)


@dataclass
class Samples:
    rows: dict[str, list[dict]]  # feature view -> one row per genome
    budget: list[float]  # measured ms of the budget's statistic
    steady: list[float]  # measured ms of the statistic the model is fitted on
    hashes: list[str]


def training_samples(records: list[dict], target, metric: str, featurize: Featurize) -> Samples:
    """One sample per genome measured (STATISTICS: decode p95 and p50, prefill p50 and the fastest run).

    Only measurements of the current protocol version taken with the target's current settings count. A genome
    measured more than once counts once, with the lowest value of each statistic: interference from other work only
    ever adds time (bench/bench_latency.py). A record's genome is its own or the one archived under its hash."""
    steady_stat, budget_stat = STATISTICS[metric]
    lowest: dict[str, tuple[float, float]] = {}
    genomes: dict[str, dict] = {}
    for record in records:
        h, m = record.get("genome_hash"), record.get("measurement", {})
        stats = m.get(f"{metric}_ms") or {}
        values = (stats.get(budget_stat), stats.get(steady_stat))
        if (h is None or record.get("protocol_version") != PROTOCOL_VERSION or None in values
                or not all(math.isfinite(float(v)) for v in values) or not comparable(m, target)):
            continue
        before = lowest.get(h, (math.inf, math.inf))
        lowest[h] = (min(float(values[0]), before[0]), min(float(values[1]), before[1]))
        if isinstance(record.get("genome"), dict):
            genomes[h] = record["genome"]
    samples = Samples({}, [], [], [])
    outdated = 0
    for h, (value, steady_value) in lowest.items():
        genome = genomes.get(h) or store.load_archived_genome(h)
        if genome is None:
            continue
        features = featurize(genome, metric)
        if features is None:  # a genome of an older schema: its operators are not what this version builds
            outdated += 1
            continue
        for view, row in features.items():
            samples.rows.setdefault(view, []).append(row)
        samples.budget.append(value)
        samples.steady.append(steady_value)
        samples.hashes.append(h)
    if outdated:
        _say_once(f"latency model for {target.name}: skipped {outdated} stored measurement(s) of genomes in an older "
                  f"schema (their operators changed meaning)")
    return samples


_said: set[str] = set()


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)


def fit(records: list[dict], target, metric: str, featurize: Featurize) -> LatencyModel | None:
    """A latency model of `metric` from the records (None when fewer than MIN_SAMPLES_TO_PREDICT genomes count), in
    the feature view that predicts held-out samples best (pooled with few samples, per family with more)."""
    samples = training_samples(records, target, metric, featurize)
    if len(samples.budget) < MIN_SAMPLES_TO_PREDICT:
        return None
    return fit_best_view(metric, samples.rows, samples.steady, target=samples.budget)


def predict(model: LatencyModel, features: dict) -> float:
    """Predicted ms of one genome from its features (`featurize`'s {view: row})."""
    return model.predict_one(features[model.view])


class Prefilter:
    """Static rejection of candidates predicted to be far over the target's latency budget. `records()` gives the
    run's measurements; `refresh()` re-fits from them (the search calls it before each generation)."""

    def __init__(self, target, records: Callable[[bool], list[dict]], featurize: Featurize):
        self.target, self.records, self.featurize = target, records, featurize
        self.model: LatencyModel | None = None

    def refresh(self) -> None:
        representative, _ = representative_here(self.target)
        self.model = fit(self.records(not representative), self.target, self.target.latency_metric, self.featurize)

    def violation(self, genome) -> tuple[float, str]:
        budget = budget_ms(self.target)
        if self.model is None or budget is None:
            return 0.0, ""
        predicted = predict(self.model, self.featurize(genome, self.model.metric))
        if predicted > PREFILTER_MARGIN * budget:
            return predicted / budget - 1.0, (f"predicted {self.target.latency_metric} {predicted:.2f} ms > "
                                              f"{PREFILTER_MARGIN}x budget {budget} ms")
        return 0.0, ""
