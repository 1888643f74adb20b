"""Static metrics, exact and from the genome alone (no module is built, nothing is trained).

- parameters: equal to the compiled module's unique parameters (tied layers counted once);
- decode state (cache) shapes and bytes at batch 1 for a context length and dtype: KV caches grow with context,
  recurrent and convolution states do not, sliding windows cap;
- matmul FLOPs per token for prefill (averaged over a prompt of `context` tokens) and decode (one token with
  `context` tokens in the state), including the lm head;
- a peak-memory estimate for a prefill of `context` tokens: weights + cache + the largest live activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from factory.genome.schema import Genome
from factory.ops import registry
from factory.ops.base import Flops
from factory.ops.common import norm_params
from factory.ops.perceiver import LatentCrossAttention

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def _is_cross(genome: Genome, i: int) -> bool:
    return bool(genome.latents) and i == 0


def param_count(genome: Genome) -> int:
    d, v = genome.d_model, genome.vocab_size
    total = v * d  # embedding (tied lm head adds nothing)
    if not genome.tie_embeddings:
        total += v * d
    total += (genome.n_layers + 1) * norm_params(genome.norm, d)
    owner, source, featurizer = genome.weight_owner(), genome.feature_source(), genome.featurizer_owner()
    for i in range(genome.n_layers):
        if owner[i] != i:
            continue  # tied: counted with its owner
        spec = genome.layer_spec(i)
        if _is_cross(genome, i):
            total += LatentCrossAttention.param_count(d, spec)
        else:
            total += registry.param_count(d, spec, reuse_features=source[i] is not None)
            if featurizer[i] != i:  # its featurizer is counted with the set's first member
                total -= registry.featurizer_params(d, spec, reuse_features=source[i] is not None)
    return total


def state_shapes(genome: Genome, batch: int, context: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the decode state after `context` tokens, keyed `<layer>.<kind>`."""
    out: dict[str, tuple[int, ...]] = {}
    source = genome.feature_source()
    for i in range(genome.n_layers):
        spec = genome.layer_spec(i)
        if genome.latents:
            if i == 0:
                shapes = LatentCrossAttention.state_shapes(genome.d_model, spec, batch, context)
            else:
                shapes = {}  # the latent stack is recomputed every step
        else:
            shapes = registry.state_shapes(genome.d_model, spec, batch, context, reuse_features=source[i] is not None)
        out.update({f"{i}.{k}": v for k, v in shapes.items()})
    return out


def state_elements(genome: Genome, context: int) -> int:
    total = 0
    for shape in state_shapes(genome, 1, context).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def cache_bytes(genome: Genome, context: int, dtype: str = "float32") -> int:
    return state_elements(genome, context) * DTYPE_BYTES[dtype]


def layer_flops(genome: Genome, context: int) -> list[Flops]:
    """Per layer, per token: prefill FLOPs averaged over a `context`-token prompt, and one decode step's at
    `context` (the embedding and logits are not a layer's: see `flops_per_token`)."""
    d = genome.d_model
    source = genome.feature_source()
    if not genome.latents:
        return [registry.flops(d, genome.layer_spec(i), context, reuse_features=source[i] is not None)
                for i in range(genome.n_layers)]
    n = min(context, genome.latents)
    out = [LatentCrossAttention.flops(d, genome.layer_spec(0), context, genome.latents)]
    for i in range(1, genome.n_layers):
        f = registry.flops(d, genome.layer_spec(i), n, reuse_features=source[i] is not None)
        # Prefill runs the stack once on n latents; decode recomputes it on all n latent positions per token.
        out.append(Flops(f.prefill * n / context, f.prefill * n))
    return out


def flops_per_token(genome: Genome, context: int) -> Flops:
    head = 2.0 * genome.d_model * genome.vocab_size
    total = Flops(0.0, 0.0)
    for f in layer_flops(genome, context):
        total += f
    if genome.latents:  # the logits of the n latent positions
        return total + Flops(head * min(context, genome.latents) / context, head)
    return total + Flops(head, head)


def peak_memory_bytes(genome: Genome, context: int, dtype: str = "float32") -> int:
    """Estimate for inference: weights + decode state at `context` + the largest live activations of a prefill
    of `context` tokens (the residual stream, one operator's intermediates and the logits), batch 1."""
    b = DTYPE_BYTES[dtype]
    tokens = min(context, genome.latents) if genome.latents else context
    largest_op = max(
        registry.activation_elements(genome.d_model, genome.layer_spec(i), tokens) for i in range(genome.n_layers)
    )
    activations = 2 * context * genome.d_model + largest_op + tokens * genome.vocab_size
    return param_count(genome) * b + cache_bytes(genome, context, dtype) + activations * b


@dataclass(frozen=True)
class StaticMetrics:
    params: int
    cache_bytes: int
    state_elements: int
    flops_prefill_per_token: float
    flops_decode_per_token: float
    peak_memory_bytes: int
    context: int
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def static_metrics(genome: Genome, context: int | None = None, dtype: str = "float32") -> StaticMetrics:
    context = context or genome.context
    f = flops_per_token(genome, context)
    return StaticMetrics(
        params=param_count(genome),
        cache_bytes=cache_bytes(genome, context, dtype),
        state_elements=state_elements(genome, context),
        flops_prefill_per_token=f.prefill,
        flops_decode_per_token=f.decode,
        peak_memory_bytes=peak_memory_bytes(genome, context, dtype),
        context=context,
        dtype=dtype,
    )
