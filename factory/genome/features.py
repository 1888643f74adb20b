"""Latency features of a genome: what a per-target latency model is fitted on (static, from the genome alone).

Per-family layer counts carry each operator's fixed per-call overhead; FLOPs the arithmetic; weight and state bytes
the memory traffic (decode on a CPU is mostly bound by reading weights and the cache). Prefill features are the
same quantities for a whole prompt of `prompt_length` tokens.
"""

from __future__ import annotations

from factory.genome.codec import FAMILY_ORDER
from factory.genome.metrics import cache_bytes, flops_per_token, param_count
from factory.genome.schema import Genome


def layer_counts(genome: Genome) -> dict[str, float]:
    counts = {f"layers_{f}": 0.0 for f in FAMILY_ORDER}
    for i in range(genome.n_layers):
        spec = genome.layer_spec(i)
        counts[f"layers_{spec.family}"] += 2.0 if spec.differential else 1.0
    counts["layers_latent_cross"] = 1.0 if genome.latents else 0.0
    return counts


def latency_features(genome: Genome, metric: str, prompt_length: int, decode_context: int, bytes_per_weight: int = 4) -> dict[str, float]:
    """Features for `metric` = "decode" (one token at `decode_context`) or "prefill" (`prompt_length` tokens)."""
    weights_mb = param_count(genome) * bytes_per_weight / 1e6
    counts = layer_counts(genome)
    if metric == "decode":
        return {
            **counts,
            "mflops": flops_per_token(genome, decode_context).decode / 1e6,
            "weights_mb": weights_mb,
            "state_mb": cache_bytes(genome, decode_context) / 1e6,
        }
    if metric == "prefill":
        p = float(prompt_length)
        return {
            **{k: v * p / 100.0 for k, v in counts.items()},  # per-token work per layer, in units of 100 tokens
            "gflops": flops_per_token(genome, prompt_length).prefill * p / 1e9,
            "weights_mb": weights_mb,
            "state_mb": cache_bytes(genome, prompt_length) / 1e6,
        }
    raise ValueError(f"unknown latency metric {metric!r} (decode | prefill)")
