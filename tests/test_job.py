"""`factory run` end to end on the smoke preset: search, finalize, export, profile, report; then a resume that
redoes nothing, and bad input."""

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verdicts import check_final


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
    # the run's verdict is finalize's, and that is what the retrained values imply
    assert result["verdict"][0] == final["verdict"] == check_final(final)
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


def _tables(out):
    with sqlite3.connect(out / "search.db") as db:
        return {t: db.execute(f"select * from {t} order by rowid").fetchall()
                for t in ("evaluations", "population", "generations", "final")}


def _stage_files(out):
    """Every file the search, finalize, export and profile stages leave, with its size and mtime (ns)."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for d in ("checkpoints", "exports", "profiles") for p in sorted((out / d).rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_redoes_nothing(smoke_run):
    out, _, _, _ = smoke_run
    tables, files = _tables(out), _stage_files(out)
    assert tables["final"] and any(k.startswith("profiles/") for k in files) and any(k.endswith("manifest.json") for k in files)
    proc = factory("run", "--resume", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no evaluation, retraining, export or profile again: the same rows, the same files untouched, and no stage
    # said it was doing any of them
    assert _tables(out) == tables
    assert _stage_files(out) == files
    for line in proc.stderr.splitlines():
        assert not line.strip().startswith(("export ", "profile ")) or "skipped" in line, line
        assert not re.match(r"\s*(baseline|evolved|reference) .* seed \d+: ", line), line  # a retraining
    assert (out / "report.html").is_file()


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
