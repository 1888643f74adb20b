"""Worker side: evaluate one candidate by running the evaluation stages its objectives need.

`evaluate_request(request) -> result` takes and returns plain JSON-able dicts, so the same function runs in a
spawned process, a Ray worker or in-process. It never raises: a failure becomes status diverged / oom / error with
a one-line reason, and the search goes on.

A stage is `fn(ctx: StageContext) -> dict`: it reads the genome and settings from `ctx`, may use what earlier
stages left in `ctx.artifacts` (e.g. the trained model under "model"), may write scratch files under
`ctx.workdir`, puts seconds and rates in `ctx.timings` (kept apart from measurements so that results compare
exactly across runs) and returns its measurements. Setting "status" (ok | diverged | oom | error) and "reason" in
the returned dict marks the candidate failed and stops later stages.

Request: {"hash", "genome": {...}, "stages": [name...], "stage_paths": {name: "module:function"},
"settings": {...}, "threads": int | None}.
Result: {"hash", "status", "reason", "measurements": {stage: {...}}, "timings": {...}, "wall_s"}.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

_CORPORA: dict = {}


@dataclass
class StageContext:
    genome: object  # factory.genome.Genome
    settings: dict
    results: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    workdir: Path | None = None


def resolve(dotted: str):
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def evaluate_request(request: dict) -> dict:
    import torch

    from factory.genome.schema import Genome

    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    status, reason = "ok", ""
    ctx = None
    try:
        genome = Genome.from_dict(request["genome"]).validate()
        workdir = request["settings"].get("workdir")
        ctx = StageContext(genome, request["settings"], workdir=Path(workdir) / request["hash"] if workdir else None)
        for stage in request["stages"]:
            started = time.perf_counter()
            try:
                out = dict(resolve(request["stage_paths"][stage])(ctx) or {})
            except MemoryError as e:
                out = {"status": "oom", "reason": _first_line(e)}
            except Exception as e:  # noqa: BLE001 - any failure of one candidate is recorded, not raised
                out = {"status": "error", "reason": _first_line(e)}
            ctx.timings[f"{stage}_s"] = round(time.perf_counter() - started, 3)
            stage_status, stage_reason = out.pop("status", "ok"), out.pop("reason", "")
            ctx.results[stage] = out
            if stage_status != "ok":
                status, reason = stage_status, f"{stage}: {stage_reason}"
                break
    except Exception as e:  # noqa: BLE001 - e.g. a genome the worker's registry cannot build
        status, reason = "error", _first_line(e)
    finally:
        torch.set_num_threads(old_threads)
    return {
        "hash": request["hash"],
        "status": status,
        "reason": reason,
        "measurements": ctx.results if ctx else {},
        "timings": ctx.timings if ctx else {},
        "wall_s": round(time.perf_counter() - t0, 3),
        "pid": os.getpid(),
    }


def load_corpus_cached(path: str | None, sha256: str = ""):
    from factory.data.corpus import load_corpus
    from factory.errors import FactoryError

    key = path or ""
    if key not in _CORPORA:
        corpus = load_corpus(path)
        if sha256 and corpus.sha256 != sha256:
            raise FactoryError(f"corpus {corpus.name} changed since the search started (sha256 differs)")
        _CORPORA[key] = corpus
    return _CORPORA[key]


# -- built-in stages ------------------------------------------------------------------------------------------------
def train_stage(ctx: StageContext) -> dict:
    """Train for the run's fixed token budget; measure validation bits per byte. With settings["checkpoint"] (a
    folder), the trained model is saved there too (model.safetensors + genome.json + metrics.json)."""
    from factory.train import TrainConfig, train

    settings = ctx.settings
    corpus = load_corpus_cached(settings.get("corpus"), settings.get("corpus_sha256", ""))
    cfg = TrainConfig(**settings["train"])
    model, result = train(ctx.genome, corpus, cfg)
    ctx.artifacts["model"] = model
    if settings.get("checkpoint") and result.status == "ok":  # finalize keeps the retrained models for export
        from factory.train import save_checkpoint

        save_checkpoint(settings["checkpoint"], model, result, cfg, corpus)
    ctx.timings["train_wall_s"] = result.wall_s
    ctx.timings["tokens_per_s"] = result.tokens_per_s
    out = {
        "status": result.status,
        "reason": result.reason,
        "val_loss": result.val_loss if math.isfinite(result.val_loss) else None,
        "val_bpb": result.val_bpb if math.isfinite(result.val_bpb) else None,
        "tokens": result.tokens,
        "steps": result.steps,
        "train_loss": result.train_loss,
    }
    return out


def mad_stage(ctx: StageContext) -> dict:
    """Mean accuracy over the six MAD synthetic tasks (Poli et al. 2024)."""
    from factory.train import mad_score

    scores = mad_score(ctx.genome, steps=int(ctx.settings.get("mad_steps", 200)),
                       seed=int(ctx.settings["train"]["seed"]))
    if not math.isfinite(scores["mean"]):
        return {"status": "diverged", "reason": "non-finite MAD score", **scores}
    return scores
