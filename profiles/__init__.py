"""Profiling exports with onnxruntime, here or on a board, and keeping the measurements.

- `profiles.runner`: THE measurement protocol (PROTOCOL_VERSION, documented in its docstring and in
  profiles/PROTOCOL.md) and the single-file on-device runner. Only numpy + onnxruntime; no factory imports.
- `profiles.profiler.profile_artifact`: measure one export for a target on this machine.
- `profiles.pack.make_pack` / `profiles.results.import_results`: probe packs for boards and their results.
- `profiles.store`: the per-target measurement store (`record_measurement`, `load_measurements`).
- `profiles.latency`: the latency loop's interface: `measure` (graphs from export.measure), `fit`, `predict`,
  `Prefilter`, and `RunMeasurements` (one search run's store, with the board data it recorded).

Nothing in this package imports torch: it runs where only onnxruntime is installed.
"""

from profiles.runner import PROTOCOL_VERSION
from profiles.store import load_measurements, measurements_path, record_measurement
from profiles.profiler import choose_variant, profile_artifact
from profiles.pack import make_pack
from profiles.results import import_results, read_results

__all__ = [
    "PROTOCOL_VERSION",
    "choose_variant",
    "import_results",
    "load_measurements",
    "make_pack",
    "measurements_path",
    "profile_artifact",
    "read_results",
    "record_measurement",
]
