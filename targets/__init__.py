"""Hardware targets: the named devices the factory designs models for, one TOML file each.

A target says how a model is run there (onnxruntime execution providers, threads, memory), what workload it is
measured on (prompt length, decode context), what it must meet (latency budgets, precision) and what the search
optimises under which constraints. Built-in targets live in `targets/builtin/*.toml`; a user's own target is any
`.toml` file with the same keys, passed by path wherever a target name is accepted
(`factory targets validate my-board.toml` checks one).

Schema (format 1; every key is a field of `Target`; unknown keys are rejected by name):

    name               str, required   letters, digits, '.', '_' or '-'; names the measurement store file too
    description        str, required   one line
    device_class       str, required   cpu | mobile | gpu
    providers          [str], required onnxruntime execution providers in priority order, e.g.
                                       ["CPUExecutionProvider"], ["CUDAExecutionProvider"]. A target is measured only
                                       where its first provider is available: never on a silent fallback.
    [provider_options.<Provider>]      optional; options passed to that provider (values become strings)
    threads            int, required   onnxruntime intra-op threads (inter-op is always 1: see profiles)
    memory_limit_bytes int | str       optional; memory the model process may use on the device; "512MiB",
                                       "1GiB", "300MB" or a plain integer of bytes
    prompt_length      int, required   prefill length: time to first token is measured for a prompt this long
    decode_context     int, required   tokens already in the context when the per-token decode step is timed
    prefill_ms         float           optional; budget for prefill of `prompt_length` tokens (milliseconds)
    decode_ms_p95      float           optional; budget for the 95th percentile of one decode step (milliseconds)
    latency_metric     str             optional; prefill | decode: what the `latency` objective minimises
                                       (default: prefill when only `prefill_ms` is set, else decode)
    precision          str, required   float32 | float16 | int8: the arithmetic the deployed model uses
    quantization       str, required   none | int8-dynamic | int8-static | float16 (must agree with precision)
    quantization_isa   str             optional; arm64 | avx2 | avx512_vnni | none (int8 needs one; default none)
    objectives         [str], required search objectives, from quality, params, cache, flops, latency, memory
    [constraints]                      optional search constraints, each optional:
        max_params       int           parameters
        max_cache_bytes  int | str     decode state at `decode_context`
        max_memory_bytes int | str     weights + decode state (not above `memory_limit_bytes`)

Validation errors are one line naming the field, e.g. "threads: must be a positive integer, got -1".
"""

from targets.loader import (
    BUILTIN_DIR,
    Constraints,
    Target,
    builtin_names,
    list_targets,
    load_target,
    parse_target,
    validate_target_file,
)

__all__ = [
    "BUILTIN_DIR",
    "Constraints",
    "Target",
    "builtin_names",
    "list_targets",
    "load_target",
    "parse_target",
    "validate_target_file",
]
