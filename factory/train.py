"""Training, evaluation, checkpoints and generation (nanoGPT-style: one loop, read top to bottom).

AdamW, linear warm-up then cosine decay, gradient clipping, a fixed token budget, deterministic for a seed.
A non-finite loss stops the run with status "diverged" instead of raising; running out of memory gives "oom".
Checkpoints are a folder: model.safetensors + genome.json + metrics.json.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from factory import measure_gate
from factory.data.corpus import Corpus
from factory.data.mad import IGNORE, TASKS
from factory.data.tokenizer import ByteTokenizer
from factory.errors import FactoryError
from factory.io import atomic_write
from factory.genome import Genome, GenomeError
from factory.genome.metrics import static_metrics
from factory.model import LIVModel
from factory.threads import torch_threads

LN2 = math.log(2.0)


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 2_000_000  # training budget (tokens seen)
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    eval_windows: int = 64  # fixed validation windows of seq_len tokens

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class TrainResult:
    status: str  # ok | diverged | oom
    val_loss: float
    val_bpb: float
    tokens: int
    steps: int
    wall_s: float
    tokens_per_s: float
    train_loss: list[float] = field(default_factory=list)  # one point per log interval
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model: LIVModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    y = y[:, -logits.shape[1] :]  # Perceiver-AR predicts its latent positions only
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


def _optimizer(model: LIVModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model: LIVModel, corpus: Corpus, seq_len: int, windows: int, batch_size: int = 16) -> float:
    """Mean validation loss (nats per byte) over fixed windows."""
    model.eval()
    data = corpus.val_windows(seq_len, windows)
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        logits = model(chunk[:, :-1])
        y = chunk[:, 1:][:, -logits.shape[1] :]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def train(
    genome: Genome,
    corpus: Corpus,
    cfg: TrainConfig,
    progress=None,
    model: LIVModel | None = None,
) -> tuple[LIVModel, TrainResult]:
    """Train a fresh model (or `model`, to continue) for cfg.tokens tokens. `progress(step, steps, loss)` is
    called at log points."""
    if cfg.seq_len > genome.context:
        raise FactoryError(f"seq-len {cfg.seq_len} exceeds the genome's context {genome.context}")
    with torch_threads(cfg.threads):
        torch.manual_seed(cfg.seed)
        model = model or LIVModel(genome)
        model.train()
        opt = _optimizer(model, cfg)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        steps = cfg.steps
        log_every = max(1, steps // 50)
        curve: list[float] = []
        t0 = time.perf_counter()
        status, reason, done = "ok", "", 0
        try:
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, cfg)
                x, y = corpus.batch("train", cfg.batch_size, cfg.seq_len, gen)
                with measure_gate.working():  # waits while a latency measurement runs on this machine
                    loss = lm_loss(model, x, y)
                    if not torch.isfinite(loss):
                        status, reason = "diverged", f"non-finite loss at step {step}"
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                done = step + 1
                if step % log_every == 0 or step == steps - 1:
                    curve.append(round(loss.item(), 5))
                    if progress:
                        progress(step + 1, steps, loss.item())
        except RuntimeError as e:  # allocation failures surface as RuntimeError on CPU
            if "memory" not in str(e).lower():
                raise
            status, reason = "oom", str(e).splitlines()[0]
        wall = time.perf_counter() - t0
        tokens = done * cfg.batch_size * cfg.seq_len
        if status == "ok":
            with measure_gate.working():
                val = evaluate(model, corpus, cfg.seq_len, cfg.eval_windows)
            if not math.isfinite(val):
                status, reason = "diverged", "non-finite validation loss"
        else:
            val = float("nan")
    return model, TrainResult(
        status=status,
        val_loss=val,
        val_bpb=val / LN2 if math.isfinite(val) else float("nan"),
        tokens=tokens,
        steps=done,
        wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 1) if wall > 0 else 0.0,
        train_loss=curve,
        reason=reason,
    )


# -- MAD proxy score -----------------------------------------------------------------------------------------------
def mad_score(genome: Genome, tasks=None, steps: int = 200, n_train: int = 512, seed: int = 0, threads=None) -> dict:
    """Train a fresh model per task on procedurally generated data; report held-out accuracy per task and mean."""
    tasks = tasks or list(TASKS)
    scores = {}
    with torch_threads(threads):
        for k, name in enumerate(tasks):
            fn = TASKS[name]
            x, y = fn(n_train, seed=seed + k)
            xv, yv = fn(128, seed=seed + 1000 + k)
            seq = x.shape[1]
            g = genome if seq <= genome.context else replace(genome, context=seq)
            torch.manual_seed(seed)
            model = LIVModel(g.validate())
            cfg = TrainConfig(tokens=steps * 32 * seq, seq_len=seq, batch_size=32, lr=3e-3, seed=seed)
            opt = _optimizer(model, cfg)
            gen = torch.Generator().manual_seed(seed)
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, cfg)
                idx = torch.randint(0, len(x), (32,), generator=gen)
                with measure_gate.working():
                    loss = lm_loss(model, x[idx], y[idx])
                    if not torch.isfinite(loss):
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
            with torch.no_grad():
                model.eval()
                logits = model(xv)
                yy = yv[:, -logits.shape[1] :]
                mask = yy != IGNORE
                acc = (logits.argmax(-1)[mask] == yy[mask]).float().mean().item() if mask.any() else 0.0
            scores[name] = acc
    scores["mean"] = sum(scores[t] for t in tasks) / len(tasks)
    return scores


# -- checkpoints ---------------------------------------------------------------------------------------------------
def unique_state(model: LIVModel) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor (a featurizer used by several layers) once, under its first name."""
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if key not in seen:
            seen.add(key)
            tensors[k] = v.detach().contiguous()
    return tensors


def save_checkpoint(out: str | Path, model: LIVModel, result: TrainResult, cfg: TrainConfig, corpus: Corpus) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FactoryError(f"cannot create output directory {out}: {e.strerror}") from None
    genome = model.genome
    tensors = unique_state(model)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".model.")
    os.close(fd)
    save_file(tensors, tmp, metadata={"genome_hash": genome.hash(), "format": "factory-checkpoint-1"})
    os.replace(tmp, out / "model.safetensors")
    atomic_write(out / "genome.json", genome.to_json().encode())
    metrics = {
        "name": genome.name,
        "hash": genome.hash(),
        **result.to_dict(),
        "static": static_metrics(genome).to_dict(),
        "train_config": cfg.to_dict(),
        "train_config_hash": cfg.hash(),
        "corpus": {"name": corpus.name, "sha256": corpus.sha256, "bytes": corpus.n_bytes},
        "tokenizer": ByteTokenizer().to_dict(),
        "torch_version": torch.__version__,
    }
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True).encode())
    return out


def load_checkpoint(path: str | Path) -> tuple[LIVModel, dict]:
    path = Path(path)
    if not path.is_dir():
        raise FactoryError(f"checkpoint not found: {path}")
    for name in ("model.safetensors", "genome.json"):
        if not (path / name).is_file():
            raise FactoryError(f"not a checkpoint: {path} has no {name}")
    try:
        genome = Genome.from_json((path / "genome.json").read_text())
        genome.validate()
    except GenomeError as e:
        raise FactoryError(f"{path / 'genome.json'}: {e}") from None
    model = LIVModel(genome)
    try:
        tensors = load_file(path / "model.safetensors")
        expected = set(unique_state(model))
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
            raise ValueError(f"tensors do not match the genome (first mismatch: {missing[0]})")
        model.load_state_dict(tensors, strict=False)  # shared featurizers are stored once; the aliases follow
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise FactoryError(f"corrupt checkpoint {path / 'model.safetensors'}: {str(e).splitlines()[0]}") from None
    metrics = {}
    if (path / "metrics.json").is_file():
        try:
            metrics = json.loads((path / "metrics.json").read_text())
        except json.JSONDecodeError:
            raise FactoryError(f"corrupt checkpoint: {path / 'metrics.json'} is not valid JSON") from None
    model.eval()
    return model, metrics


# -- generation ------------------------------------------------------------------------------------------------------
def sample_next(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int) -> torch.Tensor:
    """logits [B, V] -> token ids [B, 1]. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


@torch.no_grad()
def generate(model: LIVModel, prompt: str, max_new: int, seed: int = 0, temperature: float = 0.8, top_k: int = 40) -> str:
    """Prefill the prompt once, then decode token by token through the recurrent forms."""
    tok = ByteTokenizer()
    ids = torch.from_numpy(tok.encode(prompt or "\n")).unsqueeze(0)
    gen = torch.Generator().manual_seed(seed)
    logits, state = model.prefill(ids)
    out = []
    position = ids.shape[1]
    for _ in range(max_new):
        nxt = sample_next(logits[:, -1], gen, temperature, top_k)
        out.append(int(nxt))
        logits, state = model.step(nxt, torch.tensor([[position]]), state)
        position += 1
    return tok.decode(out)
