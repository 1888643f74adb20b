"""`factory run` end to end on the smoke preset: search, finalize, export, profile, report; then a resume that
redoes nothing, and bad input."""

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest


def factory(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "factory", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "run"
    t0 = time.time()
    proc = factory("run", "--target", "laptop-cpu", "--preset", "smoke", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout), time.time() - t0, proc.stderr


def test_smoke_run_produces_every_stage(smoke_run):
    out, result, _, log = smoke_run
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    final = json.loads((out / "final.json").read_text())
    roles = {m["role"] for m in final["models"]}
    assert "baseline" in roles and len(final["seeds"]) >= 2
    exports = sorted((out / "exports").iterdir())
    assert exports and all((e / "manifest.json").is_file() for e in exports)
    for e in exports:
        parity = json.loads((e / "manifest.json").read_text())["parity"]
        assert parity["passed"] and parity["decode_max_abs"] <= 1e-4
    report = json.loads((out / "report.json").read_text())
    measured = [r for r in report["comparison"] if r.get("decode_ms_p50") is not None]
    assert measured, "laptop-cpu is measurable here: the report's latencies must be measured"
    for r in measured:
        assert 0 < r["decode_ms_p50"] <= r["decode_ms_p95"] and r["peak_rss_mb"] > 0
    assert set(report["figures"]) == {"pareto_cache", "pareto_params", "pareto_latency"}
    assert result["verdict"] and result["verdict"][0].split(":")[0] in ("YES", "PARTLY", "NO", "INCONCLUSIVE")
    # the search used latency, measured with onnxruntime here, as an objective for every candidate it trained
    with sqlite3.connect(out / "search.db") as db:
        rows = db.execute("select objectives, measurements from evaluations where status = 'ok'").fetchall()
    assert rows
    for objectives, measurements in rows:
        profile = json.loads(measurements)["profile"]
        assert profile["source"] == "measured" and json.loads(objectives)["latency"] == profile["prefill_ms_p50"] > 0
    # progress is visible throughout, also without a terminal: every stage and every search generation
    for stage in ("[1/5] search", "[2/5] finalize", "[3/5] export", "[4/5] profile", "[5/5] report"):
        assert stage in log, log[-2000:]
    assert "generation 2" in log.lower() or "gen 2" in log.lower(), log[-2000:]


def _evaluation_count(out):
    with sqlite3.connect(out / "search.db") as db:
        return db.execute("select count(*) from evaluations").fetchone()[0]


def test_resume_of_a_finished_run_redoes_nothing(smoke_run):
    out, _, first_wall, _ = smoke_run
    before = _evaluation_count(out)
    mtimes = {p: p.stat().st_mtime for p in (out / "exports").rglob("manifest.json")}
    t0 = time.time()
    proc = factory("run", "--resume", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _evaluation_count(out) == before
    assert {p: p.stat().st_mtime for p in (out / "exports").rglob("manifest.json")} == mtimes
    assert time.time() - t0 < first_wall / 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--target", "no-such-device", "--out", "{tmp}/a"], "no-such-device"),
        (["run", "--preset", "huge", "--out", "{tmp}/b"], "--preset"),
        (["run", "--resume", "{tmp}"], "not a factory run"),
        (["run", "--target", "laptop-cpu"], "--out"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    proc = factory(*[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_headline_benchmark_writes_its_tables_from_a_finished_run(smoke_run, tmp_path):
    out = smoke_run[0]
    md = tmp_path / "RESULTS.md"
    script = Path(__file__).resolve().parents[1] / "bench" / "headline" / "run.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--report-only",
                           "--markdown", str(md)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = md.read_text()
    final = json.loads((out / "final.json").read_text())
    for m in final["models"]:
        assert f"| {m['name'][:20]} | {m['role']} | {m['mean']:.3f}" in text
    assert "| transformer++ | baseline |" in text and "1.00x / 1.00x" in text
    assert "## Headline" in text and ("vs transformer++" in text)
