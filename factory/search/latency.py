"""The latency loop: measured latency and memory as search objectives.

For each candidate that survives the static checks and trains, the `profile` stage exports it (ONNX, the target's
quantization), checks parity, and measures it with onnxruntime under the target's protocol on this machine; the
measurement is appended to the target's store. It measures inside `factory.measure_gate.measuring()`: training
steps and exports of the other workers on this machine wait meanwhile (bench/research/bench_gate.py shows what
measuring beside them does to the numbers). When this machine cannot stand in for the target (its provider
is missing here, or its instruction set differs, e.g. an arm64 board seen from an x86 host), the stage instead
predicts from a latency model fitted on the measurements imported from the board (`factory profiles import`), and
says so in the result. With neither, the stage fails with the way out in its reason.

Before training, `LatencyPrefilter` rejects candidates whose predicted latency is far over the target's budget
(the model is re-fitted from the store as measurements arrive). Winners are always re-measured by `factory run`:
what the report calls latency is measured, never predicted.
"""

from __future__ import annotations

import math
import sys
import platform
import shutil
import tempfile
from pathlib import Path

from factory import measure_gate
from factory.errors import FactoryError

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


def _machine_isa() -> str:
    m = platform.machine().lower()
    return "arm64" if m in ("arm64", "aarch64") else "x86_64"


def representative_here(target) -> tuple[bool, str]:
    """Can a measurement on this machine stand for the target? (provider available, same instruction set)"""
    import onnxruntime as ort

    provider = target.providers[0]
    if provider not in ort.get_available_providers():
        return False, f"{provider} is not available on this machine"
    isa = getattr(target, "quantization_isa", "none") or "none"
    here = _machine_isa()
    if isa == "arm64" and here != "arm64":
        return False, f"target {target.name} is an arm64 device and this machine is {here}"
    if isa in ("avx2", "avx512_vnni") and here != "x86_64":
        return False, f"target {target.name} is an x86 device ({isa}) and this machine is {here}"
    return True, ""


def latency_metric(target) -> str:
    return getattr(target, "latency_metric", None) or "decode"


def budget_ms(target) -> float | None:
    return target.decode_ms_p95 if latency_metric(target) == "decode" else target.prefill_ms


# -- fitting from the store ------------------------------------------------------------------------------------------
def _comparable(measurement: dict, target) -> bool:
    """Measured with the target's current settings (a threads override or an edited prompt length is not)."""
    return (measurement.get("threads") == target.threads and measurement.get("provider") == target.provider
            and measurement.get("prompt_length") == target.prompt_length
            and measurement.get("decode_context") == target.decode_context)


def training_samples(target, metric: str, source: str | None = None
                     ) -> tuple[list[dict], list[float], list[str], list[float]]:
    """(per-family feature rows, measured ms of the budget's statistic, genome hashes, measured ms of the steady
    statistic) from the target's store (STATISTICS: decode p95 and p50, prefill p50 and fastest run); `source`
    "board" keeps board data only.

    Only measurements of the current protocol version taken with the target's current settings count. A genome
    measured more than once counts once, with the lowest value of each statistic: interference from other work only
    ever adds time (bench/bench_latency.py).
    """
    from factory.features import latency_features
    from factory.genome.schema import Genome, GenomeError
    from profiles.runner import PROTOCOL_VERSION
    from profiles.store import load_archived_genome, load_measurements

    steady_stat, budget_stat = STATISTICS[metric]
    lowest: dict[str, tuple[float, float]] = {}
    for record in load_measurements(target, protocol_version=PROTOCOL_VERSION):
        if source == "board" and not str(record.get("source", "")).startswith("board:"):
            continue
        h, m = record.get("genome_hash"), record.get("measurement", {})
        stats = m.get(f"{metric}_ms") or {}
        values = (stats.get(budget_stat), stats.get(steady_stat))
        if h is None or None in values or not all(math.isfinite(float(v)) for v in values) or not _comparable(m, target):
            continue
        before = lowest.get(h, (math.inf, math.inf))
        lowest[h] = (min(float(values[0]), before[0]), min(float(values[1]), before[1]))
    rows, ys, hashes, steady = [], [], [], []
    outdated = 0
    for h, (value, steady_value) in lowest.items():
        genome_dict = load_archived_genome(h)
        if genome_dict is None:
            continue
        try:
            genome = Genome.from_dict(genome_dict)
        except GenomeError:  # a genome of an older schema: its operators are not what this version builds
            outdated += 1
            continue
        rows.append(latency_features(genome, metric, target.prompt_length, target.decode_context))
        ys.append(value)
        hashes.append(h)
        steady.append(steady_value)
    if outdated:
        _say_once(f"latency model for {target.name}: skipped {outdated} stored measurement(s) of genomes in an older "
                  f"schema (their operators changed meaning)")
    return rows, ys, hashes, steady


_said: set[str] = set()


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)


def fit_latency_model(target, metric: str | None = None, source: str | None = None):
    """A latency model for the target from its stored measurements (None when there are too few), in the feature
    view that predicts held-out samples best (factory.features: pooled with few samples, per family with more)."""
    from factory.features import VIEWS
    from profiles.latency_model import fit_best_view

    metric = metric or latency_metric(target)
    rows, ys, _, steady = training_samples(target, metric, source)
    if len(ys) < MIN_SAMPLES_TO_PREDICT:
        return None
    return fit_best_view(metric, {name: [view(r) for r in rows] for name, view in VIEWS.items()}, steady, target=ys)


def predict_ms(model, genome, target) -> float:
    from factory.features import latency_features

    return model.predict_one(latency_features(genome, model.metric, target.prompt_length, target.decode_context,
                                              view=model.view))


class LatencyPrefilter:
    """Static rejection of candidates predicted to be far over the latency budget (re-fitted on demand)."""

    def __init__(self, target):
        self.target = target
        self.model = None

    def refresh(self) -> None:
        """Re-fit from the store (the search calls this before each generation)."""
        representative, _ = representative_here(self.target)
        self.model = fit_latency_model(self.target, source=None if representative else "board")

    def violation(self, genome) -> tuple[float, str]:
        budget = budget_ms(self.target)
        if self.model is None or budget is None:
            return 0.0, ""
        predicted = predict_ms(self.model, genome, self.target)
        if predicted > PREFILTER_MARGIN * budget:
            return predicted / budget - 1.0, f"predicted {latency_metric(self.target)} {predicted:.2f} ms > {PREFILTER_MARGIN}x budget {budget} ms"
        return 0.0, ""


# -- the evaluation stage -------------------------------------------------------------------------------------------
def export_for_target(model, target, out: Path, corpus: str | None = None) -> Path:
    """Export a model for the target (its quantization) into `out` and verify it (export.pipeline)."""
    from export.pipeline import ExportRequest, export_checkpoint
    from factory.data.corpus import load_corpus
    from factory.train import TrainConfig, TrainResult, save_checkpoint

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=".checkpoint-"))
    try:
        stub = TrainResult(status="ok", val_loss=float("nan"), val_bpb=float("nan"), tokens=0, steps=0, wall_s=0.0,
                           tokens_per_s=0.0)
        save_checkpoint(scratch, model, stub, TrainConfig(tokens=1), load_corpus(corpus))
        with measure_gate.working():  # heavy, multi-threaded: never beside a measurement
            export_checkpoint(ExportRequest(checkpoint=scratch, out=out, target=target, corpus=corpus))
        return out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure_model(model, target, workdir: Path, repeats: int = PROFILE_REPEATS, corpus: str | None = None) -> dict:
    """Export a model for the target, verify it, and measure it with onnxruntime here (the export is discarded)."""
    from profiles.profiler import profile_artifact

    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix="profile-"))
    try:
        export_for_target(model, target, scratch / "export", corpus)
        with measure_gate.measuring():  # training and exports on this machine pause meanwhile
            return profile_artifact(scratch / "export", target, repeats=repeats, record=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def profile_stage(ctx) -> dict:
    """Evaluation stage "profile": measured (or, off-device, board-predicted) latency and memory."""
    from targets import load_target

    name = ctx.settings.get("target")
    if not name:
        return {"status": "error", "reason": "the latency and memory objectives need --target"}
    target = load_target(name)
    representative, why = representative_here(target)
    if representative:
        model = ctx.artifacts.get("model")
        if model is None:  # latency does not depend on the weights: an untrained model measures the same
            from factory.model import LIVModel

            model = LIVModel(ctx.genome)
        workdir = ctx.workdir or Path(tempfile.gettempdir()) / "factory-profile"
        m = measure_model(model.eval(), target, workdir, corpus=ctx.settings.get("corpus"))
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
    out = {"source": "predicted-from-board"}
    for metric in ("decode", "prefill"):
        model = fit_latency_model(target, metric, source="board")
        if model is None:
            return {"status": "error", "reason": (
                f"{why}, and fewer than {MIN_SAMPLES_TO_PREDICT} board measurements are stored for it: run "
                f"`factory profiles pack ... --target {target.name}` on exports, the runner on the board, then "
                f"`factory profiles import RESULTS --target {target.name}`")}
        out[f"{metric}_predicted_ms"] = predict_ms(model, ctx.genome, target)
        out[f"{metric}_model_accuracy"] = model.accuracy
    out["decode_ms_p95"] = out["decode_predicted_ms"]
    out["prefill_ms_p50"] = out["prefill_predicted_ms"]
    from factory.genome.metrics import peak_memory_bytes

    out["peak_rss_mb"] = peak_memory_bytes(ctx.genome, target.decode_context) / 1e6  # static estimate, no measurement
    return out


# -- objectives -------------------------------------------------------------------------------------------------------
def _latency(genome, record, ctx) -> float:
    from targets import load_target

    p = record.measurements["profile"]
    metric = latency_metric(load_target(ctx.target)) if ctx.target else "decode"
    return float(p["decode_ms_p95"] if metric == "decode" else p["prefill_ms_p50"])


def _memory(genome, record, ctx) -> float:
    return float(record.measurements["profile"]["peak_rss_mb"])


def _prefilter(config):
    """Static constraint for runs that optimise latency on a target with a latency budget."""
    from targets import load_target

    if not config.target or "latency" not in config.objectives:
        return None
    target = load_target(config.target)
    return LatencyPrefilter(target) if budget_ms(target) is not None else None


def _preflight(ctx) -> None:
    if not ctx.target:
        raise FactoryError("the latency and memory objectives need --target (which device to measure on)")
    check_target_measurable(ctx.target)


def register() -> None:
    from factory.search.objectives import Objective, register_constraint, register_objective, register_stage

    register_stage("profile", "factory.search.latency:profile_stage")
    register_objective(Objective("latency", _latency, needs=("profile",),
                                 label="latency on the target (ms)", preflight=_preflight,
                                 description="measured onnxruntime latency on the target (decode p95 or prefill p50)"))
    register_objective(Objective("memory", _memory, needs=("profile",),
                                 label="peak resident memory (MB)", preflight=_preflight,
                                 description="peak RSS of the onnxruntime process running the model"))
    register_constraint("latency_prefilter", _prefilter)


def check_target_measurable(target_name: str) -> None:
    """Fail early, before any training, when the latency objective can be neither measured nor predicted."""
    from targets import load_target

    target = load_target(target_name)
    ok, why = representative_here(target)
    if ok:
        return
    rows = training_samples(target, latency_metric(target), source="board")[0]
    if len(rows) < MIN_SAMPLES_TO_PREDICT:
        raise FactoryError(
            f"target {target.name} cannot be measured here ({why}) and has {len(rows)} imported board measurements "
            f"(need {MIN_SAMPLES_TO_PREDICT}): profile probes on the board with `factory profiles pack` and the "
            f"runner, then `factory profiles import`")
