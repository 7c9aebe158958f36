"""ID-based baselines on small synthetic benchmarks: training, cold items, image features."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mllm_msr.data.protocol import ProtocolConfig, build_splits
from mllm_msr.data.schema import Dataset, Interaction, Item
from mllm_msr.evaluation.baselines import (
    BaselineConfig,
    BaselineGrid,
    GRU4Rec,
    Popularity,
    SASRec,
    SASRecImage,
    image_feature,
    prefix_examples,
    training_sequences,
    tune,
)
from mllm_msr.metrics import evaluate

torch.set_num_threads(1)
FAST = BaselineConfig(epochs=10, dim=16, batch_size=64, patience=0)


@pytest.fixture(scope="module")
def ds(synth_dataset):
    return synth_dataset


@pytest.fixture(scope="module")
def splits(ds):
    return build_splits(ds, ProtocolConfig())


def test_training_sequences_are_whole_train_user_sequences(ds):
    capped = build_splits(ds, ProtocolConfig(max_history=3))
    seqs = training_sequences(capped)
    assert set(seqs) == set(capped.train_users)
    full = ds.sequences()
    for u, s in seqs.items():
        assert s == [i.item_id for i in full[u]]
    assert max(map(len, seqs.values())) > 4  # not only the latest max_history + 1 items
    assert not set().union(*map(set, seqs.values())) & capped.cold_items


def test_prefix_examples_every_prefix_capped():
    inputs, targets = prefix_examples([["a", "b", "c", "d"], ["x", "y"]], max_len=2)
    assert targets == ["b", "c", "d", "y"]
    assert inputs == [["a"], ["a", "b"], ["b", "c"], ["x"]]


@pytest.mark.parametrize("cls", [GRU4Rec, SASRec, SASRecImage])
def test_train_loss_decreases_and_scores_are_finite(cls, ds, splits):
    m = cls(FAST).fit(splits, ds)
    assert len(m.losses) == FAST.epochs
    assert m.losses[-1] < m.losses[0]
    scores = m.score_many(splits.test)
    assert [len(s) for s in scores] == [len(c.candidates) for c in splits.test]
    assert all(math.isfinite(x) for s in scores for x in s)
    assert m.score(splits.test[0]) == pytest.approx(scores[0], abs=1e-5)


def test_seeded(ds, splits):
    a = SASRec(FAST).fit(splits, ds).score(splits.test[0])
    b = SASRec(FAST).fit(splits, ds).score(splits.test[0])
    c = SASRec(FAST.model_copy(update={"seed": 5})).fit(splits, ds).score(splits.test[0])
    assert a == b and a != c


def test_popularity_equal_counts_equal_scores(ds, splits):
    m = Popularity().fit(splits, ds)
    case = splits.test[0]
    scores = m.score(case)
    for c, s in zip(case.candidates, scores, strict=True):
        assert s == m.counts.get(c, 0)
    by_count: dict[int, set[float]] = {}
    for case in splits.test:
        for c, s in zip(case.candidates, m.score(case), strict=True):
            by_count.setdefault(m.counts.get(c, 0), set()).add(s)
    assert all(len(v) == 1 for v in by_count.values())


def test_cold_items_id_models_tie_image_model_separates(ds, splits):
    cold = sorted(splits.cold_items)
    covers = [i for i in cold if ds.items[i].image_path is not None]
    colour = ds.items[covers[0]].attributes["colour"]
    a, b = covers[0], next(i for i in covers[1:] if ds.items[i].attributes["colour"] != colour)
    case = replace(splits.test[0], candidates=(a, b), labels=(1, 0))
    ids = SASRec(FAST).fit(splits, ds).score(case)
    assert ids[0] == ids[1] == 0.0
    gru = GRU4Rec(FAST).fit(splits, ds).score(case)
    assert gru[0] == gru[1]
    img = SASRecImage(FAST).fit(splits, ds).score(case)
    assert img[0] != img[1]


def test_image_feature(ds):
    item = next(iter(ds.items.values()))
    f = image_feature(item.image_path)
    assert f is not None and f.shape == (8 * 8 * 3 + 4 ** 3,)
    assert image_feature(None) is None


@pytest.mark.parametrize("cls", [GRU4Rec, SASRec])
def test_models_learn_item_transitions(cls):
    """Every user walks the same cycle of 12 items from a random start: the next item is fully
    determined by the last one, so a sequential model trained on the prefixes (default settings,
    early-stopped on validation) must rank it first for most test users."""
    import random

    rng = random.Random(0)
    items = {f"i{k:02d}": Item(f"i{k:02d}", f"Item {k}") for k in range(40)}
    inter = []
    for u in range(60):
        start = rng.randrange(12)
        for t in range(10):
            inter.append(Interaction(f"u{u:02d}", float(t), f"i{(start + t) % 12:02d}"))
    sp = build_splits(Dataset("cycle", items, inter), ProtocolConfig(split="leave_one_out", seed=1))
    m = cls(BaselineConfig(epochs=30, dim=16, batch_size=32, lr=0.01)).fit(sp)
    assert m.valid_history and m.best_epoch <= len(m.losses)
    metrics = evaluate(sp.test, m.score_many(sp.test))
    assert metrics["hr@5"] > 0.8 and metrics["auc"] > 0.9


def test_early_stopping_restores_best_epoch(ds, splits):
    cfg = FAST.model_copy(update={"epochs": 40, "patience": 2, "lr": 0.03})
    m = SASRec(cfg).fit(splits, ds)
    hist = m.valid_history
    assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1)) == list(range(1, len(m.losses) + 1))
    values = [h["ndcg@5"] for h in hist]
    assert m.best_epoch == 1 + values.index(max(values))
    assert len(hist) == 40 or len(hist) == m.best_epoch + cfg.patience  # stopped by patience
    restored = evaluate(splits.valid, m.score_many(splits.valid), ks=(5,))
    assert restored["ndcg@5"] == pytest.approx(max(values), abs=1e-9)


def test_no_early_stopping_without_patience(ds, splits):
    m = GRU4Rec(FAST).fit(splits, ds)
    assert m.valid_history == [] and m.best_epoch == FAST.epochs == len(m.losses)


def test_tune_records_every_point_and_never_reads_test(ds, splits):
    grid = BaselineGrid(dim=[8, 16], lr=[0.01], dropout=[0.2], epochs=[4])
    res = tune("gru4rec", replace(splits, test=[]), ds, FAST.model_copy(update={"patience": 2}), grid)
    assert [p.params for p in res.points] == grid.points() and len(res.points) == 2
    best = max(res.points, key=lambda p: p.valid["ndcg@5"])
    assert res.chosen.dim == best.params["dim"] and res.chosen.patience == 2
    assert all(set(p.valid) == {"auc", "hr@5", "mrr@5", "ndcg@5"} and 1 <= p.best_epoch <= 4 for p in res.points)
    again = evaluate(splits.valid, res.fitted.score_many(splits.valid), ks=(5,))
    assert again["ndcg@5"] == pytest.approx(best.valid["ndcg@5"])
    assert "chosen" in res.model_dump() and "fitted" not in res.model_dump()
    pop = tune("popularity", splits, ds)
    assert len(pop.points) == 1 and pop.points[0].params == {}
