"""The one preset table, the one configuration builder (`from_target`), the one evaluation request and the file
helpers of factory/io.py (JSON cleaner, atomic write, out-folder check)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from factory.cli import main as cli_main
from factory.errors import FactoryError
from factory.io import atomic_json, atomic_write, check_out_folder, clean_json
from factory.presets import DEFAULTS, FINALIZE_DEFAULTS, PRESETS, Preset
from factory.search.config import SearchConfig, from_target
from factory.search.objectives import evaluation_request
from targets import load_target


def test_factory_run_quick_keeps_its_budget():
    q = PRESETS["quick"]  # the README's main job: these numbers are its ~15 minutes on 2 cores
    assert (q.n_layers, q.d_model, q.context, q.population, q.generations, q.tokens) == (6, 64, 256, 8, 3, 65_536)
    assert (q.top_k, q.multiplier, q.seeds) == (2, 3, 2)


def test_builder_order_defaults_preset_target_flags():
    plain = from_target(None, None, {"context": 64, "workers": 1})
    assert plain.n_layers == DEFAULTS["n_layers"] and plain.seq_len == 64  # min(128, context) without a preset
    star = from_target(None, "star", {"workers": 1})
    assert (star.n_layers, star.tokens, star.eval_windows) == (8, 1_000_000, 64)
    t = from_target("raspberry-pi-5", "quick", {"workers": 1})
    assert t.target == load_target("raspberry-pi-5") and t.n_layers == 6 and t.budgets.active()
    flags = from_target("raspberry-pi-5", "quick", {"workers": 1, "n_layers": 3, "objectives": "params,cache",
                                                    "max_cache_bytes": "1KiB", "families": "glu, attention"})
    assert (flags.n_layers, flags.objectives, flags.budgets.max_cache_bytes, flags.families) == \
        (3, ("params", "cache"), 1024, ("glu", "attention"))
    assert flags.budgets.max_params == t.budgets.max_params  # the target's, where no flag overrides it
    with pytest.raises(FactoryError, match="--preset must be one of"):
        from_target(None, "huge", {})
    with pytest.raises(FactoryError, match="unknown setting 'speed'"):
        from_target(None, None, {"speed": 2})


def test_a_job_resumes_with_its_stored_preset_values(monkeypatch):
    from factory import job as J

    new = J.JobConfig(target="laptop-cpu", preset="quick")
    stored = replace(new, preset_values=new.settings().to_dict())
    old_file = J.JobConfig(**{k: v for k, v in new.to_dict().items() if k != "preset_values"})
    monkeypatch.setitem(J.PRESETS, "quick", replace(PRESETS["quick"], generations=99, top_k=7))
    assert stored.settings().generations == 3 and stored.settings().top_k == 2  # job.json as written
    assert old_file.settings().generations == 99  # job.json from before values were stored: the table by name


def test_help_reads_its_defaults_from_the_table(capsys):
    for argv, needles in ((["search", "--help"], [f"default {DEFAULTS['population']}", *PRESETS]),
                          (["run", "--help"], list(PRESETS)),
                          (["search", "finalize", "--help"], [str(FINALIZE_DEFAULTS["top_k"])])):
        with pytest.raises(SystemExit):
            cli_main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert needle in text, (argv, needle)


def test_search_and_finalize_requests_differ_only_where_they_should():
    config = SearchConfig(n_layers=2, d_model=32, context=64, workers=1, mad_steps=10)
    genome = {"g": 1}
    search = evaluation_request(config, "h", genome, ["train"], tokens=config.tokens, workdir="/w")
    final = evaluation_request(config, "h", genome, ("train",), seed=5, tokens=3 * config.tokens, mad_steps=30,
                               checkpoint=None)
    assert search["stage_paths"] == final["stage_paths"] and search["stages"] == final["stages"] == ["train"]
    s, f = search["settings"], final["settings"]
    assert {k for k in s if s[k] != f.get(k)} == {"train", "mad_steps", "workdir"} and f["checkpoint"] is None
    assert (s["train"]["seed"], f["train"]["seed"], f["train"]["tokens"]) == (0, 5, 3 * config.tokens)
    assert "threads" not in s["train"]


def test_clean_json_and_atomic_write(tmp_path):
    data = {"a": math.nan, 1: [math.inf, np.float32(0.5), np.int64(3)], "p": Path("x"), "t": (1, 2)}
    assert clean_json(data) == {"a": None, "1": [None, 0.5, 3], "p": "x", "t": [1, 2]}
    path = atomic_json(tmp_path / "sub" / "f.json", data)
    assert json.loads(path.read_text())["a"] is None and os.listdir(path.parent) == ["f.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    atomic_write(path, b"\x00")
    assert path.read_bytes() == b"\x00"
    with pytest.raises(TypeError):
        atomic_write(path, 5)
    assert os.listdir(path.parent) == ["f.json"] and path.read_bytes() == b"\x00"  # no temp file left


def test_out_folder_check(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FactoryError, match="is a file"):
        check_out_folder(tmp_path / "file", "a search run")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("")
    with pytest.raises(FactoryError, match=r"not an export \(no manifest.json\)"):
        check_out_folder(other, "an export", ("manifest.json",), ours="replace")
    assert check_out_folder(other, "a search run", ("run.json",), others="allow") == other
    (other / "run.json").write_text("{}")
    with pytest.raises(FactoryError, match="already holds a search run; continue it with --resume"):
        check_out_folder(other, "a search run", ("run.json",), others="allow", resume=f"--resume {other}")
    (other / "manifest.json").write_text("{}")
    check_out_folder(other, "an export", ("manifest.json",), ours="replace")  # a previous export: replaced later
    check_out_folder(tmp_path / "new" / "deep", "a factory run")
    assert (tmp_path / "new" / "deep").is_dir()


def test_preset_round_trip():
    p = PRESETS["smoke"]
    assert Preset.from_dict(p.to_dict(), about=p.about) == p
