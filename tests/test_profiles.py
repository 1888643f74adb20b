"""Profiling on the tiny hand-made export: the protocol's output, provider refusal, bad exports, the store, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest_profiles import GENOME_HASH, factory_home, run_cli, tiny_export, to_toml, with_changes  # noqa: F401
from factory.errors import FactoryError
from profiles import PROTOCOL_VERSION, load_measurements, measurements_path, profile_artifact, record_measurement
from profiles import runner

REPO = Path(__file__).resolve().parents[1]
REPEATS = 3  # few repetitions: these tests check the plumbing, not the machine
TOP_OPS = 50  # more than the tiny graphs have operator types, so the report is every type

REQUIRED_KEYS = {
    "prefill_ms", "decode_ms", "tokens_per_s", "peak_rss_mb", "file_mb", "session_create_ms", "provider", "threads",
    "protocol_version", "versions", "variant", "machine", "prompt_length", "decode_context", "genome_hash",
    "within_budget", "target",
}


def cpu_target(tmp_path, **changes) -> Path:
    """A small CPU float32 target file (1 thread, short prompt) for fast tests."""
    settings = dict(name="tiny-cpu", threads=1, prompt_length=32, decode_context=48, precision="float32",
                    quantization="none", quantization_isa="none")
    data = with_changes(**{**settings, **changes})
    path = tmp_path / "tiny-cpu.toml"
    path.write_text(to_toml(data))
    return path


@pytest.fixture(scope="module")
def laptop_run(tiny_export, tmp_path_factory):
    """One full profile (memory probe and top operators included) shared by the tests below: (result, home)."""
    home = tmp_path_factory.mktemp("home")
    previous = os.environ.get("FACTORY_HOME")
    os.environ["FACTORY_HOME"] = str(home)
    try:
        return profile_artifact(tiny_export, "laptop-cpu", repeats=REPEATS, top_ops=TOP_OPS), home
    finally:
        if previous is None:
            del os.environ["FACTORY_HOME"]
        else:
            os.environ["FACTORY_HOME"] = previous


@pytest.fixture
def laptop_result(laptop_run):
    return laptop_run[0]


def test_profile_has_every_field(laptop_result):
    result = laptop_result
    assert REQUIRED_KEYS <= set(result)
    for phase in ("prefill_ms", "decode_ms"):
        stats = result[phase]
        assert 0 < stats["p50"] <= stats["p95"]
        assert stats["min"] <= stats["p50"] <= stats["max"]
    assert result["decode_ms"]["n"] == max(REPEATS * runner.DECODE_REPEATS_PER_PREFILL_REPEAT, runner.DECODE_MIN_STEPS)
    assert result["tokens_per_s"] == pytest.approx(1000.0 / result["decode_ms"]["p50"])
    assert result["peak_rss_mb"] > 0 and result["peak_rss_mb"] >= result["baseline_rss_mb"]
    assert result["file_mb"] > 0 and result["session_create_ms"] > 0
    assert result["provider"] == "CPUExecutionProvider" and result["threads"] == 4
    assert result["protocol_version"] == PROTOCOL_VERSION
    assert result["versions"]["onnxruntime"] == ort.__version__
    assert result["variant"] == "float32"  # the fixture has no "optimized" variant
    assert result["machine"]["cpu_count"] == os.cpu_count() and result["machine"]["platform"]
    assert (result["prompt_length"], result["decode_context"]) == (512, 512)
    assert result["decode_past"] == "prefill"
    assert result["genome_hash"] == GENOME_HASH
    assert set(result["within_budget"]) == {"prefill_ms", "decode_ms_p95", "memory"}
    json.dumps(result)


def test_top_ops_come_from_the_trace(laptop_result):
    # Every operator type is reported (TOP_OPS exceeds the count), so the assertions do not depend on which kernels
    # happened to be slowest in this run: shares add up to the whole trace, ranked by time.
    ops = laptop_result["top_ops"]
    assert set(ops) == {"prefill", "decode"}
    for graph in ops.values():
        assert 0 < len(graph) < TOP_OPS
        assert all(op["ms_per_run"] > 0 and 0 < op["share"] <= 1 and op["calls_per_run"] > 0 for op in graph)
        assert all(op["providers"] == ["CPUExecutionProvider"] for op in graph)
        assert sum(op["share"] for op in graph) == pytest.approx(1.0)
        times = [op["ms_per_run"] for op in graph]
        assert times == sorted(times, reverse=True)
        assert any(op["op"] in ("MatMul", "FusedMatMul", "Gemm") for op in graph)


def test_top_ops_keeps_the_slowest_n():
    totals = {"MatMul": {"total_ms": 6.0, "calls": 4, "providers": {"CPUExecutionProvider"}},
              "Add": {"total_ms": 3.0, "calls": 8, "providers": {"CPUExecutionProvider"}},
              "Softmax": {"total_ms": 1.0, "calls": 2, "providers": {"CPUExecutionProvider"}}}
    top = runner._top((totals, 2), 2)
    assert [op["op"] for op in top] == ["MatMul", "Add"]
    assert top[0]["ms_per_run"] == pytest.approx(3.0) and top[1]["calls_per_run"] == pytest.approx(4.0)
    assert top[0]["share"] == pytest.approx(0.6)


def test_profile_records_a_local_measurement(laptop_run, monkeypatch):
    result, home = laptop_run
    monkeypatch.setenv("FACTORY_HOME", str(home))
    records = load_measurements("laptop-cpu")
    assert len(records) == 1
    record = records[0]
    assert record["source"] == "local" and record["genome_hash"] == GENOME_HASH
    assert record["target"] == "laptop-cpu" and record["protocol_version"] == PROTOCOL_VERSION
    assert record["measurement"]["decode_ms"]["p50"] == result["decode_ms"]["p50"]


def test_int8_target_measures_the_int8_variant(tiny_export, factory_home):
    result = profile_artifact(tiny_export, "raspberry-pi-5", repeats=2, memory=False, record=False)
    assert result["variant"] == "int8-dynamic" and result["threads"] == 4
    assert any("avx2 preset" in note for note in result["notes"])  # the fixture's int8 graphs say isa avx2
    assert "peak_rss_mb" not in result


def test_unavailable_provider_is_refused(tiny_export, factory_home):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(FactoryError) as caught:
        profile_artifact(tiny_export, "gpu-latency", variant="float32", repeats=2)
    text = str(caught.value)
    assert "CUDAExecutionProvider" in text and "not measurable on this machine" in text
    assert not measurements_path("gpu-latency").exists()  # nothing measured, nothing recorded


def test_missing_variant_is_not_substituted(tiny_export, tmp_path, factory_home):
    target = cpu_target(tmp_path, precision="int8", quantization="int8-static", quantization_isa="avx2")
    with pytest.raises(FactoryError, match="wants quantization int8-static.*pass --variant"):
        profile_artifact(tiny_export, str(target), repeats=2)
    with pytest.raises(FactoryError, match="no variant 'float16' in this export"):
        profile_artifact(tiny_export, str(target), variant="float16", repeats=2)


def _broken_copy(tiny_export, tmp_path, name) -> Path:
    copy = tmp_path / name
    shutil.copytree(tiny_export, copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    ("no-dir", "no such directory"),
    ("no-manifest", "no manifest.json"),
    ("bad-json", "manifest.json is not valid JSON"),
    ("wrong-format", "not a factory-onnx manifest"),
    ("missing-graph", "is missing decode.onnx"),
    ("changed-graph", "does not match its sha256"),
    ("garbage-graph-unlisted", "cannot load prefill.onnx"),
])
def test_broken_export_is_one_line_error(tiny_export, tmp_path, factory_home, damage, message):
    export = _broken_copy(tiny_export, tmp_path, "export")
    manifest_path = export / "manifest.json"
    if damage == "no-dir":
        shutil.rmtree(export)
    elif damage == "no-manifest":
        manifest_path.unlink()
    elif damage == "bad-json":
        manifest_path.write_text('{"format": "factory-onnx", ')
    elif damage == "wrong-format":
        manifest_path.write_text(json.dumps({"format": "something-else"}))
    elif damage == "missing-graph":
        (export / "decode.onnx").unlink()
    elif damage == "changed-graph":
        (export / "decode.onnx").write_bytes(b"not an onnx model")
    elif damage == "garbage-graph-unlisted":
        manifest = json.loads(manifest_path.read_text())
        manifest["variants"]["float32"].pop("sha256")
        manifest_path.write_text(json.dumps(manifest))
        (export / "prefill.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(FactoryError) as caught:
        profile_artifact(export, cpu_target(tmp_path), repeats=2, memory=False)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------- protocol pieces


def test_summary_statistics():
    samples = [1.0] * 18 + [100.0, 0.01]  # one outlier each side
    stats = runner.summarize(samples)
    assert stats["p50"] == 1.0 and stats["n"] == 20 and stats["trimmed_each_side"] == 2
    assert stats["mean"] == pytest.approx(1.0)  # the outliers are trimmed from the mean
    assert stats["max"] == 100.0 and stats["p95"] > 1.0  # ...but not from the tail percentiles
    single = runner.summarize([2.0])
    assert single["p50"] == single["p95"] == single["mean"] == 2.0


def test_zero_past_follows_the_manifest(tiny_export):
    manifest = runner.read_manifest(str(tiny_export))
    _, decode_path = runner.variant_paths(str(tiny_export), manifest, "float32")
    session, _ = runner.create_session(decode_path, ["CPUExecutionProvider"], [{}], 1)
    past = runner._zeros_past(session, manifest, 7)
    assert past["past.0.key"].shape == (1, 2, 7, 8) and past["past.1.conv"].shape == (1, 16, 3)
    outputs = session.run(None, runner.decode_feeds(past, 7))
    assert outputs[1].shape == (1, 2, 8, 8)  # the cache grew by one


def test_decode_from_a_real_prefill_continues_the_sequence(tiny_export):
    """The past the protocol builds is the real one: a decode step matches the full prefill's last logits."""
    manifest = runner.read_manifest(str(tiny_export))
    prefill_path, decode_path = runner.variant_paths(str(tiny_export), manifest, "float32")
    prefill, _ = runner.create_session(prefill_path, ["CPUExecutionProvider"], [{}], 1)
    decode, _ = runner.create_session(decode_path, ["CPUExecutionProvider"], [{}], 1)
    past, source = runner.build_past(prefill, decode, manifest, 16, 256)
    assert source == "prefill"
    ids = runner._token_ids(256, 16, offset=1)
    full = prefill.run(["logits"], {"input_ids": np.concatenate([ids, [[5]]], axis=1)})[0]
    step = decode.run(["logits"], runner.decode_feeds(past, 16, token=5))[0]
    np.testing.assert_allclose(step[0, 0], full[0, -1], atol=1e-4)


# ----------------------------------------------------------------------------------------------- the store


def test_store_path_comes_from_one_place(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "fh"))
    assert measurements_path("laptop-cpu") == tmp_path / "fh" / "measurements" / "laptop-cpu.jsonl"
    monkeypatch.delenv("FACTORY_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert measurements_path("x") == tmp_path / "home" / ".cache" / "edge-model-factory" / "measurements" / "x.jsonl"


def test_store_skips_a_partial_line_and_keeps_appending(factory_home):
    fake = {"genome_hash": "abc", "protocol_version": PROTOCOL_VERSION, "variant": "float32",
            "decode_ms": {"p50": 1.0, "p95": 2.0}}
    record_measurement("laptop-cpu", fake)
    path = measurements_path("laptop-cpu")
    with open(path, "a") as f:
        f.write('{"id": "half a rec')  # a crash mid-write
    record_measurement("laptop-cpu", dict(fake, genome_hash="def"))
    records = load_measurements("laptop-cpu")
    assert [r["genome_hash"] for r in records] == ["abc", "def"]
    assert load_measurements("laptop-cpu", genome_hash="def")[0]["source"] == "local"
    assert load_measurements("laptop-cpu", protocol_version=PROTOCOL_VERSION + 1) == []
    with pytest.raises(FactoryError, match="no genome_hash"):
        record_measurement("laptop-cpu", {"decode_ms": {}})


# ----------------------------------------------------------------------------------------------- without torch


def torch_blocker(directory: Path) -> Path:
    """A folder holding a fake `torch` package whose import fails; put it first on PYTHONPATH."""
    package = directory / "torch"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('raise ImportError("torch is blocked: this code must run without it")\n')
    return directory


def test_profiles_and_targets_run_without_torch(tiny_export, tmp_path):
    blocker = torch_blocker(tmp_path / "blocker")
    script = textwrap.dedent(f"""
        import json, sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the torch blocker did not work")
        import profiles, profiles.pack, profiles.results, profiles.store, targets
        result = profiles.profile_artifact({str(tiny_export)!r}, {str(cpu_target(tmp_path))!r}, repeats=2)
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print(json.dumps({{"peak_rss_mb": result["peak_rss_mb"], "records": len(profiles.load_measurements("tiny-cpu"))}}))
    """)
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{REPO}", FACTORY_HOME=str(tmp_path / "fh"))
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    assert out["peak_rss_mb"] > 0 and out["records"] == 1


def test_no_torch_import_in_the_sources():
    for path in list((REPO / "profiles").glob("*.py")) + list((REPO / "targets").glob("*.py")):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path


# ----------------------------------------------------------------------------------------------- the CLI


def test_cli_profile_json(tiny_export, tmp_path, factory_home, capsys):
    code, out, err = run_cli(capsys, "profile", str(tiny_export), "--target", str(cpu_target(tmp_path)),
                             "--repeats", "2", "--json")
    assert code == 0, err
    assert out.count("\n") == 1  # exactly one JSON object
    result = json.loads(out)
    assert REQUIRED_KEYS <= set(result) and result["threads"] == 1
    assert len(load_measurements("tiny-cpu")) == 1


def test_cli_profile_table_without_json(tiny_export, tmp_path, factory_home, capsys):
    code, out, err = run_cli(capsys, "profile", str(tiny_export), "-t", str(cpu_target(tmp_path)), "--repeats", "2",
                             "--no-memory", "--no-record")
    assert code == 0 and out == "" and "decode @ 48" in err
    assert load_measurements("tiny-cpu") == []


@pytest.mark.parametrize("args, message", [
    (["profile", "{missing}", "--target", "laptop-cpu"], "no such directory"),
    (["profile", "{export}", "--target", "toaster"], "unknown target 'toaster'"),
    (["profile", "{export}", "--target", "laptop-cpu", "--variant", "float16"], "no variant 'float16'"),
])
def test_cli_profile_errors_are_one_line(tiny_export, tmp_path, factory_home, capsys, args, message):
    args = [a.format(missing=tmp_path / "missing", export=tiny_export) for a in args]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_cli_profile_gpu_target_here(tiny_export, factory_home, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    code, out, err = run_cli(capsys, "profile", str(tiny_export), "--target", "gpu-latency")
    assert code == 2 and out == "" and err.count("\n") == 1 and "not measurable on this machine" in err
