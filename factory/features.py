"""Latency features of a genome: what a per-target latency model (profiles.latency_model) is fitted on.

    kops        thousands of tensor operations that one prefill of `prompt_length` tokens (or one decode step)
                dispatches in the genome's compiled model, counted by running it once with random weights. On
                small models onnxruntime's time is mostly per-node overhead, and the exported graph has about
                one node per operation (bench/bench_latency.py measures what this feature adds)
    layers_<f>  layers per operator family (a differential layer counts twice): each family's kernels cost
                differently per node
    m/gflops    the arithmetic: MFLOP of one decode step at `decode_context`, GFLOP of the prefill
    weights_mb  weights read (a CPU decode step is mostly bound by reading weights and the cache)
    state_mb    the cache or recurrent state at that context
    act_mb      prefill only: the operators' largest intermediate tensors for the prompt, summed over layers
                (chunked scans and score matrices are bound by moving these, not by their FLOPs, as the prefill
                rows of bench/bench_latency.py show; a decode step's intermediates are one token's)

Everything but `kops` comes from the genome's formulas alone; `kops` compiles the model and runs it once.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from factory.genome.codec import FAMILY_ORDER
from factory.genome.metrics import cache_bytes, flops_per_token, param_count
from factory.genome.schema import Genome
from factory.ops import registry

_OPS_CACHE: dict[tuple[str, int], dict[str, int]] = {}


class _CountOps(TorchDispatchMode):
    """Counts every operator call that reaches the dispatcher inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(genome: Genome, prompt_length: int) -> dict[str, int]:
    """{"prefill": ops of one prefill of `prompt_length` tokens (the model's context if it cannot take more),
    "decode": ops of one decode step after it}. Cached per genome and length."""
    from factory.model import LIVModel
    from factory.threads import torch_threads

    key = (genome.hash(), int(prompt_length))
    if key not in _OPS_CACHE:
        torch.manual_seed(0)
        model = LIVModel(genome).eval()

        def count(length: int) -> dict[str, int]:
            ids = torch.zeros(1, max(2, length), dtype=torch.long)
            with torch.no_grad(), torch_threads(1):
                with _CountOps() as prefill:
                    _, state = model.prefill(ids)
                with _CountOps() as decode:
                    model.step(ids[:, :1], torch.full((1, 1), ids.shape[1], dtype=torch.long), state)
            return {"prefill": prefill.n, "decode": decode.n}

        try:
            _OPS_CACHE[key] = count(int(prompt_length))
        except (RuntimeError, ValueError, IndexError):  # a model that cannot take prompts beyond its context
            _OPS_CACHE[key] = count(genome.context)
    return _OPS_CACHE[key]


def layer_counts(genome: Genome) -> dict[str, float]:
    counts = {f"layers_{f}": 0.0 for f in FAMILY_ORDER}
    for i in range(genome.n_layers):
        spec = genome.layer_spec(i)
        counts[f"layers_{spec.family}"] += 2.0 if spec.differential else 1.0
    counts["layers_latent_cross"] = 1.0 if genome.latents else 0.0
    return counts


def latency_features(genome: Genome, metric: str, prompt_length: int, decode_context: int, bytes_per_weight: int = 4) -> dict[str, float]:
    """Features for `metric` = "decode" (one token at `decode_context`) or "prefill" (`prompt_length` tokens)."""
    if metric not in ("decode", "prefill"):
        raise ValueError(f"unknown latency metric {metric!r} (decode | prefill)")
    weights_mb = param_count(genome) * bytes_per_weight / 1e6
    counts = layer_counts(genome)
    kops = dispatched_ops(genome, prompt_length)[metric] / 1000.0
    if metric == "decode":
        return {
            **counts,
            "kops": kops,
            "mflops": flops_per_token(genome, decode_context).decode / 1e6,
            "weights_mb": weights_mb,
            "state_mb": cache_bytes(genome, decode_context) / 1e6,
        }
    if metric == "prefill":
        p = float(prompt_length)
        return {
            **{k: v * p / 100.0 for k, v in counts.items()},  # per-token work per layer, in units of 100 tokens
            "kops": kops,
            "gflops": flops_per_token(genome, prompt_length).prefill * p / 1e9,
            "weights_mb": weights_mb,
            "state_mb": cache_bytes(genome, prompt_length) / 1e6,
            "act_mb": sum(registry.activation_elements(genome.d_model, genome.layer_spec(i), int(prompt_length))
                          for i in range(genome.n_layers)) * bytes_per_weight / 1e6,
        }
