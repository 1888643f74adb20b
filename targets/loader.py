"""Loading and validating target TOML files (schema in the package docstring).

Pure Python on purpose: profiling code that runs without torch imports this module.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from factory.errors import FactoryError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

DEVICE_CLASSES = ("cpu", "mobile", "gpu")
PRECISIONS = ("float32", "float16", "int8")
QUANTIZATIONS = ("none", "int8-dynamic", "int8-static", "float16")
QUANTIZATION_ISAS = ("arm64", "avx2", "avx512_vnni", "none")
OBJECTIVES = ("quality", "params", "cache", "flops", "latency", "memory")
LATENCY_METRICS = ("prefill", "decode")
# Providers that put the work on a GPU-like device; a `gpu` target must list one of these first.
ACCELERATOR_PROVIDERS = (
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "DmlExecutionProvider",
    "WebGpuExecutionProvider",
    "CoreMLExecutionProvider",
)
# Which precision each quantization produces: the two keys must agree.
_PRECISION_OF_QUANTIZATION = {"none": "float32", "float16": "float16", "int8-dynamic": "int8", "int8-static": "int8"}
# Export variants (docs/artifact.md) that implement each quantization, best first.
_VARIANTS_OF_QUANTIZATION = {
    "none": ("optimized", "float32"),
    "float16": ("float16",),
    "int8-dynamic": ("int8-dynamic",),
    "int8-static": ("int8-static",),
}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BYTES_PATTERN = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Constraints:
    """Search constraints; None means unconstrained."""

    max_params: int | None = None
    max_cache_bytes: int | None = None
    max_memory_bytes: int | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Target:
    """One hardware target. Build it with `load_target` / `parse_target`, which validate every field."""

    name: str
    description: str
    device_class: str
    providers: tuple[str, ...]
    threads: int
    prompt_length: int
    decode_context: int
    precision: str
    quantization: str
    objectives: tuple[str, ...]
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    memory_limit_bytes: int | None = None
    prefill_ms: float | None = None
    decode_ms_p95: float | None = None
    latency_metric: str = "decode"
    quantization_isa: str = "none"
    constraints: Constraints = field(default_factory=Constraints)
    source: str = field(default="", compare=False)  # "builtin" or the file it came from

    def __hash__(self) -> int:  # provider_options is a dict, so the generated hash would fail
        return hash(self.fingerprint())

    @property
    def provider(self) -> str:
        """The provider the target is measured on (the first one)."""
        return self.providers[0]

    def session_provider_options(self) -> list[dict[str, str]]:
        """Options aligned with `providers`, in the form `onnxruntime.InferenceSession` takes."""
        return [dict(self.provider_options.get(p, {})) for p in self.providers]

    def preferred_variants(self) -> tuple[str, ...]:
        """Export variant names that implement this target's quantization, best first."""
        return _VARIANTS_OF_QUANTIZATION[self.quantization]

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Constraints):
                value = value.to_dict()
            elif isinstance(value, dict):
                value = {k: dict(v) for k, v in value.items()}
            out[f.name] = value
        return out

    def fingerprint(self) -> str:
        """Hash of every setting that affects a measurement or the search (not the description or source)."""
        settings = self.to_dict()
        for key in ("description", "source"):
            settings.pop(key)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- field checkers


def _fail(key: str, message: str) -> None:
    raise FactoryError(f"{key}: {message}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(key, f"must be a non-empty string, got {_show(value)}")
    if "\n" in value:
        _fail(key, "must be one line")
    return value.strip()


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        _fail(key, f"must be one of {', '.join(allowed)}, got {_show(value)}")
    return value


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(key, f"must be a positive integer, got {_show(value)}")
    return value


def _positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        _fail(key, f"must be a positive number of milliseconds, got {_show(value)}")
    return float(value)


def _byte_count(key: str, value: Any) -> int:
    """An integer of bytes, or a string with a unit: "512MiB", "1GiB", "300MB"."""
    if isinstance(value, str):
        match = _BYTES_PATTERN.match(value)
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _BYTE_UNITS:
            _fail(key, f"must be a byte count such as 536870912, \"512MiB\" or \"1GiB\", got {_show(value)}")
        value = int(float(match.group(1).replace("_", "")) * _BYTE_UNITS[unit])
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(key, f"must be a positive byte count, got {_show(value)}")
    return value


def _string_list(key: str, value: Any, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        _fail(key, f"must be a non-empty list of strings, got {_show(value)}")
    for item in value:
        if not isinstance(item, str):
            _fail(key, f"must be a list of strings, got item {_show(item)}")
        if allowed is not None and item not in allowed:
            _fail(key, f"{item!r} is not one of {', '.join(allowed)}")
    duplicates = sorted({item for item in value if value.count(item) > 1})
    if duplicates:
        _fail(key, f"lists {duplicates[0]!r} twice")
    return tuple(value)


def _reject_unknown(table: dict, known: tuple[str, ...], prefix: str = "") -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
            raise FactoryError(f"{prefix}{key}: unknown key{hint}")


# ------------------------------------------------------------------------------------------------ the parser

_REQUIRED = (
    "name",
    "description",
    "device_class",
    "providers",
    "threads",
    "prompt_length",
    "decode_context",
    "precision",
    "quantization",
    "objectives",
)
_OPTIONAL = (
    "provider_options",
    "memory_limit_bytes",
    "prefill_ms",
    "decode_ms_p95",
    "latency_metric",
    "quantization_isa",
    "constraints",
)
_CONSTRAINT_KEYS = tuple(f.name for f in fields(Constraints))


def _providers(value: Any) -> tuple[str, ...]:
    providers = _string_list("providers", value)
    for provider in providers:
        if not provider.endswith("ExecutionProvider"):
            _fail("providers", f"{provider!r} is not an onnxruntime execution provider name (e.g. CPUExecutionProvider)")
    return providers


def _provider_options(value: Any, providers: tuple[str, ...]) -> dict[str, dict[str, str]]:
    if not isinstance(value, dict):
        _fail("provider_options", "must be a table of tables, one per provider: [provider_options.CUDAExecutionProvider]")
    options: dict[str, dict[str, str]] = {}
    for provider, table in value.items():
        key = f"provider_options.{provider}"
        if provider not in providers:
            _fail(key, f"{provider!r} is not in providers ({', '.join(providers)})")
        if not isinstance(table, dict):
            _fail(key, f"must be a table of options, got {_show(table)}")
        for option, option_value in table.items():
            if isinstance(option_value, (dict, list)):
                _fail(f"{key}.{option}", f"must be a string, number or boolean, got {_show(option_value)}")
            # onnxruntime takes option values as strings; TOML booleans become "1"/"0" as its docs spell them.
            if isinstance(option_value, bool):
                option_value = int(option_value)
            options.setdefault(provider, {})[option] = str(option_value)
    return options


def _constraints(value: Any) -> Constraints:
    if not isinstance(value, dict):
        _fail("constraints", f"must be a table, got {_show(value)}")
    _reject_unknown(value, _CONSTRAINT_KEYS, prefix="constraints.")
    return Constraints(
        max_params=_positive_int("constraints.max_params", value["max_params"]) if "max_params" in value else None,
        max_cache_bytes=_byte_count("constraints.max_cache_bytes", value["max_cache_bytes"])
        if "max_cache_bytes" in value
        else None,
        max_memory_bytes=_byte_count("constraints.max_memory_bytes", value["max_memory_bytes"])
        if "max_memory_bytes" in value
        else None,
    )


def parse_target(data: dict, source: str = "") -> Target:
    """Validate a parsed TOML table and build the `Target`; raises FactoryError naming the field."""
    if not isinstance(data, dict):
        raise FactoryError(f"a target must be a TOML table, got {type(data).__name__}")
    _reject_unknown(data, _REQUIRED + _OPTIONAL)
    for key in _REQUIRED:
        if key not in data:
            _fail(key, "required field is missing")

    name = _string("name", data["name"])
    if not _NAME_PATTERN.match(name):
        _fail("name", f"must be letters, digits, '.', '_' or '-' (it names files), got {name!r}")
    providers = _providers(data["providers"])
    device_class = _choice("device_class", data["device_class"], DEVICE_CLASSES)
    if device_class == "gpu" and providers[0] not in ACCELERATOR_PROVIDERS:
        _fail("providers", f"a gpu target must list a GPU execution provider first, got {providers[0]}")

    precision = _choice("precision", data["precision"], PRECISIONS)
    quantization = _choice("quantization", data["quantization"], QUANTIZATIONS)
    if _PRECISION_OF_QUANTIZATION[quantization] != precision:
        _fail("quantization", f"{quantization!r} gives {_PRECISION_OF_QUANTIZATION[quantization]} weights but precision is {precision!r}")
    isa = _choice("quantization_isa", data.get("quantization_isa", "none"), QUANTIZATION_ISAS)
    if precision == "int8" and isa == "none":
        _fail("quantization_isa", f"int8 quantization needs an ISA preset (arm64, avx2 or avx512_vnni), got 'none'")
    if precision != "int8" and isa != "none":
        _fail("quantization_isa", f"only int8 quantization uses an ISA preset; use 'none' with {quantization!r}")

    prefill_ms = _positive_float("prefill_ms", data["prefill_ms"]) if "prefill_ms" in data else None
    decode_ms_p95 = _positive_float("decode_ms_p95", data["decode_ms_p95"]) if "decode_ms_p95" in data else None
    default_metric = "prefill" if prefill_ms is not None and decode_ms_p95 is None else "decode"
    latency_metric = _choice("latency_metric", data.get("latency_metric", default_metric), LATENCY_METRICS)

    memory_limit = _byte_count("memory_limit_bytes", data["memory_limit_bytes"]) if "memory_limit_bytes" in data else None
    constraints = _constraints(data.get("constraints", {}))
    if memory_limit is not None and constraints.max_memory_bytes is not None and constraints.max_memory_bytes > memory_limit:
        _fail(
            "constraints.max_memory_bytes",
            f"{constraints.max_memory_bytes} is above memory_limit_bytes ({memory_limit})",
        )

    return Target(
        name=name,
        description=_string("description", data["description"]),
        device_class=device_class,
        providers=providers,
        provider_options=_provider_options(data.get("provider_options", {}), providers),
        threads=_positive_int("threads", data["threads"]),
        memory_limit_bytes=memory_limit,
        prompt_length=_positive_int("prompt_length", data["prompt_length"]),
        decode_context=_positive_int("decode_context", data["decode_context"]),
        prefill_ms=prefill_ms,
        decode_ms_p95=decode_ms_p95,
        latency_metric=latency_metric,
        precision=precision,
        quantization=quantization,
        quantization_isa=isa,
        objectives=_string_list("objectives", data["objectives"], OBJECTIVES),
        constraints=constraints,
        source=source,
    )


# ------------------------------------------------------------------------------------------------ the loader


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def _read_file(path: Path, source: str) -> Target:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FactoryError(f"{path}: cannot read target file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise FactoryError(f"{path}: not a UTF-8 text file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FactoryError(f"{path}: not valid TOML: {' '.join(str(e).split())}") from None
    try:
        return parse_target(data, source=source)
    except FactoryError as e:
        raise FactoryError(f"{path}: {e}") from None


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path


def load_target(name_or_path: str | Path | Target) -> Target:
    """A built-in target by name, or a target file by path."""
    if isinstance(name_or_path, Target):
        return name_or_path
    text = str(name_or_path)
    path = Path(text).expanduser()
    if isinstance(name_or_path, Path) or _looks_like_path(text) or (path.is_file() and text not in builtin_names()):
        if not path.is_file():
            raise FactoryError(f"target file not found: {path}")
        return _read_file(path, source=str(path))
    if text in builtin_names():
        target = _read_file(BUILTIN_DIR / f"{text}.toml", source="builtin")
        if target.name != text:  # a builtin file's name key must match its file name
            raise FactoryError(f"builtin target file {text}.toml says name = {target.name!r}")
        return target
    close = difflib.get_close_matches(text, builtin_names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise FactoryError(
        f"unknown target {text!r}: {hint}known targets are {', '.join(builtin_names())} (or pass a path to a .toml file)"
    )


def list_targets() -> list[Target]:
    return [load_target(name) for name in builtin_names()]


def validate_target_file(path: str | Path) -> Target:
    """Load and validate a target file; raises FactoryError with the one-line reason."""
    return load_target(Path(path))
