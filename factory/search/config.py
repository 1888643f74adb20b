"""The settings of one search run, stored as DIR/run.json so that `--resume` replays the same run.

Settings that decide the trajectory (space, objectives, budgets, training, seed...) are frozen at the start; the
execution settings (workers, executor, Ray address) may change on resume because results do not depend on them
(see `executors`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields, replace

from factory.errors import FactoryError
from factory.presets import DEFAULTS, MAX_DEFAULT_WORKERS
from factory.presets import PRESETS as _PRESET_TABLE

RUN_FORMAT = "factory-search-run-1"
DEFAULT_EVALUATOR = "factory.search.evaluate:evaluate_request"

# The search's defaults and presets live in the one preset table (factory.presets); `PRESETS` here is its search
# half, name -> SearchConfig keyword arguments (for scripts that build a SearchConfig from a preset name).
PRESETS: dict[str, dict] = {name: p.search_settings() for name, p in _PRESET_TABLE.items()}


def default_workers() -> int:
    """One worker per core (up to 8), so each trains with 1 torch thread (threads = cores // workers).

    Measured on a shared 2-core machine (bench/README.md, search): a single worker with 2 threads was several
    times slower per candidate than with 1 thread, because the small matmuls of these models gain nothing from
    intra-op threads and oversubscribed threads spin. Parallel candidates scale instead."""
    from factory.search.executors import available_cores

    return max(1, min(MAX_DEFAULT_WORKERS, available_cores()))
EXECUTORS = ("local", "ray", "inline")


@dataclass(frozen=True)
class Budgets:
    """Hard constraints, checked statically before any training. None = no budget."""

    max_params: int | None = None
    max_cache_bytes: int | None = None
    max_memory_bytes: int | None = None  # estimated inference peak (weights + cache + activations)

    # budget field -> (static metric it bounds, flag name)
    METRICS = {"max_params": ("params", "--max-params"), "max_cache_bytes": ("cache_bytes", "--max-cache-bytes"),
               "max_memory_bytes": ("peak_memory_bytes", "--max-memory-bytes")}

    def active(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.METRICS if getattr(self, k) is not None}

    def violation(self, static: dict) -> tuple[float, str]:
        """(constraint violation >= 0, reason). Violation is the sum of relative excesses (0 = within budget)."""
        total, reasons = 0.0, []
        for key, limit in self.active().items():
            metric, flag = self.METRICS[key]
            value = static[metric]
            if value > limit:
                total += (value - limit) / max(limit, 1)
                reasons.append(f"{metric} {value:,} > {flag} {limit:,}")
        return total, "; ".join(reasons)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.METRICS}


@dataclass(frozen=True)
class SearchConfig:
    # search space (frozen global genes, as in STAR)
    n_layers: int = DEFAULTS["n_layers"]
    d_model: int = DEFAULTS["d_model"]
    context: int = DEFAULTS["context"]
    families: tuple[str, ...] = ()  # () = every registered family
    n_classes: int = 4
    # what is optimised, under which budgets
    objectives: tuple[str, ...] = DEFAULTS["objectives"]
    budgets: Budgets = field(default_factory=Budgets)
    metrics_context: int | None = None  # context the cache/flops/memory are measured at (None: `context`)
    dtype: str = "float32"  # bytes per element for cache and memory
    target: object | None = None  # the resolved targets.Target; run.json keeps all of its settings
    # evolution
    population: int = DEFAULTS["population"]
    generations: int = DEFAULTS["generations"]
    mutation_rate: float = 0.1
    class_swap_rate: float = 0.5
    elitism: int = 2
    seed: int = DEFAULTS["seed"]
    # evaluation
    corpus: str | None = None  # None: the embedded default corpus
    corpus_sha256: str = ""
    tokens: int = DEFAULTS["tokens"]
    # successive halving (multi-fidelity): every offspring trains on `tokens`, the best 1/eta of a generation's
    # offspring by val bpb train again on tokens * eta, and so on for `rungs` budgets. rungs = 1: off.
    rungs: int = DEFAULTS["rungs"]
    eta: int = DEFAULTS["eta"]
    seq_len: int = 0  # 0: min(128, context)
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    eval_windows: int = DEFAULTS["eval_windows"]
    mad_steps: int = 200
    evaluator: str = DEFAULT_EVALUATOR
    # execution (may change on resume)
    workers: int = field(default_factory=default_workers)
    executor: str = DEFAULTS["executor"]
    ray_address: str | None = None

    EXECUTION_FIELDS = ("workers", "executor", "ray_address")

    def __post_init__(self):
        if self.seq_len == 0:
            object.__setattr__(self, "seq_len", min(DEFAULTS["seq_len"], self.context))

    @property
    def context_for_metrics(self) -> int:
        return self.metrics_context or self.context

    def train_config(self, seed: int | None = None, tokens: int | None = None):
        from factory.train import TrainConfig

        return TrainConfig(tokens=tokens or self.tokens, seq_len=self.seq_len, batch_size=self.batch_size,
                           lr=self.lr, seed=self.seed if seed is None else seed, eval_windows=self.eval_windows)

    @property
    def fidelity(self) -> bool:
        return self.rungs > 1

    def rung_budgets(self) -> list[int]:
        """Training tokens of each rung, smallest first: tokens * eta^k for k = 0 .. rungs - 1."""
        if not self.fidelity:
            return [self.tokens]
        from factory.fidelity import rungs

        return rungs(self.tokens, self.tokens * self.eta ** (self.rungs - 1), self.eta)

    def rung_hashes(self) -> list[str]:
        """The train config hash of each rung (rung 0's is `train_config_hash()`)."""
        return [self.train_config_hash(tokens) for tokens in self.rung_budgets()]

    def train_config_hash(self, tokens: int | None = None) -> str:
        """Identifies how candidates are evaluated: a stored result is reused only under the same hash. `tokens`
        (a rung's budget) defaults to the run's `tokens`, so every rung of a multi-fidelity run has its own hash."""
        blob = {
            "train": {k: v for k, v in self.train_config(tokens=tokens).to_dict().items() if k != "threads"},
            "corpus": self.corpus_sha256,
            "objectives": list(self.objectives),
            "mad_steps": self.mad_steps if "mad" in self.objectives else None,
            "evaluator": self.evaluator,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]

    def validate(self) -> "SearchConfig":
        def need(cond, msg):
            if not cond:
                raise FactoryError(msg)

        for name in ("n_layers", "d_model", "context", "population", "generations", "tokens", "seq_len",
                     "batch_size", "eval_windows", "mad_steps", "workers", "n_classes"):
            value = getattr(self, name)
            flag = "--" + {"n_layers": "layers"}.get(name, name).replace("_", "-")
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{flag} must be a positive integer, got {value}")
        need(isinstance(self.rungs, int) and not isinstance(self.rungs, bool) and 1 <= self.rungs <= 8,
             f"--rungs must be an integer from 1 (off) to 8, got {self.rungs}")
        need(isinstance(self.eta, int) and not isinstance(self.eta, bool) and self.eta >= 2,
             f"--eta must be an integer of at least 2, got {self.eta}")
        need(not self.fidelity or "quality" in self.objectives,
             f"--rungs {self.rungs} promotes candidates by val bpb: the objectives must include quality "
             f"(got {','.join(self.objectives)})")
        need(self.population >= 2, f"--population must be at least 2, got {self.population}")
        need(self.seq_len <= self.context, f"--seq-len {self.seq_len} exceeds --context {self.context}")
        need(isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr),
             f"--lr must be a positive number, got {self.lr}")
        need(isinstance(self.seed, int) and self.seed >= 0, f"--seed must be a non-negative integer, got {self.seed}")
        need(self.executor in EXECUTORS, f"--executor must be one of {', '.join(EXECUTORS[:2])}, got {self.executor!r}")
        need(0.0 <= self.mutation_rate <= 1.0, "mutation_rate must be between 0 and 1")
        need(self.metrics_context is None or self.metrics_context > 0, "metrics context must be positive")
        return self

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Budgets):
                value = value.to_dict()
            elif f.name == "target" and value is not None:
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key == "target_fingerprint":  # runs that stored the target by name kept its hash beside it
                continue
            if key not in known:
                raise FactoryError(f"run.json: unknown setting {key!r} (written by a newer version?)")
            if key == "budgets":
                value = Budgets(**value)
            elif key == "target":
                value = stored_target(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def with_execution(self, **changes) -> "SearchConfig":
        bad = set(changes) - set(self.EXECUTION_FIELDS) - {"generations"}
        if bad:
            raise FactoryError(f"cannot change {sorted(bad)[0]} of an existing run")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def stored_target(value):
    """The Target of a stored configuration: its settings (a dict, as run.json and worker requests carry it), or
    the name of a built-in or the path of a .toml file (run.json files that stored the target by name); None."""
    if value is None or not isinstance(value, (str, dict)):
        return value
    from targets import load_target, parse_target

    if isinstance(value, str):
        return load_target(value)
    settings = {k: v for k, v in value.items() if v is not None and k != "source"}
    settings["constraints"] = {k: v for k, v in (settings.get("constraints") or {}).items() if v is not None}
    return parse_target(settings, source=value.get("source", ""))


def from_target(target, preset=None, overrides: dict | None = None) -> SearchConfig:
    """The one builder of a new run's configuration (`factory search`, `factory run`), validated.

    Defaults < `preset` (a name in factory.presets.PRESETS or a Preset) < `target` (a Target, a built-in's name or
    a .toml path: its objectives, budgets (constraints), decode context as the metrics context, and dtype (float16
    targets keep cache and memory in 2 bytes; others in 4, since int8 dynamic quantization keeps activations and
    state in float32)) < `overrides` (SearchConfig fields; None values are left out). `objectives` and
    `families` may be comma lists; the budgets `max_params`, `max_cache_bytes`, `max_memory_bytes` may be sizes
    like "64KiB". Without a preset the sequence length follows the context (min(128, context)) unless given.
    A stored run is never rebuilt through here: run.json is read as written (`SearchConfig.from_dict`)."""
    from factory.presets import Preset

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    settings = {**DEFAULTS, "seq_len": 0}
    if preset is not None:
        if not isinstance(preset, Preset):
            if preset not in _PRESET_TABLE:
                raise FactoryError(f"--preset must be one of {', '.join(_PRESET_TABLE)}, got {preset!r}")
            preset = _PRESET_TABLE[preset]
        settings.update(preset.search_settings())
    budgets = dict.fromkeys(Budgets.METRICS)
    if target is not None:
        from targets import load_target

        target = load_target(target)  # raises FactoryError with a one-line reason
        settings.update(target=target, objectives=tuple(target.objectives), metrics_context=target.decode_context,
                        dtype="float16" if target.precision == "float16" else "float32")
        budgets.update(target.constraints.to_dict())
    if "eta" in overrides and overrides.get("rungs", 1) < 2:
        raise FactoryError(f"--eta {overrides['eta']} only matters with successive halving: add --rungs 2 or more")
    for key in ("objectives", "families"):
        if isinstance(overrides.get(key), str):
            overrides[key] = tuple(x.strip() for x in overrides[key].split(",") if x.strip())
    for key, (_, flag) in Budgets.METRICS.items():
        if key in overrides:
            budgets[key] = parse_count(overrides.pop(key), flag, allow_zero=key == "max_cache_bytes",
                                       units=key != "max_params")
    known = {f.name for f in fields(SearchConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise FactoryError(f"unknown setting {unknown[0]!r}")
    settings.update(overrides)
    from factory.search.objectives import resolve_objectives

    try:
        resolve_objectives(settings["objectives"])  # unknown objective: one line now, before anything else
    except Exception as e:
        if target is not None and "objectives" not in overrides:
            raise FactoryError(f"target {target.name}: {e}; choose others with --objectives (e.g. quality,cache)") from None
        raise
    return SearchConfig(budgets=Budgets(**budgets), **settings).validate()


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BYTES = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_count(text: str | int | None, flag: str, allow_zero: bool = False, units: bool = True) -> int | None:
    """A budget: an integer, optionally with a byte unit ("64MiB", "1.5GB", "300kB"). Negative -> FactoryError."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _BYTES.match(str(text))
        unit = m.group(2).lower() if m else None
        if unit is not None and not units and unit:
            unit = None
        if m is None or unit not in _BYTE_UNITS:
            raise FactoryError(f"{flag} must be a non-negative integer{' or a size like 64MiB' if units else ''}, "
                               f"got {text!r}")
        value = int(float(m.group(1).replace("_", "")) * _BYTE_UNITS[unit])
    if value < 0 or (value == 0 and not allow_zero):
        raise FactoryError(f"{flag} must be {'>= 0' if allow_zero else 'a positive integer'}, got {text}")
    return value
