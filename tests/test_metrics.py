import math
import random

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mllm_msr.data.protocol import EvalCase
from mllm_msr.metrics import (
    auc_score,
    bootstrap_ci,
    evaluate,
    mean_ci,
    per_case_metrics,
    positive_rank,
)


def case(labels):
    n = len(labels)
    return EvalCase("u", (), (), tuple(f"i{k}" for k in range(n)), tuple(labels))


def test_auc_matches_sklearn_random_with_ties():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 40)
        y = [rng.randint(0, 1) for _ in range(n)]
        if len(set(y)) < 2:
            y[0], y[1] = 0, 1
        s = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        assert auc_score(y, s) == pytest.approx(roc_auc_score(y, s))


def test_auc_hand_examples():
    assert auc_score([1, 0, 0], [0.9, 0.1, 0.2]) == 1.0
    assert auc_score([1, 0, 0], [0.1, 0.9, 0.2]) == 0.0
    assert auc_score([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)  # one tie = 0.5
    assert auc_score([1, 0], [0.3, 0.3]) == 0.5
    assert math.isnan(auc_score([1, 1], [0.3, 0.4]))


def test_pooled_auc_equals_sklearn_on_concatenation():
    rng = random.Random(1)
    cases, scores = [], []
    for _ in range(20):
        labels = [1] + [0] * 20
        rng.shuffle(labels)
        cases.append(case(labels))
        scores.append([round(rng.random(), 1) for _ in labels])
    res = evaluate(cases, scores)
    y = [label for c in cases for label in c.labels]
    s = [x for sc in scores for x in sc]
    assert res["auc"] == pytest.approx(roc_auc_score(y, s))
    per = [roc_auc_score(c.labels, sc) for c, sc in zip(cases, scores, strict=True)]
    assert res["user_auc"] == pytest.approx(np.mean(per))


def test_rank_is_pessimistic_on_ties():
    assert positive_rank([0, 1, 0, 0], [0.5, 0.5, 0.5, 0.1]) == 3
    assert positive_rank([1, 0, 0], [0.9, 0.1, 0.2]) == 1
    # A constant scorer must not look good.
    c = case([0] * 10 + [1] + [0] * 10)
    res = evaluate([c], [[0.0] * 21], ks=(5, 10))
    assert res["hr@5"] == 0.0 and res["hr@10"] == 0.0 and res["mrr@10"] == 0.0
    assert res["auc"] == 0.5
    assert res["mean_rank"] == 21


def test_hr_mrr_ndcg_hand_examples():
    cases = [case([1, 0, 0, 0, 0, 0]), case([0, 1, 0, 0, 0, 0]), case([0, 0, 1, 0, 0, 0])]
    scores = [
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # rank 1
        [0.9, 0.1, 0.2, 0.3, 0.0, 0.05],  # rank 4 (0.9, 0.3, 0.2 above)
        [0.9, 0.8, 0.1, 0.7, 0.6, 0.5],  # rank 6
    ]
    res = evaluate(cases, scores, ks=(1, 5))
    assert res["hr@1"] == pytest.approx(1 / 3)
    assert res["hr@5"] == pytest.approx(2 / 3)
    assert res["mrr@5"] == pytest.approx((1 + 1 / 4) / 3)
    assert res["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert res["mrr@1"] == pytest.approx(1 / 3)
    per = per_case_metrics(cases, scores, ks=(5,))
    assert per["rank"] == [1.0, 4.0, 6.0]


def test_input_validation():
    with pytest.raises(ValueError):
        evaluate([case([1, 0])], [[0.1]])
    with pytest.raises(ValueError):
        evaluate([case([1, 0])], [[0.1, float("nan")]])
    with pytest.raises(ValueError):
        evaluate([case([1, 1, 0])], [[0.1, 0.2, 0.3]])
    with pytest.raises(ValueError):
        evaluate([case([1, 0])], [])


def test_confidence_helpers():
    m, lo, hi = bootstrap_ci([0.0, 1.0] * 50, seed=0)
    assert m == 0.5 and lo < 0.5 < hi and hi - lo < 0.3
    assert bootstrap_ci([1.0, 0.0, 1.0], seed=3) == bootstrap_ci([1.0, 0.0, 1.0], seed=3)
    mean, half = mean_ci([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82) and half == pytest.approx(4.303 * 0.02 / math.sqrt(3), rel=1e-3)
    assert mean_ci([0.7]) == (0.7, 0.0)
