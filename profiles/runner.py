#!/usr/bin/env python3
"""On-device runner: measures every candidate of a probe pack with the factory's measurement protocol.

    python runner.py PACK_DIR --out results.json [--threads N] [--provider P] [--repeats N] [--only ID]

Needs only Python 3.8+, numpy and onnxruntime: this one file is copied into every pack, so that a board with no
torch and no factory checkout can run it. It is also the one implementation of the protocol: the factory's own
profiler (profiles.profiler) imports the measuring functions from here, so local and board numbers are comparable.

Measurement protocol, version 2 (PROTOCOL_VERSION; bump it whenever a change can move a number)
-------------------------------------------------------------------------------------------------
Sessions
  - onnxruntime InferenceSession with the target's execution providers, first one required: if it is not in
    onnxruntime.get_available_providers(), or the session does not end up on it, the candidate is not measured
    (never a silent fallback to another provider).
  - intra_op_num_threads = the target's threads; inter_op_num_threads = 1; execution_mode = ORT_SEQUENTIAL;
    graph_optimization_level = ORT_ENABLE_ALL.
  - Thread spinning off: session.intra_op.allow_spinning = "0" and session.inter_op.allow_spinning = "0".
    Spinning workers burn the cores between runs, which makes back-to-back numbers depend on what ran before and
    steals cycles on small boards; off is also what a battery-powered deployment uses.
  - session_create_ms: wall time to create the prefill and the decode session (first creation in the process,
    including onnxruntime's graph optimisation), summed.
Workload (batch 1; token ids drawn from a fixed seed, uniformly over the vocabulary)
  - Prefill: `prompt_length` tokens through prefill.onnx. PREFILL_WARMUP untimed runs, then `repeats` timed runs.
  - Decode: the past is built by a real prefill of `decode_context` tokens (its present.* outputs fed as past.*);
    if that prefill fails (a model limited to a shorter context), zeros of the manifest's state shapes are used
    instead and `decode_past` says "zeros". One decode step (input_ids [1,1], position_ids = decode_context) is
    then run DECODE_WARMUP times untimed and `decode_repeats` times timed (DECODE_REPEATS_PER_PREFILL_REPEAT x
    `repeats`, at least DECODE_MIN_STEPS), always from the same past, so every
    sample is a step at exactly `decode_context` tokens. Inputs are numpy arrays (outputs copied back to the host),
    as a plain onnxruntime application would run them.
  - Prefill and decode are timed apart, each sample one session.run call, with time.perf_counter.
Statistics (per phase, milliseconds)
  - p50 and p95 over all samples (linear interpolation): order statistics are already robust to outliers, and the
    p95 is what a latency budget is about, so the tail is not trimmed away.
  - mean and stdev are trimmed: the top and bottom TRIM_FRACTION of the sorted samples are dropped first.
  - tokens_per_s = 1000 / decode p50; prefill_tokens_per_s = prompt_length * 1000 / prefill p50.
Memory
  - peak_rss_mb: peak resident set of a SEPARATE process (this file run with --memory-probe) that imports numpy
    and onnxruntime, creates both sessions with the same options, runs one prefill of prompt_length, one prefill of
    decode_context and DECODE_WARMUP decode steps at decode_context, then reads its high-water mark (Linux
    VmHWM; ru_maxrss or the peak working set elsewhere). baseline_rss_mb is that process's resident set before it
    loads a model, so model_rss_mb = peak - baseline is what the model adds. MB means MiB (2**20 bytes).
  - file_mb: the size of the two graphs of the variant (and any external data beside them), MiB.
Operators (optional, --top-ops N)
  - A separate pair of sessions with enable_profiling runs the same warm-up as above, then PROFILED_RUNS prefills
    and decode steps that are counted; kernel times from the trace are summed per operator type and divided by the
    runs counted (ms_per_run), with the providers that ran them (a GPU target's CPU-fallback nodes show here).
    Never mixed into the timed runs: profiling slows them, so ms_per_run is above the timed numbers; compare shares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

PROTOCOL_VERSION = 2
PACK_FORMAT = "factory-probe-pack"
RESULTS_FORMAT = "factory-probe-results"
FORMAT_VERSION = 1

DEFAULT_REPEATS = 20
DECODE_REPEATS_PER_PREFILL_REPEAT = 5  # decode steps are cheap: sample them more
DECODE_MIN_STEPS = 200  # a p95 needs the tail sampled: of 50 steps it is the third-slowest, mostly jitter
PREFILL_WARMUP = 3
DECODE_WARMUP = 10
PROFILED_RUNS = 5
TRIM_FRACTION = 0.1
INTER_OP_THREADS = 1
ALLOW_SPINNING = "0"
INPUT_SEED = 0
MIB = float(2 ** 20)


class MeasurementError(Exception):
    """A candidate cannot be measured here; the message is one line."""


class ProviderUnavailable(MeasurementError):
    """The requested execution provider does not exist in this onnxruntime, or the session fell back."""


# ----------------------------------------------------------------------------------------------- the artifact


def read_manifest(model_dir):
    """The manifest of an export (docs/artifact.md), checked enough to measure it."""
    path = os.path.join(model_dir, "manifest.json")
    if not os.path.isdir(model_dir):
        raise MeasurementError("{}: no such directory".format(model_dir))
    if not os.path.isfile(path):
        raise MeasurementError("{}: no manifest.json (not an export, or the export did not finish)".format(model_dir))
    try:
        with open(path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:
        raise MeasurementError("{}: manifest.json is not valid JSON ({})".format(model_dir, _one_line(e)))
    if not isinstance(manifest, dict) or manifest.get("format") != "factory-onnx":
        raise MeasurementError("{}: manifest.json is not a factory-onnx manifest".format(model_dir))
    if manifest.get("format_version") != 1:
        raise MeasurementError(
            "{}: manifest format_version {!r} is not supported (expected 1)".format(model_dir, manifest.get("format_version"))
        )
    variants = manifest.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise MeasurementError("{}: manifest.json lists no variants".format(model_dir))
    state = manifest.get("state")
    if not isinstance(state, list) or not all(isinstance(s, dict) and "name" in s and "shape" in s for s in state):
        raise MeasurementError("{}: manifest.json has no valid 'state' list".format(model_dir))
    return manifest


def variant_paths(model_dir, manifest, variant, verify=True):
    """(prefill path, decode path) of one variant, checked to exist and, when listed, to match their sha256."""
    variants = manifest["variants"]
    if variant not in variants:
        raise MeasurementError(
            "{}: no variant {!r} in this export (it has: {})".format(model_dir, variant, ", ".join(sorted(variants)))
        )
    entry = variants[variant]
    paths = []
    for graph in ("prefill", "decode"):
        relative = entry.get(graph) if isinstance(entry, dict) else None
        if not isinstance(relative, str):
            raise MeasurementError("{}: variant {!r} names no {} graph".format(model_dir, variant, graph))
        path = os.path.join(model_dir, relative)
        if not os.path.isfile(path):
            raise MeasurementError("{}: variant {!r} is missing {}".format(model_dir, variant, relative))
        expected = (entry.get("sha256") or {}).get(relative) if verify else None
        if expected and _sha256(path) != expected:
            raise MeasurementError(
                "{}: {} does not match its sha256 in manifest.json (corrupt or changed export)".format(model_dir, relative)
            )
        paths.append(path)
    return paths[0], paths[1]


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def graph_bytes(path):
    """A graph file plus the external-data file the dynamo exporter may write beside it."""
    total = os.path.getsize(path)
    if os.path.isfile(path + ".data"):
        total += os.path.getsize(path + ".data")
    return total


def vocab_size(manifest):
    for source in (manifest.get("tokenizer") or {}, manifest.get("genome") or {}):
        if isinstance(source, dict) and isinstance(source.get("vocab_size"), int) and source["vocab_size"] > 0:
            return source["vocab_size"]
    return 256


# ----------------------------------------------------------------------------------------------- sessions


def session_options(threads, profile_prefix=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = INTER_OP_THREADS
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", ALLOW_SPINNING)
    options.add_session_config_entry("session.inter_op.allow_spinning", ALLOW_SPINNING)
    options.log_severity_level = 3  # errors only: warnings about unused initialisers are not the user's business
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def check_provider(provider):
    available = ort.get_available_providers()
    if provider not in available:
        raise ProviderUnavailable(
            "{} is not available in this onnxruntime {} (available: {}); not measurable on this machine".format(
                provider, ort.__version__, ", ".join(available)
            )
        )


def create_session(path, providers, provider_options, threads, profile_prefix=None):
    """(session, creation milliseconds); refuses to run on anything but the first requested provider."""
    check_provider(providers[0])
    options = session_options(threads, profile_prefix)
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(
            path, sess_options=options, providers=list(providers), provider_options=[dict(o) for o in provider_options]
        )
    except Exception as e:  # onnxruntime raises its own exception types; the message is what matters
        raise MeasurementError("cannot load {}: {}".format(os.path.basename(path), _one_line(e)))
    elapsed_ms = (time.perf_counter() - start) * 1000.0
    if session.get_providers()[0] != providers[0]:
        raise ProviderUnavailable(
            "{} could not be initialised for {} (the session fell back to {}); not measurable on this machine".format(
                providers[0], os.path.basename(path), session.get_providers()[0]
            )
        )
    return session, elapsed_ms


def _one_line(error):
    text = " ".join(str(error).split())
    return text[:400] + ("..." if len(text) > 400 else "")


# ----------------------------------------------------------------------------------------------- inputs

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _token_ids(vocab, length, offset=0):
    rng = np.random.RandomState(INPUT_SEED + offset)
    return rng.randint(0, vocab, size=(1, length)).astype(np.int64)


def _state_names(session):
    return [i.name[len("past."):] for i in session.get_inputs() if i.name.startswith("past.")]


def _zeros_past(decode_session, manifest, context):
    """Zeros shaped like the manifest's state at `context` tokens (batch 1), in the graph's own dtypes."""
    shapes = dict((s["name"], s["shape"]) for s in manifest["state"])
    feeds = {}
    for meta in decode_session.get_inputs():
        if not meta.name.startswith("past."):
            continue
        name = meta.name[len("past."):]
        if name not in shapes:
            raise MeasurementError("decode input {} has no entry in the manifest's state list".format(meta.name))
        shape = []
        for dim in shapes[name]:
            if dim == "batch":
                shape.append(1)
            elif dim == "past_sequence":
                shape.append(context)
            elif isinstance(dim, int):
                shape.append(dim)
            else:
                raise MeasurementError("state {} has an unknown symbolic dim {!r}".format(name, dim))
        feeds[meta.name] = np.zeros(shape, dtype=_NUMPY_TYPES.get(meta.type, np.float32))
    return feeds


def build_past(prefill_session, decode_session, manifest, context, vocab):
    """(feeds of past.* at `context` tokens, "prefill" or "zeros")."""
    names = _state_names(decode_session)
    outputs = [o.name for o in prefill_session.get_outputs()]
    if all("present." + n in outputs for n in names):
        try:
            wanted = ["present." + n for n in names]
            values = prefill_session.run(wanted, {"input_ids": _token_ids(vocab, context, offset=1)})
            return dict(("past." + n, v) for n, v in zip(names, values)), "prefill"
        except Exception:  # e.g. positions beyond what the model supports: fall back to zeros, and say so
            pass
    return _zeros_past(decode_session, manifest, context), "zeros"


def decode_feeds(past, context, token=1):
    feeds = {"input_ids": np.array([[token]], dtype=np.int64), "position_ids": np.array([[context]], dtype=np.int64)}
    feeds.update(past)
    return feeds


# ----------------------------------------------------------------------------------------------- timing


def default_decode_repeats(repeats):
    return max(repeats * DECODE_REPEATS_PER_PREFILL_REPEAT, DECODE_MIN_STEPS)


def time_runs(session, feeds, warmup, repeats):
    """Milliseconds of each of `repeats` session.run calls after `warmup` untimed ones."""
    for _ in range(warmup):
        session.run(None, feeds)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def summarize(samples, trim=TRIM_FRACTION):
    """p50/p95 over all samples; mean/stdev after dropping the top and bottom `trim` fraction."""
    ordered = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(ordered)
    if n == 0:
        raise MeasurementError("no samples")
    cut = int(n * trim)
    kept = ordered[cut:n - cut] if n - 2 * cut > 0 else ordered
    p50, p95 = np.percentile(ordered, [50, 95])
    return {
        "p50": float(p50),
        "p95": float(p95),
        "mean": float(kept.mean()),
        "stdev": float(kept.std()),
        "min": float(ordered[0]),
        "max": float(ordered[-1]),
        "n": int(n),
        "trimmed_each_side": int(cut),
    }


# ----------------------------------------------------------------------------------------------- measuring


def measure(model_dir, variant, providers, provider_options, threads, prompt_length, decode_context,
            repeats=DEFAULT_REPEATS, decode_repeats=None, top_ops=0, memory=True, manifest=None):
    """Measure one variant of one export with the protocol; returns a JSON-able dict (see the module docstring)."""
    manifest = manifest if manifest is not None else read_manifest(model_dir)
    prefill_path, decode_path = variant_paths(model_dir, manifest, variant)
    if repeats < 1:
        raise MeasurementError("repeats must be at least 1")
    decode_repeats = decode_repeats or default_decode_repeats(repeats)
    vocab = vocab_size(manifest)
    providers = list(providers)
    provider_options = list(provider_options) or [{} for _ in providers]

    prefill, prefill_create_ms = create_session(prefill_path, providers, provider_options, threads)
    decode, decode_create_ms = create_session(decode_path, providers, provider_options, threads)

    try:
        prefill_samples = time_runs(prefill, {"input_ids": _token_ids(vocab, prompt_length)}, PREFILL_WARMUP, repeats)
    except Exception as e:
        raise MeasurementError("prefill of {} tokens failed: {}".format(prompt_length, _one_line(e)))
    past, past_source = build_past(prefill, decode, manifest, decode_context, vocab)
    try:
        decode_samples = time_runs(decode, decode_feeds(past, decode_context), DECODE_WARMUP, decode_repeats)
    except Exception as e:
        raise MeasurementError("decode step at context {} failed: {}".format(decode_context, _one_line(e)))
    del past

    prefill_stats = summarize(prefill_samples)
    decode_stats = summarize(decode_samples)
    file_bytes = graph_bytes(prefill_path) + graph_bytes(decode_path)
    result = {
        "genome_hash": manifest.get("genome_hash"),
        "variant": variant,
        "prompt_length": int(prompt_length),
        "decode_context": int(decode_context),
        "prefill_ms": prefill_stats,
        "decode_ms": decode_stats,
        "tokens_per_s": 1000.0 / decode_stats["p50"],
        "prefill_tokens_per_s": prompt_length * 1000.0 / prefill_stats["p50"],
        "decode_past": past_source,
        "session_create_ms": prefill_create_ms + decode_create_ms,
        "session_create_detail_ms": {"prefill": prefill_create_ms, "decode": decode_create_ms},
        "file_bytes": int(file_bytes),
        "file_mb": file_bytes / MIB,
        "provider": providers[0],
        "session_providers": decode.get_providers(),
        "threads": int(threads),
        "inter_op_threads": INTER_OP_THREADS,
        "allow_spinning": ALLOW_SPINNING == "1",
        "warmup": {"prefill": PREFILL_WARMUP, "decode": DECODE_WARMUP},
        "protocol_version": PROTOCOL_VERSION,
        "versions": versions(),
        "machine": machine_info(),
        "measured_at": _utc_now(),
    }
    del prefill, decode
    if memory:
        result.update(memory_probe(prefill_path, decode_path, manifest, providers, provider_options, threads,
                                   prompt_length, decode_context))
    if top_ops:
        result["top_ops"] = operator_times(prefill_path, decode_path, manifest, providers, provider_options, threads,
                                           prompt_length, decode_context, top_ops)
    return result


# ----------------------------------------------------------------------------------------------- memory


def _rss_now_and_peak():
    """(current RSS bytes, peak RSS bytes, method) of this process."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024, "proc-vmhwm"
    except (OSError, KeyError, ValueError):
        pass
    try:
        import psutil  # Windows: the peak working set

        info = psutil.Process().memory_info()
        peak = getattr(info, "peak_wset", None)
        if peak:
            return info.rss, peak, "psutil-peak-wset"
    except ImportError:
        pass
    import resource  # macOS and other Unixes: ru_maxrss, bytes on macOS and kilobytes elsewhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    return peak, peak, "ru-maxrss"


def memory_probe(prefill_path, decode_path, manifest, providers, provider_options, threads, prompt_length,
                 decode_context):
    """Peak RSS of a fresh process running the workload once (see the protocol)."""
    spec = {
        "prefill": prefill_path, "decode": decode_path, "manifest": manifest, "providers": list(providers),
        "provider_options": list(provider_options), "threads": int(threads), "prompt_length": int(prompt_length),
        "decode_context": int(decode_context),
    }
    with tempfile.TemporaryDirectory(prefix="factory-memprobe-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        completed = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--memory-probe", spec_path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
        )
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
        raise MeasurementError("memory probe failed: {}".format(lines[-1] if lines else "exit {}".format(completed.returncode)))
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mb": report["peak_rss_bytes"] / MIB,
        "baseline_rss_mb": report["baseline_rss_bytes"] / MIB,
        "model_rss_mb": max(report["peak_rss_bytes"] - report["baseline_rss_bytes"], 0) / MIB,
        "rss_method": report["method"],
    }


def _memory_probe_child(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    baseline, _, _ = _rss_now_and_peak()
    manifest = spec["manifest"]
    vocab = vocab_size(manifest)
    prefill, _ = create_session(spec["prefill"], spec["providers"], spec["provider_options"], spec["threads"])
    decode, _ = create_session(spec["decode"], spec["providers"], spec["provider_options"], spec["threads"])
    prefill.run(None, {"input_ids": _token_ids(vocab, spec["prompt_length"])})
    past, _ = build_past(prefill, decode, manifest, spec["decode_context"], vocab)
    feeds = decode_feeds(past, spec["decode_context"])
    for _ in range(DECODE_WARMUP):
        decode.run(None, feeds)
    _, peak, method = _rss_now_and_peak()
    print(json.dumps({"peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "method": method}))


# ----------------------------------------------------------------------------------------------- operators


def _kernel_times(trace_path, keep_runs):
    """Kernel milliseconds per operator type over the session runs numbered in `keep_runs` (0 = first run)."""
    with open(trace_path) as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    windows = [runs[i] for i in keep_runs if i < len(runs)]
    totals = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        if not any(lo <= event.get("ts", -1) <= hi for lo, hi in windows):
            continue
        args = event.get("args") or {}
        op = args.get("op_name", "?")
        entry = totals.setdefault(op, {"total_ms": 0.0, "calls": 0, "providers": set()})
        entry["total_ms"] += float(event.get("dur", 0)) / 1000.0
        entry["calls"] += 1
        entry["providers"].add(args.get("provider", "?"))
    return totals, max(len(windows), 1)


def _top(totals_and_runs, n):
    totals, runs = totals_and_runs
    grand = sum(e["total_ms"] for e in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1]["total_ms"])[:n]
    return [
        {"op": op, "ms_per_run": e["total_ms"] / runs, "calls_per_run": e["calls"] / float(runs),
         "share": e["total_ms"] / grand, "providers": sorted(e["providers"])}
        for op, e in ranked
    ]


def operator_times(prefill_path, decode_path, manifest, providers, provider_options, threads, prompt_length,
                   decode_context, n):
    """Top `n` operator types by kernel time per graph from onnxruntime's profiling trace, first runs excluded."""
    vocab = vocab_size(manifest)
    tmp = tempfile.mkdtemp(prefix="factory-ortprof-")
    try:
        prefill, _ = create_session(prefill_path, providers, provider_options, threads, os.path.join(tmp, "prefill"))
        decode, _ = create_session(decode_path, providers, provider_options, threads, os.path.join(tmp, "decode"))
        prompt = {"input_ids": _token_ids(vocab, prompt_length)}
        for _ in range(PREFILL_WARMUP + PROFILED_RUNS):
            prefill.run(None, prompt)
        past, _ = build_past(prefill, decode, manifest, decode_context, vocab)  # not counted
        feeds = decode_feeds(past, decode_context)
        for _ in range(DECODE_WARMUP + PROFILED_RUNS):
            decode.run(None, feeds)
        return {
            "prefill": _top(_kernel_times(prefill.end_profiling(), range(PREFILL_WARMUP, PREFILL_WARMUP + PROFILED_RUNS)), n),
            "decode": _top(_kernel_times(decode.end_profiling(), range(DECODE_WARMUP, DECODE_WARMUP + PROFILED_RUNS)), n),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- the machine


def versions():
    return {"onnxruntime": ort.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            if line.split(":", 1)[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _total_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:
        return None


def machine_info():
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "system": platform.system(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _total_memory_bytes(),
        "available_providers": ort.get_available_providers(),
    }


def _utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------------------------- packs


def read_pack(pack_dir):
    path = os.path.join(pack_dir, "pack.json")
    if not os.path.isfile(path):
        raise MeasurementError("{}: no pack.json (not a probe pack)".format(pack_dir))
    try:
        with open(path, "r", encoding="utf-8") as f:
            pack = json.load(f)
    except ValueError as e:
        raise MeasurementError("{}: pack.json is not valid JSON ({})".format(pack_dir, _one_line(e)))
    if not isinstance(pack, dict) or pack.get("format") != PACK_FORMAT:
        raise MeasurementError("{}: pack.json is not a {} file".format(pack_dir, PACK_FORMAT))
    if pack.get("protocol_version") != PROTOCOL_VERSION:
        raise MeasurementError(
            "{}: the pack was made for protocol {} but this runner implements {}".format(
                pack_dir, pack.get("protocol_version"), PROTOCOL_VERSION)
        )
    return pack


def _write_json_atomically(path, obj):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_pack(pack_dir, out, threads=None, provider=None, repeats=None, only=None, top_ops=0, memory=True, log=None):
    """Measure every candidate of the pack; writes `out` after each one (a crash keeps what was measured)."""
    log = log or (lambda message: sys.stderr.write(message + "\n"))
    pack = read_pack(pack_dir)
    settings = pack["settings"]
    providers = list(settings["providers"])
    options = list(settings.get("provider_options") or [{} for _ in providers])
    if provider and provider != providers[0]:
        providers, options = [provider], [{}]
    threads = int(threads or settings["threads"])
    repeats = int(repeats or settings.get("repeats") or DEFAULT_REPEATS)
    check_provider(providers[0])  # fail the whole run at once rather than every candidate

    results = {
        "format": RESULTS_FORMAT,
        "format_version": FORMAT_VERSION,
        "protocol_version": PROTOCOL_VERSION,
        "pack": {"id": pack.get("id"), "created_at": pack.get("created_at"), "target": pack["target"]["name"]},
        "target": pack["target"]["name"],
        "target_fingerprint": pack.get("target_fingerprint"),
        "settings": {
            "providers": providers, "threads": threads, "repeats": repeats,
            "decode_repeats": default_decode_repeats(repeats),
            "prompt_length": settings["prompt_length"], "decode_context": settings["decode_context"],
            "overridden": sorted(k for k, v in (("threads", threads != settings["threads"]),
                                               ("provider", providers != list(settings["providers"]))) if v),
        },
        "device": machine_info(),
        "versions": versions(),
        "started_at": _utc_now(),
        "finished_at": None,
        "candidates": {},
    }
    unknown = sorted(set(only or ()) - set(c["id"] for c in pack["candidates"]))
    if unknown:
        raise MeasurementError("no candidate {} in this pack (it has: {})".format(
            ", ".join(unknown), ", ".join(c["id"] for c in pack["candidates"])))
    wanted = [c for c in pack["candidates"] if not only or c["id"] in only]
    for index, candidate in enumerate(wanted):
        log("[{}/{}] {} ({})".format(index + 1, len(wanted), candidate["id"], candidate["variant"]))
        entry = {"id": candidate["id"], "genome_hash": candidate.get("genome_hash"), "variant": candidate["variant"]}
        try:
            measured = measure(
                os.path.join(pack_dir, candidate["dir"]), candidate["variant"], providers, options, threads,
                settings["prompt_length"], settings["decode_context"], repeats=repeats, top_ops=top_ops,
                memory=memory,
            )
            measured.pop("machine", None)  # once per file, under "device"
            entry.update(measured)
            entry["status"] = "ok"
            log("    prefill p50 {:.2f} ms, decode p50 {:.3f} ms ({:.0f} tok/s), peak RSS {} MiB".format(
                measured["prefill_ms"]["p50"], measured["decode_ms"]["p50"], measured["tokens_per_s"],
                "{:.0f}".format(measured["peak_rss_mb"]) if "peak_rss_mb" in measured else "-"))
        except Exception as e:  # one bad candidate must not cost a long board run the others
            message = str(e) if isinstance(e, MeasurementError) else "{}: {}".format(type(e).__name__, _one_line(e))
            entry.update({"status": "error", "error": message})
            log("    error: {}".format(message))
        results["candidates"][candidate["id"]] = entry
        _write_json_atomically(out, results)
    results["finished_at"] = _utc_now()
    _write_json_atomically(out, results)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Measure every candidate of a probe pack (protocol {}).".format(PROTOCOL_VERSION))
    parser.add_argument("pack_dir", help="the pack folder (holds pack.json)")
    parser.add_argument("--out", required=True, help="results JSON to write")
    parser.add_argument("--threads", type=int, help="override the target's intra-op threads (recorded as an override)")
    parser.add_argument("--provider", help="override the execution provider (recorded as an override)")
    parser.add_argument("--repeats", type=int, help="timed prefill runs per candidate (decode: {}x, at least {})".format(
        DECODE_REPEATS_PER_PREFILL_REPEAT, DECODE_MIN_STEPS))
    parser.add_argument("--only", action="append", help="measure only this candidate id (repeatable)")
    parser.add_argument("--top-ops", type=int, default=0, help="also report the N slowest operator types")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probe process")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be a positive integer")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be a positive integer")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error("--out: the folder of {} does not exist".format(args.out))
    try:
        results = run_pack(args.pack_dir, args.out, threads=args.threads, provider=args.provider,
                           repeats=args.repeats, only=args.only, top_ops=args.top_ops, memory=not args.no_memory)
    except MeasurementError as e:
        sys.stderr.write("error: {}\n".format(e))
        return 2
    failed = [cid for cid, entry in results["candidates"].items() if entry["status"] != "ok"]
    sys.stderr.write("wrote {} ({} measured, {} failed)\n".format(args.out, len(results["candidates"]) - len(failed), len(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        _memory_probe_child(sys.argv[2])
    else:
        sys.exit(main())
