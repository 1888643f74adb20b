"""The latency loop of a search, top to bottom: measured latency and memory as objectives.

    SearchConfig.target (the resolved Target)
      -> before training, each generation: profiles.latency.Prefilter, re-fitted on the run's measurements, rejects
         candidates predicted far over the target's latency budget (`prefilter`)
      -> the "profile" stage, for each candidate (`profile_stage`):
           here:      export.measure.build_for_measuring (the deployed variant in a scratch folder, its parity)
                      -> profiles.latency.measure (the protocol; inside measure_gate.measuring(), so training and
                         exports of the other workers on this machine wait) -> the run's store
                         (DIR/measurements.jsonl); the scratch folder is deleted
           off-device (the target's provider is missing here, or its instruction set differs, e.g. an arm64
                      board seen from an x86 host): a latency model fitted on the board data the run recorded
                      (`factory profiles import`) predicts, and the result says so
      -> the objectives "latency" and "memory" (factory.search.objectives) read the stage's result.

With neither a representative machine nor enough board data the run fails before training (`preflight`). Winners
are always re-measured by `factory run`: what the report calls latency is measured, never predicted.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from factory import measure_gate
from factory.errors import FactoryError
from factory.features import featurizer
from factory.search.config import stored_target
from profiles import latency as measured
from profiles.latency import MIN_SAMPLES_TO_PREDICT, PROFILE_REPEATS, RunMeasurements


def board_data(config) -> dict | None:
    """What a run that measures records in run.json of the shared board data it uses (profiles.latency.board_data)."""
    return None if config.target is None else measured.board_data(config.target)


def run_measurements(config, folder: Path | None, board: dict | None) -> RunMeasurements | None:
    """The measurement store of a run on `config.target` (None without a target)."""
    return None if config.target is None else RunMeasurements(config.target, folder, board)


# -- before the run ---------------------------------------------------------------------------------------------------
def preflight(ctx) -> None:
    """Fail early, before any training, when the latency objective can be neither measured nor predicted."""
    target = ctx.target
    if target is None:
        raise FactoryError("the latency and memory objectives need --target (which device to measure on)")
    ok, why = measured.representative_here(target)
    if ok:
        return
    records = RunMeasurements(target, board=measured.board_data(target)).records(board_only=True)
    n = len(measured.training_samples(records, target, target.latency_metric, featurizer(target)).budget)
    if n < MIN_SAMPLES_TO_PREDICT:
        raise FactoryError(
            f"target {target.name} cannot be measured here ({why}) and has {n} imported board measurements "
            f"(need {MIN_SAMPLES_TO_PREDICT}): profile probes on the board with `factory profiles pack` and the "
            f"runner, then `factory profiles import`")


def prefilter(config, store: RunMeasurements | None):
    """The static constraint of a run that optimises latency on a target with a latency budget (else None)."""
    if store is None or "latency" not in config.objectives or measured.budget_ms(config.target) is None:
        return None
    return measured.Prefilter(config.target, store.records, featurizer(config.target))


# -- the evaluation stage -------------------------------------------------------------------------------------------
def profile_stage(ctx) -> dict:
    """Evaluation stage "profile": measured (or, off-device, board-predicted) latency and memory."""
    target = stored_target(ctx.settings.get("target"))
    if target is None:
        return {"status": "error", "reason": "the latency and memory objectives need --target"}
    where = ctx.settings.get("measurements") or {}
    store = RunMeasurements(target, Path(where["folder"]) if where.get("folder") else None, where.get("board"))
    representative, why = measured.representative_here(target)
    if not representative:
        return _predicted(ctx.genome, target, store, why)
    model = ctx.artifacts.get("model")
    if model is None:  # latency does not depend on the weights: an untrained model measures the same
        from factory.model import LIVModel

        model = LIVModel(ctx.genome)
    m = measure_model(model, target, corpus=ctx.settings.get("corpus"))
    if store.path is not None:
        store.add(m, ctx.genome.to_dict())
    return {
        "source": "measured",
        "prefill_ms_p50": m["prefill_ms"]["p50"],
        "decode_ms_p50": m["decode_ms"]["p50"],
        "decode_ms_p95": m["decode_ms"]["p95"],
        "peak_rss_mb": m["peak_rss_mb"],
        "model_rss_mb": m.get("model_rss_mb"),
        "file_mb": m["file_mb"],
        "variant": m["variant"],
        "protocol_version": m["protocol_version"],
    }


def measure_model(model, target, repeats: int = PROFILE_REPEATS, corpus: str | None = None) -> dict:
    """Export `model` as the target's deployed variant in a scratch folder, check its parity, measure it here and
    delete the folder; returns the measurement (profiles.latency.measure)."""
    from export.measure import build_for_measuring

    with tempfile.TemporaryDirectory(prefix="factory-measure-") as scratch:
        with measure_gate.working():  # heavy, multi-threaded: never beside a measurement
            calibration = _corpus(corpus) if target.quantization == "int8-static" else None
            graphs = build_for_measuring(model, target, Path(scratch), calibration)
        with measure_gate.measuring():  # training and exports on this machine pause meanwhile
            return measured.measure(graphs, target, repeats)


def _corpus(path: str | None):
    from factory.search.evaluate import load_corpus_cached

    return load_corpus_cached(path)


def _predicted(genome, target, store: RunMeasurements, why: str) -> dict:
    from factory.genome.metrics import peak_memory_bytes

    out = {"source": "predicted-from-board"}
    featurize = featurizer(target)
    for metric in ("decode", "prefill"):
        model = measured.fit(store.records(board_only=True), target, metric, featurize)
        if model is None:
            return {"status": "error", "reason": (
                f"{why}, and fewer than {MIN_SAMPLES_TO_PREDICT} board measurements are recorded for this run: run "
                f"`factory profiles pack ... --target {target.name}` on exports, the runner on the board, then "
                f"`factory profiles import RESULTS --target {target.name}`")}
        out[f"{metric}_predicted_ms"] = measured.predict(model, featurize(genome, metric))
        out[f"{metric}_model_accuracy"] = model.accuracy
    out["decode_ms_p95"] = out["decode_predicted_ms"]
    out["prefill_ms_p50"] = out["prefill_predicted_ms"]
    out["peak_rss_mb"] = peak_memory_bytes(genome, target.decode_context) / 1e6  # static estimate, no measurement
    return out
