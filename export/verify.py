"""Verification of exported graphs against PyTorch: the checker, then numerical parity.

Parity, for each prompt length (1, a medium one, and one longer than any window, kernel or latent block):
  - prefill: onnxruntime logits and state vs `LIVModel.prefill`;
  - decode: `steps` decode steps, onnxruntime fed its own prefill state, PyTorch fed its own, the same random
    next tokens in both: logits vs `LIVModel.step`;
  - continuation: each decoded logit row vs a PyTorch prefill of the whole sequence so far (the decode graph
    continues the sequence, it does not merely match `step`).
Max absolute differences are reported; ONNX-vs-PyTorch must stay within `tolerance` (1e-4 for float32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from export.graphs import StateTensor, torch_threads
from export.runtime import make_session
from factory.errors import FactoryError
from factory.model import LIVModel

TOLERANCE = 1e-4
# A decode step and the parallel form compute the same function in a different order (and the chunked forms
# in float32); their gap is a property of the operators, looser than the exporter's.
CONTINUATION_TOLERANCE = 1e-3
# onnxruntime's offline fusions (fused layer norms, MatMul+Add, attention kernels) re-order float32 sums; on a
# random-weight 6-layer genome of the latency benchmark that moved the prefill state by 1.6e-4 relative, which is
# arithmetic, not a wrong graph.
OPTIMIZED_TOLERANCE = 5e-4
DECODE_STEPS = 8


@dataclass
class ParityReport:
    prefill_max_abs: float = 0.0
    state_max_abs: float = 0.0
    # States such as un-normalised linear-attention sums can be large: judged relative to max(1, |state|).
    state_max_rel: float = 0.0
    decode_max_abs: float = 0.0
    continuation_max_abs: float = 0.0
    tolerance: float = TOLERANCE
    continuation_tolerance: float = CONTINUATION_TOLERANCE
    decode_steps: int = DECODE_STEPS
    batch: int = 2
    prompt_lengths: list[int] = field(default_factory=list)
    per_prompt: dict = field(default_factory=dict)
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def failure(self) -> str | None:
        if self.prefill_max_abs > self.tolerance:
            return f"prefill logits differ from PyTorch by {self.prefill_max_abs:.3g} (tolerance {self.tolerance:g})"
        if self.state_max_rel > self.tolerance:
            return (
                f"prefill state differs from PyTorch by {self.state_max_abs:.3g} ({self.state_max_rel:.3g} relative to "
                f"its largest value; tolerance {self.tolerance:g})"
            )
        if self.decode_max_abs > self.tolerance:
            return f"decode logits differ from PyTorch by {self.decode_max_abs:.3g} (tolerance {self.tolerance:g})"
        if self.continuation_max_abs > self.continuation_tolerance:
            return (
                f"decode does not continue the prefill: logits differ from a longer prefill by "
                f"{self.continuation_max_abs:.3g} (tolerance {self.continuation_tolerance:g})"
            )
        return None


def check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError
        raise FactoryError(f"{path.name} fails onnx.checker: {' '.join(str(e).split())[:300]}") from None


def default_prompt_lengths(genome) -> list[int]:
    """1, 2, a medium prompt, each side of every window, kernel and latent boundary of the genome, and one
    longer than all of them (decode steps from each then cross the boundaries too)."""
    boundaries = {genome.latents} | {c.window for c in genome.classes} | {c.kernel for c in genome.classes}
    lengths = {1, 2, 24, max(boundaries | {64}) + 9}
    for b in boundaries:
        if b > 2:
            lengths |= {b - 1, b, b + 1}
    return sorted(lengths)


def parity_cases(lengths: list[int], batch: int) -> list[tuple[int, int]]:
    """(batch, prompt length) pairs: every length at `batch`, plus batch 1 at the shortest and longest (the
    traced ranges start at 2, so size-1 axes are checked here)."""
    cases = [(batch, n) for n in lengths]
    return cases + [(1, n) for n in sorted({lengths[0], lengths[-1]}) if batch != 1]


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(1.0, float(np.abs(b).max())) if b.size and np.all(np.isfinite(b)) else 1.0
    return _max_abs(a, b) / scale


@torch.no_grad()
def parity(
    model: LIVModel,
    layout: list[StateTensor],
    prefill_path: Path,
    decode_path: Path,
    prompt_lengths: list[int] | None = None,
    steps: int = DECODE_STEPS,
    batch: int = 2,
    seed: int = 0,
    tolerance: float = TOLERANCE,
    threads: int | None = 1,
) -> ParityReport:
    with torch_threads(threads):
        return _parity(model, layout, prefill_path, decode_path, prompt_lengths, steps, batch, seed, tolerance, threads)


def _parity(model, layout, prefill_path, decode_path, prompt_lengths, steps, batch, seed, tolerance, threads):
    model.eval()
    genome = model.genome
    prompt_lengths = prompt_lengths or default_prompt_lengths(genome)
    prefill_sess, decode_sess = make_session(prefill_path, threads), make_session(decode_path, threads)
    names = [s.name for s in layout]
    report = ParityReport(tolerance=tolerance, decode_steps=steps, batch=batch, prompt_lengths=list(prompt_lengths))
    gen = torch.Generator().manual_seed(seed)
    for rows, length in parity_cases(list(prompt_lengths), batch):
        ids = torch.randint(0, genome.vocab_size, (rows, length + steps), generator=gen)
        prompt, continuation = ids[:, :length], ids[:, length:]
        ref_logits, ref_state = model.prefill(prompt)
        outs = prefill_sess.run(None, {"input_ids": prompt.numpy()})
        prefill_diff = _max_abs(outs[0], ref_logits.numpy())
        state_diff = max([_max_abs(o, ref_state[n].numpy()) for n, o in zip(names, outs[1:])], default=0.0)
        state_rel = max([_max_rel(o, ref_state[n].numpy()) for n, o in zip(names, outs[1:])], default=0.0)
        past = {f"past.{n}": o for n, o in zip(names, outs[1:])}
        decode_diff, cont_diff = 0.0, 0.0
        for k in range(steps):
            token = continuation[:, k : k + 1]
            position = torch.full((rows, 1), length + k, dtype=torch.long)
            ref_logits, ref_state = model.step(token, position, ref_state)
            outs = decode_sess.run(None, {"input_ids": token.numpy(), "position_ids": position.numpy(), **past})
            past = {f"past.{n}": o for n, o in zip(names, outs[1:])}
            decode_diff = max(decode_diff, _max_abs(outs[0], ref_logits.numpy()))
            longer = model(ids[:, : length + k + 1])[:, -1:]
            cont_diff = max(cont_diff, _max_abs(outs[0], longer.numpy()))
        report.per_prompt[f"batch{rows}-length{length}"] = {
            "prefill_max_abs": prefill_diff,
            "state_max_abs": state_diff,
            "state_max_rel": state_rel,
            "decode_max_abs": decode_diff,
            "continuation_max_abs": cont_diff,
        }
        report.prefill_max_abs = max(report.prefill_max_abs, prefill_diff)
        report.state_max_abs = max(report.state_max_abs, state_diff)
        report.state_max_rel = max(report.state_max_rel, state_rel)
        report.decode_max_abs = max(report.decode_max_abs, decode_diff)
        report.continuation_max_abs = max(report.continuation_max_abs, cont_diff)
    report.passed = report.failure() is None
    return report
