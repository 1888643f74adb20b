"""The latency model: fitting, held-out accuracy, and features from genomes."""

import numpy as np
import pytest

from factory.genome.features import latency_features
from factory.genome.references import reference_genomes
from profiles.latency_model import LatencyModel, cross_validate, fit_with_accuracy, relative_errors


def test_recovers_a_nonnegative_linear_law():
    rng = np.random.default_rng(0)
    rows = [{"a": float(rng.uniform(1, 10)), "b": float(rng.uniform(0, 5)), "c": float(rng.uniform(0, 3))} for _ in range(40)]
    y = np.array([0.5 + 2.0 * r["a"] + 0.3 * r["b"] for r in rows])  # c has no effect
    m = LatencyModel("decode", ["a", "b", "c"]).fit(rows, y)
    assert m.coef[0] == pytest.approx(2.0, rel=1e-3) and m.coef[1] == pytest.approx(0.3, rel=1e-2)
    assert m.coef[2] == pytest.approx(0.0, abs=1e-3) and m.intercept == pytest.approx(0.5, rel=1e-2)
    assert relative_errors(m.predict(rows), y).max() < 1e-3


def test_negative_effects_are_clipped_to_zero():
    rows = [{"a": float(i), "noise": float((i * 7) % 5)} for i in range(1, 30)]
    y = np.array([1.0 + r["a"] - 0.05 * r["noise"] for r in rows])
    m = LatencyModel("decode", ["a", "noise"]).fit(rows, y)
    assert min(m.coef) >= 0.0


def test_cross_validation_reports_held_out_error():
    rng = np.random.default_rng(1)
    rows = [{"x": float(v)} for v in rng.uniform(1, 10, 30)]
    clean = np.array([2.0 * r["x"] + 1.0 for r in rows])
    noisy = clean * rng.uniform(0.7, 1.3, len(clean))
    good, bad = cross_validate("decode", rows, clean), cross_validate("decode", rows, noisy)
    assert good["within_10pct"] == 1.0 and good["n"] == 30
    assert bad["mean_relative_error"] > good["mean_relative_error"] and bad["within_10pct"] < 1.0


def test_model_round_trips_through_json(tmp_path):
    rows = [{"x": float(i)} for i in range(1, 10)]
    m = fit_with_accuracy("prefill", rows, [3.0 * r["x"] for r in rows])
    m.save(tmp_path / "m.json")
    import json

    back = LatencyModel.from_dict(json.loads((tmp_path / "m.json").read_text()))
    assert back.predict_one({"x": 4.0}) == pytest.approx(12.0, rel=1e-4)


@pytest.mark.parametrize("metric", ["decode", "prefill"])
def test_features_reflect_architecture(metric):
    refs = reference_genomes()
    tpp = latency_features(refs["transformer++"], metric, 512, 512)
    lfm = latency_features(refs["lfm2-like"], metric, 512, 512)
    per = 1.0 if metric == "decode" else 512 / 100  # prefill counts are per-layer work over the prompt
    assert tpp["layers_attention"] == pytest.approx(4 * per) and lfm["layers_short_conv"] == pytest.approx(3 * per)
    assert tpp["state_mb"] > lfm["state_mb"] > 0
    with pytest.raises(ValueError):
        latency_features(refs["rwkv"], "train", 1, 1)
