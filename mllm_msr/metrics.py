"""Ranking metrics for the protocol's cases: AUC (as the paper), per-user AUC, HR/MRR/NDCG@K.

* ``auc`` pools every (positive, negative) pair of all cases, exactly as
  ``sklearn.metrics.roc_auc_score`` on the concatenated labels and scores (a tie counts 0.5).
* ``user_auc`` is the mean of each case's own AUC (cases with both classes).
* HR@K, MRR@K and NDCG@K need exactly one positive per case. Ties are broken PESSIMISTICALLY:
  the positive ranks after every negative with the same score, so a constant scorer gets rank
  ``n_candidates`` (HR@5 = 0 with 21 candidates), never a flattering rank 1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _check(cases: Sequence, scores: Sequence[Sequence[float]]) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(cases) != len(scores):
        raise ValueError(f"{len(cases)} cases but {len(scores)} score lists")
    out = []
    for n, (case, s) in enumerate(zip(cases, scores, strict=True)):
        labels = np.asarray(case.labels, dtype=int)
        arr = np.asarray(s, dtype=float)
        if arr.shape != labels.shape:
            raise ValueError(f"case {n}: {len(labels)} candidates but {arr.size} scores")
        if np.isnan(arr).any():
            raise ValueError(f"case {n}: NaN score")
        out.append((labels, arr))
    return out


def auc_score(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted 0.5 (= sklearn roc_auc_score); NaN if one class is absent."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    n_pos = int((y == 1).sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=float)
    i = 0
    while i < s.size:  # average ranks over ties
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def positive_rank(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> int:
    """1-based rank of the single positive, pessimistic on ties."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    if int(y.sum()) != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError("ranking metrics need exactly one positive label per case")
    pos = s[y == 1][0]
    neg = s[y == 0]
    return 1 + int((neg > pos).sum()) + int((neg == pos).sum())


def per_case_metrics(cases: Sequence, scores: Sequence[Sequence[float]],
                     ks: Sequence[int] = (5, 10)) -> dict[str, list[float]]:
    """Per-case values: ``user_auc`` (each case's AUC; NaN without both classes), ``rank``,
    and ``hr@K``, ``mrr@K``, ``ndcg@K`` for each K."""
    data = _check(cases, scores)
    out: dict[str, list[float]] = {"user_auc": [], "rank": []}
    for k in ks:
        out[f"hr@{k}"], out[f"mrr@{k}"], out[f"ndcg@{k}"] = [], [], []
    for labels, s in data:
        out["user_auc"].append(auc_score(labels, s))
        r = positive_rank(labels, s)
        out["rank"].append(float(r))
        for k in ks:
            hit = r <= k
            out[f"hr@{k}"].append(1.0 if hit else 0.0)
            out[f"mrr@{k}"].append(1.0 / r if hit else 0.0)
            out[f"ndcg@{k}"].append(1.0 / math.log2(r + 1) if hit else 0.0)
    return out


def evaluate(cases: Sequence, scores: Sequence[Sequence[float]], ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """``auc`` (pooled pairs, as the paper), ``user_auc`` (mean per case), ``hr@K``, ``mrr@K``,
    ``ndcg@K`` (pessimistic ties), ``mean_rank`` and ``n_cases``."""
    data = _check(cases, scores)
    if not data:
        raise ValueError("no cases to evaluate")
    labels = np.concatenate([y for y, _ in data])
    flat = np.concatenate([s for _, s in data])
    per = per_case_metrics(cases, scores, ks)
    uauc = [v for v in per["user_auc"] if not math.isnan(v)]
    result = {"auc": auc_score(labels, flat),
              "user_auc": float(np.mean(uauc)) if uauc else float("nan")}
    for k in ks:
        for m in ("hr", "mrr", "ndcg"):
            result[f"{m}@{k}"] = float(np.mean(per[f"{m}@{k}"]))
    result["mean_rank"] = float(np.mean(per["rank"]))
    result["n_cases"] = float(len(data))
    return result


def bootstrap_ci(per_case_values: Sequence[float], seed: int = 0, n_resamples: int = 2000,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean over cases (NaNs ignored)."""
    v = np.asarray([x for x in per_case_values if not math.isnan(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of a Student-t interval, e.g. a metric across seeds; half-width 0 for n<2."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size < 2:
        return float(v.mean()), 0.0
    from scipy.stats import t
    half = float(t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return float(v.mean()), half


# ----------------------------------------------------------------- intervals over users
# The unit of resampling is the user (one test case = one user's 1 positive + N negatives), so a
# pooled metric such as AUC is recomputed on each resample of users, and a paired difference
# resamples the same users for both rows.

def _pooled_auc_from(labels: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> float:
    """Pooled AUC over the users ``idx`` (rows of equal-length [users, candidates] arrays)."""
    from scipy.stats import rankdata

    y, s = labels[idx].ravel(), scores[idx].ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _stack(cases: Sequence, scores: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    data = _check(cases, scores)
    lengths = {len(y) for y, _ in data}
    if len(lengths) != 1:
        raise ValueError(f"user bootstrap needs the same number of candidates per user, got {sorted(lengths)}")
    return np.stack([y for y, _ in data]).astype(int), np.stack([s for _, s in data]).astype(float)


USER_METRICS = ("auc", "hr@5", "mrr@5", "ndcg@5")


def _stat(name: str, labels: np.ndarray, scores: np.ndarray, per: dict[str, np.ndarray], idx: np.ndarray) -> float:
    return _pooled_auc_from(labels, scores, idx) if name == "auc" else float(per[name][idx].mean())


def user_bootstrap(cases: Sequence, scores: Sequence[Sequence[float]], other: Sequence[Sequence[float]] | None = None,
                   metrics: Sequence[str] = USER_METRICS, n_resamples: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per metric: the value, and the percentile bootstrap 95% interval over users (resampled with
    replacement, metric recomputed, pooled AUC included). With ``other`` (another row's scores on
    the same cases): the paired difference ``scores - other`` and its interval, from the same
    resampled users for both rows."""
    labels, s = _stack(cases, scores)
    per = {k: np.asarray(v, dtype=float) for k, v in per_case_metrics(cases, scores, (5,)).items()}
    if other is not None:
        _, o = _stack(cases, other)
        per_o = {k: np.asarray(v, dtype=float) for k, v in per_case_metrics(cases, other, (5,)).items()}
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    draws = rng.integers(0, n, size=(n_resamples, n))
    everyone = np.arange(n)
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        value = _stat(m, labels, s, per, everyone)
        boot = np.array([_stat(m, labels, s, per, d) for d in draws])
        lo, hi = np.nanquantile(boot, [0.025, 0.975])
        entry: dict[str, Any] = {"value": value, "low": float(lo), "high": float(hi)}
        if other is not None:
            ov = _stat(m, labels, o, per_o, everyone)
            diffs = boot - np.array([_stat(m, labels, o, per_o, d) for d in draws])
            dlo, dhi = np.nanquantile(diffs, [0.025, 0.975])
            entry["diff"] = {"value": value - ov, "low": float(dlo), "high": float(dhi),
                             "p_le_zero": float(np.nanmean(diffs <= 0))}
        out[m] = entry
    out["users"] = {"value": float(n), "low": float(n), "high": float(n)}
    return out
