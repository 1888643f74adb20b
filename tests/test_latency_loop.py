"""The latency loop's seams: the measuring export (the deployed variant and its parity, in a scratch folder), one
measurement store per run (the run's own measurements in its folder, the shared board data it used recorded by
count and hash), and runs written when run.json stored the target by name."""

import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import onnx
import pytest

from factory.errors import FactoryError
from factory.genome.schema import Genome, LayerGene
from factory.model import LIVModel
from factory.ops import registry
from targets import load_target

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old-search-run"


def _genome(n_layers=2):
    classes = (registry.default_spec("short_conv").with_(kernel=3), registry.default_spec("glu"))
    layers = tuple(LayerGene(op_class=i % 2) for i in range(n_layers))
    return Genome(classes=classes, layers=layers, d_model=16, context=64).validate()


def _small(target):
    return replace(target, threads=1, prompt_length=16, decode_context=16)


def _op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("name, variant", [("laptop-cpu", "optimized"), ("raspberry-pi-5", "int8-dynamic")])
def test_measuring_export_builds_the_deployed_variant_and_checks_its_parity(tmp_path, name, variant):
    from export.measure import build_for_measuring
    from export.verify import OPTIMIZED_TOLERANCE

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = LIVModel(_genome())
    graphs = build_for_measuring(model, load_target(name), tmp_path)
    assert graphs.variant == variant and graphs.genome_hash == model.genome.hash()
    assert graphs.prefill.is_file() and graphs.decode.is_file() and graphs.prefill.parent.parent == tmp_path
    # no checkpoint, manifest or other variant: the float32 graphs it was built from, and this variant
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("manifest.json"))
    assert {p.parent.name for p in tmp_path.rglob("*.onnx")} == {tmp_path.name, variant}
    assert graphs.parity["passed"]
    if variant == "optimized":
        assert graphs.parity["tolerance"] == OPTIMIZED_TOLERANCE
        assert graphs.parity["decode_max_abs"] <= OPTIMIZED_TOLERANCE / 10
    else:  # quantized: the weights' products are integer ones, and the outputs are finite, near the model's
        assert "MatMulInteger" in _op_types(graphs.prefill) | _op_types(graphs.decode)
        assert graphs.parity["tolerance"] is None and 0 < graphs.parity["decode_max_abs"] < 1.0


def test_profile_stage_writes_only_the_measurement_into_the_run(tmp_path, monkeypatch):
    """Measured here: the candidate's record lands in DIR/measurements.jsonl with its genome, nothing else is left
    under the run or in the scratch area, and the shared store in FACTORY_HOME is not touched."""
    import tempfile

    from factory.search.evaluate import StageContext
    from factory.search.latency import profile_stage
    from profiles.latency import RUN_STORE, RunMeasurements, board_data

    home, run, scratch = tmp_path / "home", tmp_path / "run", tmp_path / "scratch"
    for d in (run, scratch):
        d.mkdir()
    monkeypatch.setenv("FACTORY_HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    target = _small(load_target("laptop-cpu"))
    genome = _genome()
    settings = {"target": target.to_dict(), "measurements": {"folder": str(run), "board": board_data(target)}}
    result = profile_stage(StageContext(genome, settings, workdir=run / "work" / genome.hash()))
    assert result["source"] == "measured" and result["variant"] == "optimized"
    assert 0 < result["prefill_ms_p50"] and 0 < result["decode_ms_p50"] <= result["decode_ms_p95"]
    assert sorted(p.name for p in run.rglob("*")) == [RUN_STORE] and not list(scratch.rglob("*.onnx"))
    assert not home.exists()
    (record,) = RunMeasurements(target, run).records()
    assert record["genome"] == genome.to_dict() and record["genome_hash"] == genome.hash()
    assert record["measurement"]["prefill_ms"]["p50"] == result["prefill_ms_p50"]


def _board_record(target, genome, prefill_ms, host="pi"):
    from profiles.runner import PROTOCOL_VERSION
    from profiles.store import make_record

    m = {"genome_hash": genome.hash(), "protocol_version": PROTOCOL_VERSION, "variant": "int8-dynamic",
         "threads": target.threads, "provider": target.provider, "prompt_length": target.prompt_length,
         "decode_context": target.decode_context,
         "prefill_ms": {"p50": prefill_ms, "p95": prefill_ms, "min": prefill_ms},
         "decode_ms": {"p50": prefill_ms / 10, "p95": prefill_ms / 8, "min": prefill_ms / 10}}
    return make_record(target, m, source=f"board:{host}")


def test_a_run_reads_the_board_data_it_recorded_and_only_that(tmp_path, monkeypatch):
    from profiles.latency import RunMeasurements, board_data
    from profiles.store import append_records, archive_genome, measurements_path, record_measurement

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    target = load_target("raspberry-pi-5")
    genomes = [_genome(n) for n in (1, 2, 3, 4)]
    for g in genomes:
        archive_genome({"genome_hash": g.hash(), "genome": g.to_dict()})
    append_records(target.name, [_board_record(target, g, 1.0 + i) for i, g in enumerate(genomes[:3])])
    record_measurement(target, _board_record(target, genomes[0], 9.0)["measurement"], source="local")
    recorded = board_data(target)
    assert recorded["records"] == 3 and len(recorded["sha256"]) == 16
    run = RunMeasurements(target, tmp_path / "run", recorded)
    before = [r["id"] for r in run.board_records()]
    # a board import after the run started: the run keeps reading what it recorded, a new run records more
    append_records(target.name, [_board_record(target, genomes[3], 4.0)])
    assert [r["id"] for r in RunMeasurements(target, tmp_path / "run", recorded).board_records()] == before
    assert board_data(target)["records"] == 4 and board_data(target)["sha256"] != recorded["sha256"]
    # the local measurement in the shared store is no board data, and not the run's own
    assert all(r["source"].startswith("board:") for r in run.records()) and len(run.records()) == 3
    # the shared records it used changed: one line that says which, never another run's data
    lines = measurements_path(target.name).read_text().splitlines()
    measurements_path(target.name).write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(FactoryError, match="no longer in") as e:
        RunMeasurements(target, tmp_path / "run", recorded).board_records()
    assert "\n" not in str(e.value) and "3 records" in str(e.value)


def test_prefilter_fits_only_on_the_runs_records(tmp_path, monkeypatch):
    """Off-device (an arm64 board from this x86 machine), the prefilter fits on the recorded board data: with fewer
    than the minimum it rejects nothing; with enough it rejects a genome predicted far over the budget."""
    from factory.features import featurizer
    from profiles.latency import MIN_SAMPLES_TO_PREDICT, Prefilter, RunMeasurements, board_data
    from profiles.store import append_records, archive_genome

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    target = replace(load_target("raspberry-pi-5"), prompt_length=16, decode_context=16, decode_ms_p95=1.0)
    genomes = [_genome(n) for n in range(1, MIN_SAMPLES_TO_PREDICT + 1)]
    for g in genomes:
        archive_genome({"genome_hash": g.hash(), "genome": g.to_dict()})
    # decode p95 = 0.25 ms per layer: a 12-layer genome is predicted at 3 ms, 3x the 1 ms budget
    records = [_board_record(target, g, 2.0 * g.n_layers) for g in genomes]
    append_records(target.name, records[:-1])
    few = RunMeasurements(target, tmp_path / "run", board_data(target))
    append_records(target.name, records[-1:])
    enough = RunMeasurements(target, tmp_path / "run", board_data(target))
    checks = []
    for store in (few, enough):
        prefilter = Prefilter(target, store.records, featurizer(target))
        prefilter.refresh()
        checks.append((prefilter.violation(_genome(12))[0] > 0, prefilter.violation(_genome(1))[0] > 0))
    assert checks == [(False, False), (True, False)]
    # the profile stage predicts from the same recorded board data, and says so
    from factory.search.evaluate import StageContext
    from factory.search.latency import profile_stage

    for store, ok in ((few, False), (enough, True)):
        settings = {"target": target.to_dict(), "measurements": {"folder": None, "board": store.board}}
        result = profile_stage(StageContext(_genome(12), settings))
        if ok:
            assert result["source"] == "predicted-from-board"
            assert result["decode_ms_p95"] == pytest.approx(3.0, rel=0.1)
        else:
            assert result["status"] == "error" and "arm64" in result["reason"]


def _rows(db):
    with sqlite3.connect(db) as c:
        return c.execute("select hash, train_config_hash, generation, status, objectives, violation, static "
                         "from evaluations order by id").fetchall()


def test_a_run_that_stored_the_target_by_name_resumes(tmp_path):
    """tests/fixtures/old-search-run: a 2-generation run (raspberry-pi-5, objectives params and cache) written when
    run.json kept the target's name and fingerprint (`factory search --target raspberry-pi-5 --objectives params,cache
    --population 4 --generations 2 --layers 2 --d-model 32 --context 64 --workers 1`). It resumes (extended by a generation), its stored config read
    as written; and every row the old one stored survives the migration of its genomes."""
    from factory.search.run import read_run, resume_search

    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old)
    written = json.loads((FIXTURE / "run.json").read_text())["config"]
    assert written["target"] == "raspberry-pi-5" and "target_fingerprint" in written
    config = read_run(old)
    assert config.target == load_target("raspberry-pi-5") and config.objectives == ("params", "cache")
    resume_search(old, generations=3)
    resumed = read_run(old)
    assert resumed.target == config.target and resumed.generations == 3
    assert json.loads((old / "run.json").read_text())["config"]["target"]["name"] == "raspberry-pi-5"
    assert "board_data" not in json.loads((old / "run.json").read_text())  # nothing measured, nothing recorded
    # Opening the old database migrates its schema-2 genomes to today's form and hashes (factory/search/store.py):
    # every stored evaluation keeps its training config, generation, status, objectives and static metrics.
    old_rows = [row[1:] for row in _rows(FIXTURE / "search.db")]
    rows = [row[1:] for row in _rows(old / "search.db")]
    assert rows[: len(old_rows)] == old_rows and len(rows) > len(old_rows)
