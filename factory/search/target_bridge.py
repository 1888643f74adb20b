"""Integration point with the `targets` package (hardware targets, written elsewhere in this project).

`target_defaults(name_or_path)` turns a target into search defaults: its objectives, its budgets
(constraints.max_params / max_cache_bytes / max_memory_bytes), the context the cache is measured at
(decode_context) and the element size of cache and memory (float16 targets: 2 bytes; others 4, since int8 dynamic
quantization keeps activations and state in float32). Explicit CLI flags override every one of them.
"""

from __future__ import annotations

from pathlib import Path

from factory.errors import FactoryError


def target_defaults(name_or_path: str) -> dict:
    try:
        import targets
    except ImportError:
        raise FactoryError("--target needs the targets package, which is not installed in this build") from None
    target = targets.load_target(name_or_path)  # raises FactoryError with a one-line reason
    constraints = target.constraints
    # Stored so that workers and objectives can load it again: the name of a built-in, else the file's full path.
    ref = target.name if target.source == "builtin" else str(Path(target.source).resolve())
    return {
        "target": ref,
        "target_fingerprint": target.fingerprint(),
        "objectives": tuple(target.objectives),
        "max_params": constraints.max_params,
        "max_cache_bytes": constraints.max_cache_bytes,
        "max_memory_bytes": constraints.max_memory_bytes,
        "metrics_context": target.decode_context,
        "dtype": "float16" if target.precision == "float16" else "float32",
    }
