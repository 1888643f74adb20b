"""Training: the loss falls and beats the unigram baseline; determinism; divergence is a status; checkpoints."""

import json
import math

import pytest
import torch

from factory.data import load_corpus
from factory.data.mad import IGNORE, TASKS
from factory.genome import Genome, LayerGene
from factory.ops import registry
from factory.train import TrainConfig, generate, load_checkpoint, mad_score, save_checkpoint, train
from factory.errors import FactoryError


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def _small(context=128):
    conv, glu = registry.default_spec("short_conv"), registry.default_spec("glu")
    attn = registry.default_spec("attention")
    return Genome(
        d_model=64, context=context, classes=(conv, glu, attn),
        layers=(LayerGene(0), LayerGene(1), LayerGene(2), LayerGene(1)), name="small",
    ).validate()


def test_default_corpus_is_the_shipped_shakespeare(corpus):
    assert corpus.name == "shakespeare"
    assert corpus.sha256 == "3237e33221e73615c677bd59fd69a76da38f9a2eb51d6efb7191f32f8cb9fa4c"
    assert len(corpus.val) == pytest.approx(0.1 * corpus.n_bytes, abs=1)


def test_training_beats_unigram_and_is_deterministic(corpus, tmp_path):
    cfg = TrainConfig(tokens=120 * 16 * 64, seq_len=64, batch_size=16, seed=3, threads=2, eval_windows=32)
    model, result = train(_small(), corpus, cfg)
    assert result.status == "ok"
    assert result.train_loss[-1] < result.train_loss[0] - 1.0
    assert result.val_bpb < corpus.unigram_bpb() - 0.5, (result.val_bpb, corpus.unigram_bpb())
    _, again = train(_small(), corpus, cfg)
    assert again.val_loss == result.val_loss and again.train_loss == result.train_loss

    save_checkpoint(tmp_path / "ck", model, result, cfg, corpus)
    loaded, metrics = load_checkpoint(tmp_path / "ck")
    assert metrics["hash"] == model.genome.hash() and metrics["status"] == "ok"
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model.eval()(ids))
    text = generate(loaded, "ROMEO:", 40, seed=1)
    assert len(text.encode("utf-8", errors="replace")) >= 30
    assert generate(loaded, "ROMEO:", 40, seed=1) == text


def test_divergence_is_reported_not_raised(corpus):
    cfg = TrainConfig(tokens=30 * 8 * 32, seq_len=32, batch_size=8, lr=1e6, warmup_frac=0.0, grad_clip=1e9, seed=0)
    _, result = train(_small(), corpus, cfg)
    assert result.status == "diverged"
    assert "non-finite" in result.reason and math.isnan(result.val_bpb)


def test_corrupt_checkpoint_is_a_clear_error(corpus, tmp_path):
    cfg = TrainConfig(tokens=2 * 4 * 32, seq_len=32, batch_size=4)
    model, result = train(_small(), corpus, cfg)
    save_checkpoint(tmp_path, model, result, cfg, corpus)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FactoryError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FactoryError, match="not found"):
        load_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_mad_tasks_are_seeded_and_scored_positions_exist(name):
    x1, y1 = TASKS[name](8, seed=5)
    x2, y2 = TASKS[name](8, seed=5)
    x3, _ = TASKS[name](8, seed=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert (y1 != IGNORE).any() and int(x1.max()) < 256
    # Targets are next tokens: wherever the next input is the answer, it matches.
    scored = (y1[:, :-1] != IGNORE)
    assert torch.equal(y1[:, :-1][scored], x1[:, 1:][scored]) or name in ("memorization",)


def test_mad_score_learns_memorizable_task():
    """Compression (recall a 16-token sequence over a 16-symbol vocabulary: chance 1/16) and memorization (a fixed
    128-entry mapping: chance 1/128) are learned in 60 steps; an untrained model scores near zero."""
    tasks = ["compression", "memorization"]
    untrained = mad_score(_small(context=64), tasks=tasks, steps=0, n_train=256, seed=0, threads=1)
    scores = mad_score(_small(context=64), tasks=tasks, steps=60, n_train=256, seed=0, threads=1)
    assert untrained["compression"] < 2 / 16 and untrained["memorization"] < 2 / 128, untrained
    # measured here: 0.92 and 1.00 (seed 0)
    assert scores["compression"] > 0.5 and scores["memorization"] > 0.5, scores
    assert scores["mean"] == pytest.approx((scores["compression"] + scores["memorization"]) / 2)
