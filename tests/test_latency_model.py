"""The latency model: fitting, held-out accuracy, and features from genomes."""

import numpy as np
import pytest

from factory.features import latency_features
from factory.genome.references import reference_genomes
from profiles.latency_model import LatencyModel, cross_validate, fit_best_view, fit_with_accuracy, relative_errors


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


def test_fitted_on_one_statistic_predicts_another():
    """Fitted on the steady statistic (a law plus little noise) and judged against the target statistic (the same
    law times a machine-wide 1.2, plus more noise): the model learns the law and the ratio, and the held-out
    accuracy is measured against the target."""
    rng = np.random.default_rng(3)
    rows = [{"x": float(x)} for x in rng.uniform(1, 10, 60)]
    steady = np.array([2.0 + 3.0 * r["x"] for r in rows]) * rng.uniform(0.99, 1.01, 60)
    target = steady * 1.2 * rng.uniform(0.97, 1.03, 60)
    m = fit_with_accuracy("prefill", rows, steady, target=target)
    assert m.scale == pytest.approx(1.2, rel=0.02)
    assert m.predict_one({"x": 5.0}) == pytest.approx(1.2 * 17.0, rel=0.03)
    assert m.accuracy["within_10pct"] == 1.0 and m.accuracy["mean_relative_error"] < 0.03
    unscaled = cross_validate("prefill", rows, steady)  # judged against the steady values it was fitted on
    assert cross_validate("prefill", rows, steady, target=target)["mean_relative_error"] > unscaled["mean_relative_error"]
    assert LatencyModel.from_dict(m.to_dict()).predict_one({"x": 5.0}) == pytest.approx(m.predict_one({"x": 5.0}))
    with pytest.raises(ValueError):
        cross_validate("prefill", rows, steady, target=target[:-1])


def test_model_round_trips_through_json(tmp_path):
    rows = [{"x": float(i)} for i in range(1, 10)]
    m = fit_with_accuracy("prefill", rows, [3.0 * r["x"] for r in rows])
    m.save(tmp_path / "m.json")
    import json

    back = LatencyModel.from_dict(json.loads((tmp_path / "m.json").read_text()))
    assert back.predict_one({"x": 4.0}) == pytest.approx(12.0, rel=1e-4)


def test_best_view_is_chosen_by_held_out_error_and_reported_nested():
    """Two families with different prices per layer: the per-family view recovers the law, the pooled view
    (one price for both) cannot; with the law pooled, the pooled view wins (fewer coefficients to fit)."""
    rng = np.random.default_rng(3)
    fine = [{"a": float(rng.integers(0, 6)), "b": float(rng.integers(0, 6))} for _ in range(40)]
    coarse = [{"layers": r["a"] + r["b"]} for r in fine]
    views = {"per_family": fine, "pooled": coarse}
    per_family_law = np.array([1.0 + 3.0 * r["a"] + 0.5 * r["b"] for r in fine])
    m = fit_best_view("prefill", views, per_family_law)
    assert m.view == "per_family" and m.accuracy["within_10pct"] == 1.0
    assert m.accuracy["views"]["pooled"]["mean_relative_error"] > 0.1
    assert m.predict_one({"a": 2.0, "b": 4.0}) == pytest.approx(9.0, rel=1e-3)
    noise = rng.uniform(0.9, 1.1, len(fine))
    pooled_law = np.array([1.0 + 2.0 * r["layers"] for r in coarse]) * noise
    m = fit_best_view("prefill", views, pooled_law)
    assert m.view == "pooled" and set(m.accuracy["views"]) == {"per_family", "pooled"}
    assert m.accuracy["n"] == 40 and 0 < m.accuracy["mean_relative_error"] < 0.1  # every sample predicted held out
    assert LatencyModel.from_dict(m.to_dict()).view == "pooled"


def test_pooled_view_sums_each_group_over_families():
    from factory.features import pooled

    f = latency_features(reference_genomes()["lfm2-like"], "prefill", 128, 128)
    p = pooled(f)
    assert p["layers"] == sum(v for k, v in f.items() if k.startswith("layers_")) > 0
    assert p["kops"] == pytest.approx(sum(v for k, v in f.items() if k.startswith("kops_") and k != "kops_head"))
    assert p["kops_head"] == f["kops_head"] and p["state_mb"] == f["state_mb"]
    assert not any(k.startswith("layers_") for k in p)


@pytest.mark.parametrize("metric", ["decode", "prefill"])
def test_features_reflect_architecture(metric):
    refs = reference_genomes()
    tpp = latency_features(refs["transformer++"], metric, 512, 512)
    lfm = latency_features(refs["lfm2-like"], metric, 512, 512)
    rwkv = latency_features(refs["rwkv"], metric, 512, 512)
    assert tpp["layers_attention"] == 4 and lfm["layers_short_conv"] == 3 and tpp["layers_short_conv"] == 0
    assert tpp["state_mb"] > lfm["state_mb"] > 0
    # counted operations land on the family that dispatched them, the embedding and logits on the head
    assert tpp["kops_attention"] > 0 and tpp["kops_short_conv"] == 0 and lfm["kops_short_conv"] > 0
    assert tpp["kops_head"] > 0 and tpp["kops_head"] == pytest.approx(lfm["kops_head"])
    # a recurrence dispatches more per layer than a short convolution
    assert rwkv["kops_rwkv"] / rwkv["layers_rwkv"] > lfm["kops_short_conv"] / lfm["layers_short_conv"]
    assert tpp["flops_attention"] > 0 and tpp["flops_glu"] > 0 and tpp["flops_mamba"] == 0
    if metric == "prefill":  # four layers of 512 x 512 attention scores move more than the conv layers' inputs
        assert tpp["act_mb_attention"] > lfm["act_mb_short_conv"] > 0
    else:  # one token's intermediates, in KB
        assert not any(k.startswith("act_mb") for k in tpp)
        assert tpp["act_kb_attention"] > 0 and lfm["act_kb_short_conv"] > 0 and tpp["act_kb_short_conv"] == 0
    with pytest.raises(ValueError):
        latency_features(refs["rwkv"], "train", 1, 1)


def test_grouped_projection_moves_more_than_dense():
    """A grouped output projection exports as a batched MatMul between two Transposes: fewer FLOPs than dense,
    but its input and output are copied once more, which the traffic features count."""
    from dataclasses import replace

    genome = reference_genomes()["transformer++"]
    grouped = replace(genome, classes=tuple(c.with_(channel_mixing="grouped") for c in genome.classes))
    for metric, act in (("prefill", "act_mb_attention"), ("decode", "act_kb_attention")):
        dense_f, grouped_f = (latency_features(g, metric, 128, 128) for g in (genome, grouped))
        assert grouped_f["flops_attention"] < dense_f["flops_attention"]
        assert grouped_f[act] > dense_f[act]


def test_fits_latency_measured_with_onnxruntime(tmp_path, monkeypatch, capsys):
    """The product path on real measurements: the measuring export + onnxruntime profile of 8 depths of one design,
    kept in a run's measurement store, then the per-target model fitted from it and cross-validated; the same
    measurements in the target's shared store, through `factory profiles model`."""
    import json
    from pathlib import Path

    from factory.cli import main as cli_main
    from factory.features import featurizer
    from factory.genome.schema import Genome, LayerGene
    from factory.model import LIVModel
    from factory.ops import registry
    from factory.search.latency import measure_model
    from profiles.latency import RunMeasurements, fit, predict
    from profiles.store import archive_genome, load_measurements, record_measurement
    from targets import load_target

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    text = (Path(__file__).resolve().parents[1] / "targets/builtin/laptop-cpu.toml").read_text()
    for old, new in (('name = "laptop-cpu"', 'name = "test-cpu"'), ("threads = 4", "threads = 1"),
                     ("prompt_length = 512", "prompt_length = 64"), ("decode_context = 512", "decode_context = 64")):
        assert old in text
        text = text.replace(old, new)
    target_file = tmp_path / "test-cpu.toml"
    target_file.write_text(text)
    target = load_target(str(target_file))
    classes = (registry.default_spec("short_conv").with_(kernel=3), registry.default_spec("glu"))

    def genome(n):
        layers = tuple(LayerGene(op_class=i % 2) for i in range(n))
        return Genome(classes=classes, layers=layers, d_model=16, context=64).validate()

    def model_cli(*args):
        capsys.readouterr()
        try:
            cli_main(["profiles", "model", "--target", str(target_file), *args])
        except SystemExit as e:
            code = e.code or 0
        else:
            code = 0
        return code, capsys.readouterr()

    run = RunMeasurements(target, tmp_path / "run")
    (tmp_path / "run").mkdir()
    featurize = featurizer(target)
    for n in range(1, 9):
        m = measure_model(LIVModel(genome(n)).eval(), target, repeats=5)
        run.add(m, genome(n).to_dict())
        archive_genome({"genome_hash": m["genome_hash"], "genome": genome(n).to_dict()})
        record_measurement(target, m)
        if n == 7:  # one short of what a model needs: a clear one-line refusal
            assert fit(run.records(), target, "prefill", featurize) is None
            code, cap = model_cli("--metric", "prefill")
            assert code == 2 and "7 usable prefill measurements" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert len(load_measurements(target)) == len(run.records()) == 8

    model = fit(run.records(), target, "prefill", featurize)
    assert model is not None and model.n_samples == 8
    assert model.accuracy["n"] == 8 and model.accuracy["mean_relative_error"] < 0.35, model.accuracy
    # deeper is slower, also beyond the measured range
    assert predict(model, featurize(genome(12), "prefill")) > predict(model, featurize(genome(2), "prefill")) > 0

    assert model.scale >= 1.0  # fitted on each profile's fastest prefill run, scaled to its median
    code, cap = model_cli("--metric", "prefill")
    assert code == 0 and "fastest run, predicting its p50" in " ".join(cap.err.split()), cap.err
    code, cap = model_cli("--metric", "prefill", "--json")
    assert code == 0, cap.err
    shown = json.loads(cap.out)
    assert shown["target"] == "test-cpu" and shown["n_samples"] == 8 and shown["accuracy"] == model.accuracy
    code, cap = model_cli("--metric", "train")
    assert code == 2 and "--metric must be decode or prefill" in cap.err


def test_dispatched_operations_grow_with_depth_and_are_deterministic():
    from factory.features import dispatched_ops
    from factory.genome.schema import Genome, LayerGene
    from factory.ops import registry

    classes = (registry.default_spec("attention"), registry.default_spec("glu"))

    def genome(n):
        return Genome(classes=classes, layers=tuple(LayerGene(op_class=i % 2) for i in range(n)), d_model=32,
                      context=64).validate()

    two, four = dispatched_ops(genome(2), 64), dispatched_ops(genome(4), 64)
    for metric in ("prefill", "decode"):
        # per layer: layers 2 and 3 repeat layers 0 and 1, and the embedding and head are counted once in both
        assert four[metric]["layers"] == two[metric]["layers"] * 2 and all(n > 0 for n in two[metric]["layers"])
        assert four[metric]["head"] == two[metric]["head"] > 0
    from factory import features

    features._OPS_CACHE.clear()
    assert dispatched_ops(genome(4), 64) == four  # counted again from scratch: the same


def test_written_megabytes_count_new_tensors_by_size():
    """What a layer writes as PyTorch runs it: new tensors only (a view writes nothing), under or over
    SMALL_TENSOR_BYTES; a GLU layer writes its projection (2 x hidden per token) and more, in proportion to the
    prompt, and a long prompt moves its tensors from small to large."""
    import torch

    from factory.features import SMALL_TENSOR_BYTES, _CountOps, dispatched_ops
    from factory.genome.schema import Genome, LayerGene
    from factory.ops import registry

    counter = _CountOps()
    x = torch.ones(16, 8)
    with counter:
        x.view(8, 16).transpose(0, 1)  # views of x
        y = x + 1  # a new [16, 8] tensor
        torch.ones(SMALL_TENSOR_BYTES // 4)  # exactly at the threshold: large
    assert counter.written == {("head", True): y.numel(), ("head", False): SMALL_TENSOR_BYTES // 4}

    glu = registry.default_spec("glu").with_(expansion=2)
    genome = Genome(d_model=32, classes=(glu,), layers=(LayerGene(op_class=0),), context=4096).validate()
    hidden = 2 * 32
    for tokens in (8, 4096):
        prefill = dispatched_ops(genome, tokens)["prefill"]
        assert prefill["small"][0] + prefill["large"][0] >= 2 * hidden * tokens
    short, long_ = dispatched_ops(genome, 8)["prefill"], dispatched_ops(genome, 4096)["prefill"]
    assert short["large"] == [0] and long_["large"][0] > 0  # [4096, 2 x 64] float32 is 2 MB
    assert long_["small"][0] + long_["large"][0] == 512 * (short["small"][0] + short["large"][0])
    f = latency_features(genome, "prefill", 4096, 4096)
    assert f["large_mb_glu"] == pytest.approx(long_["large"][0] * 4 / 1e6) and f["small_mb_attention"] == 0
    assert not any(k.startswith(("small_mb", "large_mb")) for k in latency_features(genome, "decode", 64, 64))


def test_narrow_products_count_the_flops_of_matrix_products_under_16_wide():
    """A product with a side under NARROW_PRODUCT_DIM counts its FLOPs, a wider one nothing; an attention layer's
    fused scores and weighted sum are narrow with 8-wide heads and not with 16-wide ones."""
    import torch

    from factory.features import NARROW_PRODUCT_DIM, _CountOps
    from factory.genome.schema import Genome, LayerGene
    from factory.ops import registry

    assert NARROW_PRODUCT_DIM == 16
    counter = _CountOps()
    with counter:
        torch.ones(32, 8) @ torch.ones(8, 32)  # k = 8: narrow
        torch.ones(32, 16) @ torch.ones(16, 32)  # every side 16: wide
        torch.nn.functional.linear(torch.ones(2, 32, 64), torch.ones(4, 64))  # n = 4: narrow
        torch.ones(3, 40, 8).transpose(1, 2) @ torch.ones(3, 40, 20)  # batched, m = 8: narrow
    assert counter.narrow == {"head": 2 * 32 * 32 * 8 + 2 * 64 * 4 * 64 + 2 * 3 * 8 * 20 * 40}

    tokens, d = 64, 64
    attention = registry.default_spec("attention").with_(positional="none", window=0, kv_repeat=1)
    narrow = {}
    for heads in (8, 4):
        genome = Genome(d_model=d, classes=(attention.with_(heads=heads),), layers=(LayerGene(op_class=0),),
                        context=tokens).validate()
        narrow[heads] = latency_features(genome, "prefill", tokens, tokens)["narrow_gflop_attention"]
        assert not any(k.startswith("narrow") for k in latency_features(genome, "decode", tokens, tokens))
    # 8 heads of 8: q k^T and scores v, each 2 x heads x tokens x tokens x 8 FLOPs (the projections are 64 wide)
    assert narrow[8] == pytest.approx(2 * 2 * 8 * tokens * tokens * 8 / 1e9) and narrow[4] == 0


def test_calls_per_operator_add_up_to_the_operations_counted():
    """calls_<op> splits every counted operation by its ATen operator: they sum to the kops (layers and head), a
    GLU's activation shows up as its own operator once per GLU layer, and the pooled view leaves them out."""
    from factory.features import pooled
    from factory.genome.schema import Genome, LayerGene
    from factory.ops import registry

    glu = registry.default_spec("glu")
    for metric in ("prefill", "decode"):
        calls = {}
        for nonlinearity in ("gelu", "relu"):
            classes = (registry.default_spec("attention"), glu.with_(nonlinearity=nonlinearity))
            genome = Genome(d_model=32, classes=classes,
                            layers=tuple(LayerGene(op_class=i % 2) for i in range(6)), context=64).validate()
            f = latency_features(genome, metric, 64, 64)
            assert sum(v for k, v in f.items() if k.startswith("calls_")) == pytest.approx(
                sum(v for k, v in f.items() if k.startswith("kops_")))
            assert not any(k.startswith("calls_") for k in pooled(f))
            calls[nonlinearity] = {k: round(v * 1000) for k, v in f.items() if k.startswith("calls_")}
        assert calls["gelu"].get("calls_gelu") == 3 and "calls_relu" not in calls["gelu"]
        assert calls["relu"].get("calls_relu") == 3 and "calls_gelu" not in calls["relu"]


def test_a_feature_missing_from_a_row_counts_as_zero():
    """Rows of sparse features (a genome that never calls an operator has no calls_<op>) fit on every feature any
    row has."""
    rng = np.random.default_rng(0)
    rows = [{"a": float(a)} if i % 3 else {"a": float(a), "b": float(b)}
            for i, (a, b) in enumerate(rng.uniform(1, 5, (40, 2)))]
    y = np.array([2.0 * r["a"] + 7.0 * r.get("b", 0.0) + 1.0 for r in rows])
    model = fit_with_accuracy("decode", rows, y)
    assert model.feature_names == ["a", "b"]
    assert model.coef == pytest.approx([2.0, 7.0], rel=1e-3) and model.accuracy["within_10pct"] == 1.0


def test_traffic_counts_what_a_kernel_writes_beyond_live_memory():
    """Convolutions' unrolled inputs (onnxruntime's im2col) grow with the filter length; the peak-memory estimate
    (activation_elements) does not count them, every other operator's traffic is its live intermediates."""
    from factory.ops import registry

    short_conv = registry.default_spec("short_conv")
    short, wide = short_conv.with_(kernel=2), short_conv.with_(kernel=8)
    assert registry.activation_elements(64, short, 512) == registry.activation_elements(64, wide, 512)
    assert registry.traffic_elements(64, wide, 512) - registry.traffic_elements(64, short, 512) == 512 * 6 * 64
    for name in registry.families():
        for spec in registry.spec_variants(name, d_model=64, context=128):
            shared = sum(registry.shared_elements(64, spec, 128).values())
            assert registry.traffic_elements(64, spec, 128) + shared >= registry.activation_elements(64, spec, 128) > 0


def _masked_attention_genome():
    """Three attention layers, two with the same window and ALiBi slopes, and a GLU between them."""
    from factory.genome import Genome
    from factory.genome.schema import LayerGene
    from factory.ops import registry

    alibi = registry.default_spec("attention").with_(heads=2, positional="alibi", window=16)
    rope = registry.default_spec("attention").with_(heads=2, positional="rope", window=16)
    glu = registry.default_spec("glu")
    layers = tuple(LayerGene(op_class=c) for c in (0, 2, 0, 1))
    return Genome(d_model=32, classes=(alibi, rope, glu), layers=layers, context=64, name="masks").validate()


def test_attention_masks_are_counted_once_per_distinct_mask():
    """The two ALiBi layers share one [H, n, L, K] mask, the RoPE window layer has its own [n, L, K] one (n = 4
    blocks of L = 16 queries against K = 31 keys); dense causal layers share one [T, T] mask; the layers' traffic
    leaves the masks out."""
    from dataclasses import replace

    genome = _masked_attention_genome()
    f = latency_features(genome, "prefill", 64, 64)
    assert f["shared_mb"] == pytest.approx((2 + 1) * 4 * 16 * 31 * 4 / 1e6)
    one_alibi = replace(genome, layers=genome.layers[1:])  # drop one of the two ALiBi layers
    g = latency_features(one_alibi, "prefill", 64, 64)
    assert g["shared_mb"] == f["shared_mb"] and g["act_mb_attention"] < f["act_mb_attention"]
    unmasked = replace(genome, classes=tuple(c.with_(positional="none", window=0) if c.family == "attention" else c
                                             for c in genome.classes))
    u = latency_features(unmasked, "prefill", 64, 64)
    assert u["shared_mb"] == pytest.approx(64 * 64 * 4 / 1e6)  # one causal [T, T] mask for all three layers
    assert "shared_mb" not in latency_features(genome, "decode", 64, 64)


def test_onnxruntime_builds_each_distinct_mask_once(tmp_path):
    """What the shared_mb feature rests on: every masked attention layer builds its mask (a Where over [T, T] or
    [H, T, T]) in PyTorch, but the graph onnxruntime runs has one Where per distinct mask (the exporter's and
    onnxruntime's optimizers merge common subexpressions)."""
    import onnx
    import onnxruntime as ort

    from export.graphs import state_layout
    from export.onnx_export import export_graphs
    from factory.ops import registry
    from factory.testing import perturbed_model

    genome = _masked_attention_genome()
    graphs = export_graphs(perturbed_model(genome), state_layout(genome), tmp_path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graphs.prefill), options, providers=["CPUExecutionProvider"])

    def wheres(path) -> int:
        return sum(n.op_type == "Where" for n in onnx.load(str(path)).graph.node)

    distinct = set()
    for i in range(genome.n_layers):
        distinct.update(registry.shared_elements(genome.d_model, genome.layer_spec(i), 64))
    masked_layers = sum(genome.layer_spec(i).family == "attention" for i in range(genome.n_layers))
    assert masked_layers == 3 and len(distinct) == 2
    assert wheres(graphs.prefill) <= masked_layers
    assert wheres(tmp_path / "optimized.onnx") == len(distinct)


def test_training_samples_take_each_genomes_lowest_comparable_measurement(tmp_path, monkeypatch):
    """A genome measured twice counts once, at the lowest value of each statistic (interference only adds time):
    the budget's (prefill p50) and the steady one the model is fitted on (the fastest prefill run), each from
    whichever profile had it lowest; measurements taken with other threads or another prompt length, or under
    another protocol, do not count."""
    from factory.features import featurizer
    from profiles import PROTOCOL_VERSION, load_measurements, record_measurement
    from profiles.latency import training_samples
    from profiles.store import archive_genome
    from targets import load_target

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    target = load_target("laptop-cpu")
    refs = reference_genomes()
    a, b = refs["transformer++"], refs["lfm2-like"]
    for g in (a, b):
        archive_genome({"genome_hash": g.hash(), "genome": g.to_dict()})

    def measured(genome, prefill_ms, fastest=None, **settings):
        m = {"genome_hash": genome.hash(), "protocol_version": PROTOCOL_VERSION, "variant": "optimized",
             "threads": target.threads, "provider": target.provider, "prompt_length": target.prompt_length,
             "decode_context": target.decode_context,
             "prefill_ms": {"p50": prefill_ms, "p95": prefill_ms * 1.1, "min": fastest or prefill_ms * 0.9},
             "decode_ms": {"p50": 0.1, "p95": 0.2}}
        record_measurement(target, {**m, **settings})

    measured(a, 5.0, fastest=2.5)  # a burst of interference in the middle of the runs: the median moved
    measured(a, 3.0, fastest=2.8)  # a quieter second profile of the same genome
    measured(a, 9.0)
    measured(b, 1.0, threads=1)  # a --threads override
    measured(b, 1.5, prompt_length=128)  # before the target's prompt length was edited
    measured(b, 2.0, protocol_version=PROTOCOL_VERSION - 1)
    measured(b, 4.0)
    samples = training_samples(load_measurements(target), target, "prefill", featurizer(target))
    hashes = samples.hashes
    assert dict(zip(hashes, samples.budget)) == {a.hash(): 3.0, b.hash(): 4.0}
    assert dict(zip(hashes, samples.steady)) == {a.hash(): 2.5, b.hash(): pytest.approx(3.6)}
    assert samples.rows["per_family"][hashes.index(a.hash())]["layers_attention"] == 4
