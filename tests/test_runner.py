"""The single-file board runner: Python 3.8 syntax, no project imports, and pack -> runner -> import end to end
in a process where torch cannot be imported."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest_profiles import GENOME_HASH, factory_home, run_cli, tiny_export  # noqa: F401  (pytest fixtures)
from factory.errors import FactoryError
from profiles import PROTOCOL_VERSION, import_results, load_measurements, make_pack
from profiles import runner

RUNNER = Path(runner.__file__)
ALLOWED_IMPORTS = {
    "argparse", "hashlib", "json", "os", "platform", "shutil", "socket", "subprocess", "sys", "tempfile", "time",
    "numpy", "onnxruntime", "__future__", "psutil", "resource",
}


# ----------------------------------------------------------------------------------------------- the file itself


def test_runner_parses_as_python_3_8():
    ast.parse(RUNNER.read_text(), feature_version=(3, 8))


def test_runner_imports_only_numpy_onnxruntime_and_the_standard_library():
    tree = ast.parse(RUNNER.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


def test_runner_avoids_library_calls_newer_than_3_8():
    text = RUNNER.read_text()
    for newer in (".removeprefix(", ".removesuffix(", "functools.cache(", "zip(strict", "math.lcm(", "| None"):
        assert newer not in text, newer


@pytest.mark.parametrize("version", ["3.8.18"])
def test_runner_compiles_with_an_old_python(version, tmp_path):
    python = Path.home() / ".pyenv" / "versions" / version / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no Python {version} here")
    completed = subprocess.run([str(python), "-m", "py_compile", str(RUNNER)], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path)))
    assert completed.returncode == 0, completed.stderr


# ----------------------------------------------------------------------------------------------- helpers


def second_genome(tiny_export: Path, tmp_path: Path) -> Path:
    """A copy of the fixture under another genome hash: a second candidate for the pack."""
    copy = tmp_path / "second"
    shutil.copytree(tiny_export, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["genome_hash"] = "0" * 8 + GENOME_HASH[8:]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def board_env(tmp_path: Path) -> dict:
    """The board: `import torch` fails and this repository is not on the path."""
    blocker = tmp_path / "no-torch"
    (blocker / "torch").mkdir(parents=True, exist_ok=True)
    (blocker / "torch" / "__init__.py").write_text('raise ImportError("torch is blocked: the runner must not need it")\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FACTORY_HOME")}
    env["PYTHONPATH"] = str(blocker)
    return env


def run_board(pack: Path, out: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the pack's own runner.py from a folder outside the repository, as on a board."""
    board = tmp_path / "board"
    board.mkdir(exist_ok=True)
    prelude = "import sys\ntry:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    sys.exit('torch importable')\n"
    command = [sys.executable, "-c", prelude + "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
               str(pack / "runner.py"), str(pack), "--out", str(out), *extra]
    return subprocess.run(command, cwd=board, env=board_env(tmp_path), capture_output=True, text=True)


@pytest.fixture
def pack(tiny_export, tmp_path):
    """A pack of two candidates for raspberry-pi-5 (int8-dynamic variant), 2 repetitions."""
    out = tmp_path / "pack"
    make_pack([tiny_export, second_genome(tiny_export, tmp_path)], "raspberry-pi-5", out, repeats=2)
    return out


# ----------------------------------------------------------------------------------------------- packs


def test_pack_is_self_contained(pack, tiny_export):
    content = json.loads((pack / "pack.json").read_text())
    assert content["format"] == runner.PACK_FORMAT and content["protocol_version"] == PROTOCOL_VERSION
    assert content["target"]["name"] == "raspberry-pi-5"
    assert content["settings"]["threads"] == 4 and content["settings"]["providers"] == ["CPUExecutionProvider"]
    assert (pack / "runner.py").read_bytes() == RUNNER.read_bytes()
    assert (pack / "README.txt").is_file()
    ids = [c["id"] for c in content["candidates"]]
    assert len(set(ids)) == 2 and ids[0] == GENOME_HASH[:16]
    for candidate in content["candidates"]:
        folder = pack / candidate["dir"]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert candidate["variant"] == "int8-dynamic" and list(manifest["variants"]) == ["int8-dynamic"]
        assert (folder / "int8-dynamic" / "prefill.onnx").is_file() and (folder / "int8-dynamic" / "decode.onnx").is_file()
        assert not (folder / "prefill.onnx").exists()  # only the chosen variant travels


def test_pack_refuses_an_existing_folder_and_the_same_genome_twice(pack, tiny_export, tmp_path):
    with pytest.raises(FactoryError, match="already exists.*--force"):
        make_pack([tiny_export], "raspberry-pi-5", pack)
    make_pack([tiny_export], "raspberry-pi-5", pack, force=True)
    assert len(json.loads((pack / "pack.json").read_text())["candidates"]) == 1
    with pytest.raises(FactoryError, match="same genome"):
        make_pack([tiny_export, tiny_export], "raspberry-pi-5", tmp_path / "other")
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------------------------- round trip


def test_pack_runner_import_round_trip(pack, tmp_path, factory_home, capsys):
    results_path = tmp_path / "results.json"
    completed = run_board(pack, results_path, tmp_path)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(results_path.read_text())
    assert results["format"] == runner.RESULTS_FORMAT and results["protocol_version"] == PROTOCOL_VERSION
    assert results["finished_at"] and results["device"]["hostname"]
    assert results["settings"]["threads"] == 4 and results["settings"]["overridden"] == []
    assert len(results["candidates"]) == 2
    for cid, entry in results["candidates"].items():
        assert entry["status"] == "ok", entry
        assert 0 < entry["prefill_ms"]["p50"] <= entry["prefill_ms"]["p95"]
        assert 0 < entry["decode_ms"]["p50"] <= entry["decode_ms"]["p95"]
        assert entry["peak_rss_mb"] > 0 and entry["variant"] == "int8-dynamic"
        assert entry["prefill_ms"]["n"] == 2 and entry["decode_past"] == "prefill"

    code, out, err = run_cli(capsys, "profiles", "import", str(results_path), "--target", "raspberry-pi-5", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["imported"] == 2 and summary["failed_on_device"] == {}
    records = load_measurements("raspberry-pi-5")
    assert len(records) == 2
    hostname = results["device"]["hostname"]
    assert {r["source"] for r in records} == {f"board:{hostname}"}
    assert {r["genome_hash"] for r in records} == {GENOME_HASH, "0" * 8 + GENOME_HASH[8:]}
    assert all(r["protocol_version"] == PROTOCOL_VERSION and r["target"] == "raspberry-pi-5" for r in records)

    again = import_results(results_path, "raspberry-pi-5")  # importing twice stores nothing new
    assert again["imported"] == 0 and again["already_present"] == 2
    assert len(load_measurements("raspberry-pi-5")) == 2


def test_overrides_are_recorded_and_refused_on_import(pack, tmp_path, factory_home, capsys):
    results_path = tmp_path / "results.json"
    completed = run_board(pack, results_path, tmp_path, "--threads", "1", "--only", GENOME_HASH[:16], "--no-memory")
    assert completed.returncode == 0, completed.stderr
    results = json.loads(results_path.read_text())
    assert list(results["candidates"]) == [GENOME_HASH[:16]] and results["settings"]["overridden"] == ["threads"]

    code, out, err = run_cli(capsys, "profiles", "import", str(results_path), "--target", "raspberry-pi-5")
    assert code == 2 and err.count("\n") == 1 and "threads: the results were measured with 1" in err
    code, _, err = run_cli(capsys, "profiles", "import", str(results_path), "--target", "laptop-cpu")
    assert code == 2 and "not 'laptop-cpu'" in err
    summary = import_results(results_path, "raspberry-pi-5", allow_overrides=True)
    assert summary["imported"] == 1
    assert load_measurements("raspberry-pi-5")[0]["measurement"]["settings_overridden"] == ["threads"]


def test_a_broken_candidate_does_not_stop_the_run(pack, tmp_path, factory_home):
    bad_id = "0" * 8 + GENOME_HASH[8:16]
    (pack / bad_id / "int8-dynamic" / "decode.onnx").write_bytes(b"damaged in transfer")
    results_path = tmp_path / "results.json"
    completed = run_board(pack, results_path, tmp_path, "--no-memory")
    assert completed.returncode == 1  # some candidates failed
    candidates = json.loads(results_path.read_text())["candidates"]
    assert candidates[GENOME_HASH[:16]]["status"] == "ok"
    assert candidates[bad_id]["status"] == "error" and "sha256" in candidates[bad_id]["error"]
    summary = import_results(results_path, "raspberry-pi-5")
    assert summary["imported"] == 1 and list(summary["failed_on_device"]) == [bad_id]


def test_runner_refuses_a_missing_provider_in_one_line(pack, tmp_path):
    completed = run_board(pack, tmp_path / "results.json", tmp_path, "--provider", "CUDAExecutionProvider")
    if "CUDAExecutionProvider" in completed.stdout + completed.stderr and completed.returncode == 0:
        pytest.skip("this machine has the CUDA provider")
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and "not measurable on this machine" in completed.stderr
    assert not (tmp_path / "results.json").exists()


def test_runner_on_a_folder_that_is_not_a_pack(tmp_path):
    shutil.copy(RUNNER, tmp_path / "runner.py")
    completed = run_board(tmp_path, tmp_path / "results.json", tmp_path)
    assert completed.returncode == 2 and "no pack.json" in completed.stderr and completed.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------- import checks


@pytest.fixture(scope="module")
def board_results(tiny_export, tmp_path_factory) -> dict:
    """One board run (one candidate, no memory probe) shared by the import checks below."""
    tmp = tmp_path_factory.mktemp("board-results")
    make_pack([tiny_export], "raspberry-pi-5", tmp / "pack", repeats=2)
    completed = run_board(tmp / "pack", tmp / "results.json", tmp, "--no-memory")
    assert completed.returncode == 0, completed.stderr
    return json.loads((tmp / "results.json").read_text())


@pytest.mark.parametrize("tamper, message", [
    (lambda r: r.update(format="something"), "not a factory-probe-results file"),
    (lambda r: r.update(protocol_version=PROTOCOL_VERSION + 1), f"measured with protocol {PROTOCOL_VERSION + 1}"),
    (lambda r: next(iter(r["candidates"].values()))["decode_ms"].update(p50=1e9), "p50 1000000000.0 is above p95"),
    (lambda r: next(iter(r["candidates"].values())).update(tokens_per_s=-1), "tokens_per_s: must be a positive number"),
    (lambda r: r["settings"].update(decode_context=999), "decode_context: the results were measured with 999"),
    (lambda r: r.pop("device"), "device: missing"),
])
def test_import_rejects_bad_results_in_one_line(board_results, tmp_path, factory_home, capsys, tamper, message):
    results = json.loads(json.dumps(board_results))  # a deep copy to tamper with
    tamper(results)
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(results))
    code, out, err = run_cli(capsys, "profiles", "import", str(path), "--target", "raspberry-pi-5")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert load_measurements("raspberry-pi-5") == []


def test_import_of_a_file_that_is_not_json(tmp_path, factory_home, capsys):
    path = tmp_path / "results.json"
    path.write_text("{ not json")
    code, _, err = run_cli(capsys, "profiles", "import", str(path), "--target", "raspberry-pi-5")
    assert code == 2 and "not valid JSON" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "profiles", "import", str(tmp_path / "none.json"), "--target", "raspberry-pi-5")
    assert code == 2 and "results file not found" in err


def test_cli_pack_errors_are_one_line(tiny_export, tmp_path, capsys):
    code, out, err = run_cli(capsys, "profiles", "pack", str(tmp_path / "missing"), "--target", "laptop-cpu",
                             "--out", str(tmp_path / "p"))
    assert code == 2 and out == "" and err.count("\n") == 1 and "no such directory" in err
    code, _, err = run_cli(capsys, "profiles", "pack", str(tiny_export), "--target", "gpu-latency",
                           "--out", str(tmp_path / "p"))
    assert code == 2 and "wants quantization float16" in err  # packing for a GPU target is fine; the variant is not
    code, out, err = run_cli(capsys, "profiles", "pack", str(tiny_export), "--target", "laptop-cpu",
                             "--out", str(tmp_path / "p"), "--json")
    assert code == 0 and json.loads(out)["candidates"][0]["variant"] == "float32"
