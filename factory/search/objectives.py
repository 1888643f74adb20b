"""Objectives and evaluation stages: the two registries a search is configured from.

An *objective* turns what is known about a candidate into one float to minimise. It declares which evaluation
*stages* must have run for it (none for the static ones). A *stage* is a worker-side function that measures
something about a candidate (train it, score it on MAD, export and profile it...) and returns a JSON-able dict of
measurements, which the store keeps next to the objectives.

Stages are named by a dotted path ("module:function") instead of a function object, so that a worker process
(spawned, or a Ray worker on another machine) can import the same code; registering in the parent is enough.

Adding a measured objective takes two calls, e.g.:

    register_stage("power", "mypackage.power:power_stage")
    register_objective(Objective(
        name="energy", needs=("power",), label="energy per token (mJ)",
        fn=lambda genome, record, ctx: record.measurements["power"]["mj_per_token"]))

A stage function has the signature `fn(ctx: StageContext) -> dict` (see `factory.search.evaluate`). The built-in
measured objectives, latency and memory, need the "profile" stage (`factory.search.latency`, the latency loop).
`register_constraint` adds a static pre-training check (e.g. the latency prefilter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from factory.errors import FactoryError


@dataclass
class EvalRecord:
    """Everything known about one candidate: static metrics (always) and the stages' measurements."""

    hash: str
    status: str  # ok | diverged | oom | error | rejected
    reason: str = ""
    static: dict = field(default_factory=dict)  # StaticMetrics.to_dict() at the run's metrics context and dtype
    measurements: dict = field(default_factory=dict)  # stage name -> that stage's JSON-able result

    @property
    def val_bpb(self) -> float | None:
        value = self.measurements.get("train", {}).get("val_bpb")
        return float(value) if value is not None else None


@dataclass(frozen=True)
class ObjectiveContext:
    """Run-level facts an objective may need (the context its cache is measured at, the dtype, the Target)."""

    metrics_context: int
    dtype: str = "float32"
    target: object | None = None  # a targets.Target


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., float]  # (genome, EvalRecord, ObjectiveContext) -> float to minimise
    needs: tuple[str, ...] = ()  # evaluation stages that must have run, in order
    needs_training: bool = False
    label: str = ""  # axis label for plots and tables
    description: str = ""
    # Called once before a run starts (before any file is written): raise FactoryError to fail early, e.g. when a
    # latency objective can be neither measured nor predicted for the target.
    preflight: Callable[[ObjectiveContext], None] | None = None


# -- stages ------------------------------------------------------------------------------------------------------
_STAGES: dict[str, str] = {
    "train": "factory.search.evaluate:train_stage",
    "mad": "factory.search.evaluate:mad_stage",
    "profile": "factory.search.latency:profile_stage",
}


def register_stage(name: str, dotted_path: str) -> None:
    """Make an evaluation stage available by name; `dotted_path` is "package.module:function"."""
    if ":" not in dotted_path:
        raise ValueError(f"stage {name!r}: expected 'module:function', got {dotted_path!r}")
    _STAGES[name] = dotted_path


def stage_path(name: str) -> str:
    try:
        return _STAGES[name]
    except KeyError:
        raise FactoryError(f"unknown evaluation stage {name!r} (known: {', '.join(sorted(_STAGES))})") from None


def evaluation_request(config, genome_hash: str, genome: dict, stages, *, tokens: int, seed: int | None = None,
                       mad_steps: int | None = None, **extra) -> dict:
    """The one request a worker (`evaluator`) receives, for the search and for finalize: run `stages` on `genome`
    with the run's training settings at `tokens` (and `seed`, default the run's), its corpus, metrics context,
    dtype and target. `extra` settings: `workdir` (the search), `checkpoint` (finalize)."""
    train = config.train_config(seed=seed, tokens=tokens).to_dict()
    settings = {
        "train": {k: v for k, v in train.items() if k != "threads"},
        "corpus": config.corpus, "corpus_sha256": config.corpus_sha256,
        "mad_steps": config.mad_steps if mad_steps is None else mad_steps,
        "metrics_context": config.context_for_metrics, "dtype": config.dtype,
        "target": None if config.target is None else config.target.to_dict(), **extra,
    }
    return {"hash": genome_hash, "genome": genome, "stages": list(stages),
            "stage_paths": {s: stage_path(s) for s in stages}, "settings": settings}


def stages_for(objectives: list["Objective"]) -> list[str]:
    """The ordered union of the stages the objectives need."""
    out: list[str] = []
    for obj in objectives:
        for stage in obj.needs:
            if stage not in out:
                out.append(stage)
    return out


# -- objectives ----------------------------------------------------------------------------------------------------
_OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> None:
    for stage in objective.needs:
        stage_path(stage)  # fail now, not in a worker
    _OBJECTIVES[objective.name] = objective


def objective_names() -> list[str]:
    return list(_OBJECTIVES)


def get_objective(name: str) -> Objective:
    if name not in _OBJECTIVES:
        raise FactoryError(f"unknown objective {name!r}; known: {', '.join(_OBJECTIVES)}")
    return _OBJECTIVES[name]


def resolve_objectives(names) -> list[Objective]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise FactoryError("--objectives: give at least one objective")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FactoryError(f"--objectives: {dupes[0]!r} is listed twice")
    return [get_objective(n) for n in names]


# -- static constraints beyond the budgets ---------------------------------------------------------------------------
# name -> builder(SearchConfig, the run's RunMeasurements or None) -> constraint or None (not applicable to that
# run). A constraint has
# `violation(genome) -> (float >= 0, reason)` and, optionally, `refresh()`, called before each generation proposes
# children (e.g. to re-fit a latency predictor as measurements arrive). A violating genome is repaired or rejected
# before training, exactly like an over-budget one.
_CONSTRAINTS: dict[str, Callable] = {}


def register_constraint(name: str, builder: Callable) -> None:
    _CONSTRAINTS[name] = builder


def build_constraints(config, measurements=None) -> list:
    out = []
    for builder in _CONSTRAINTS.values():
        constraint = builder(config, measurements)
        if constraint is not None:
            out.append(constraint)
    return out


def _finite(value) -> float:
    value = float(value) if value is not None else math.nan
    return value if math.isfinite(value) else math.inf


def _quality(genome, record: EvalRecord, ctx: ObjectiveContext) -> float:
    return _finite(record.measurements.get("train", {}).get("val_bpb"))


def _mad(genome, record: EvalRecord, ctx: ObjectiveContext) -> float:
    score = record.measurements.get("mad", {}).get("mean")
    return 1.0 - float(score) if score is not None else math.inf


register_objective(Objective(
    "quality", _quality, needs=("train",), needs_training=True, label="validation bits per byte",
    description="val_bpb after the run's fixed token budget on the corpus"))
register_objective(Objective(
    "mad", _mad, needs=("mad",), needs_training=True, label="1 - MAD mean accuracy",
    description="1 - mean accuracy over the six MAD synthetic tasks"))
register_objective(Objective(
    "params", lambda g, r, c: float(r.static["params"]), label="parameters",
    description="unique parameters (tied layers counted once)"))
register_objective(Objective(
    "cache", lambda g, r, c: float(r.static["cache_bytes"]), label="decode cache (bytes)",
    description="decode state in bytes at the metrics context (static, exact)"))
register_objective(Objective(
    "flops", lambda g, r, c: float(r.static["flops_decode_per_token"]), label="decode FLOPs per token",
    description="matmul FLOPs of one decode step at the metrics context"))


# -- the measured objectives (the latency loop: factory.search.latency) ----------------------------------------------
def _latency(genome, record: EvalRecord, ctx: ObjectiveContext) -> float:
    from profiles.latency import latency_ms

    return latency_ms(record.measurements["profile"], ctx.target)


def _memory(genome, record: EvalRecord, ctx: ObjectiveContext) -> float:
    return float(record.measurements["profile"]["peak_rss_mb"])


def _measurable(ctx: ObjectiveContext) -> None:
    from factory.search.latency import preflight

    preflight(ctx)


def _latency_prefilter(config, measurements):
    from factory.search.latency import prefilter

    return prefilter(config, measurements)


register_objective(Objective(
    "latency", _latency, needs=("profile",), label="latency on the target (ms)", preflight=_measurable,
    description="measured onnxruntime latency on the target (decode p95 or prefill p50)"))
register_objective(Objective(
    "memory", _memory, needs=("profile",), label="peak resident memory (MB)", preflight=_measurable,
    description="peak RSS of the onnxruntime process running the model"))
register_constraint("latency_prefilter", _latency_prefilter)
