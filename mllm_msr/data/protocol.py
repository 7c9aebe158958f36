"""Evaluation protocol as in the paper: k-core, chronological sequences, split by user, negatives.

For each user the last interaction is the target and the previous ones (capped at
``max_history``) are the history. Users are split 80/10/10 (seeded); ``leave_one_out`` instead
uses every user's last item for test, the one before for validation and the rest for training.
Negatives are drawn uniformly from items the user never touched: 1:1 for train, 1 positive :
``valid_negatives`` / ``test_negatives`` (both 20 by default) for validation and test.
Everything is seeded and independent of dict order.

Chronology and ties: a user's interactions are ordered by timestamp; interactions with the SAME
timestamp keep the order in which they appear in ``dataset.interactions``, i.e. the order of the
source file (loaders keep it; the sort is stable). This is the rule RecBole and most tools use, so
targets and histories can be compared with theirs (on MovieLens-100k 415 users rate their last two
items in the same second; breaking ties by item id changes 282 of 943 test targets).

:attr:`Splits.train_sequences` holds each training user's full training sequence (for
``leave_one_out``: everything before the validation target), which sequential baselines turn into
one next-item example per prefix.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from mllm_msr.data.schema import Dataset, Interaction


class ProtocolConfig(BaseModel):
    """Settings of the preprocessing and split."""

    k_core: int = Field(0, ge=0, description=(
        "Iterative k-core: drop users and items with fewer than k interactions until stable (0 = off)."))
    max_history: int = Field(20, ge=1, description="Keep at most this many most recent interactions as history.")
    min_sequence_length: int = Field(2, ge=2, description=(
        "Users with fewer interactions (history + target) are dropped."))
    split: Literal["user", "leave_one_out"] = Field("user", description=(
        "'user': split users 80/10/10 (paper); 'leave_one_out': last item test, second last validation, rest train "
        "for every user."))
    train_frac: float = Field(0.8, gt=0.0, lt=1.0, description="Fraction of users for training (split='user').")
    valid_frac: float = Field(0.1, ge=0.0, lt=1.0, description=(
        "Fraction of users for validation (split='user'); test gets the rest."))
    seed: int = Field(0, description="Seed of the user split and of negative sampling.")
    train_negatives: int = Field(1, ge=0, description="Negatives per training positive (paper 1:1).")
    valid_negatives: int = Field(20, ge=1, description=(
        "Negatives per validation case: 20 = the test protocol (1:20), so settings are chosen on validation users "
        "with the metric they are reported with."))
    test_negatives: int = Field(20, ge=1, description="Negatives per test case (paper 1:20).")
    train_targets_per_user: int = Field(1, ge=1, description=(
        "Targets per training user: 1 = the last item (paper); n > 1 also uses the n-1 previous positions."))


@dataclass(frozen=True)
class EvalCase:
    """One ranking case: the candidates (shuffled) and their labels; exactly one label is 1."""

    user_id: str
    history: tuple[str, ...]
    history_timestamps: tuple[float, ...]
    candidates: tuple[str, ...]
    labels: tuple[int, ...]

    @property
    def target(self) -> str:
        return self.candidates[self.labels.index(1)]


@dataclass(frozen=True)
class TrainExample:
    """One pointwise training example: the history and one candidate with its label."""

    user_id: str
    history: tuple[str, ...]
    history_timestamps: tuple[float, ...]
    item_id: str
    label: int


@dataclass(frozen=True)
class Splits:
    train: list[TrainExample]
    valid: list[EvalCase]
    test: list[EvalCase]
    train_users: tuple[str, ...]
    valid_users: tuple[str, ...]
    test_users: tuple[str, ...]
    cold_items: frozenset[str]
    n_items: int = 0
    dropped_users: int = 0
    train_sequences: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)
    """Each training user's whole training item sequence in time order (not capped by ``max_history``)."""

    def summary(self) -> dict[str, int]:
        return {"train_examples": len(self.train), "valid_cases": len(self.valid),
                "test_cases": len(self.test), "train_users": len(self.train_users),
                "valid_users": len(self.valid_users), "test_users": len(self.test_users),
                "cold_items": len(self.cold_items), "items": self.n_items,
                "dropped_users": self.dropped_users}


def split_users(users: Sequence[str], *, seed: int = 0, train_frac: float = 0.8,
                valid_frac: float = 0.1) -> tuple[list[str], list[str], list[str]]:
    """Seeded split of users into (train, valid, test); input order does not matter."""
    order = sorted(users)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_train = int(round(train_frac * n))
    n_valid = min(n - n_train, int(round(valid_frac * n)))
    return (sorted(order[:n_train]), sorted(order[n_train:n_train + n_valid]),
            sorted(order[n_train + n_valid:]))


def chronological(interactions: Sequence[Interaction]) -> dict[str, list[Interaction]]:
    """Each user's interactions by timestamp; equal timestamps keep their input (file) order."""
    seqs: dict[str, list[Interaction]] = {}
    for it in sorted(interactions, key=lambda i: (i.user_id, i.timestamp)):  # stable sort
        seqs.setdefault(it.user_id, []).append(it)
    return seqs


def k_core(interactions: Sequence[Interaction], k: int) -> list[Interaction]:
    """Iteratively keep only users and items with at least ``k`` interactions."""
    inter = list(interactions)
    if k <= 1:
        return inter
    while True:
        uc = Counter(i.user_id for i in inter)
        ic = Counter(i.item_id for i in inter)
        kept = [i for i in inter if uc[i.user_id] >= k and ic[i.item_id] >= k]
        if len(kept) == len(inter):
            return kept
        inter = kept


def _sample_negatives(rng: random.Random, pool: Sequence[str], pool_set: frozenset[str],
                      exclude: set[str], n: int) -> list[str]:
    """``n`` distinct items from ``pool`` not in ``exclude``, uniformly (fewer if not enough exist)."""
    available = len(pool) - sum(1 for x in exclude if x in pool_set)
    n = min(n, max(0, available))
    if n == 0:
        return []
    if n > available // 2:  # dense: enumerate
        return rng.sample([x for x in pool if x not in exclude], n)
    out: list[str] = []
    chosen: set[str] = set()
    while len(out) < n:
        x = pool[rng.randrange(len(pool))]
        if x not in exclude and x not in chosen:
            chosen.add(x)
            out.append(x)
    return out


def build_splits(dataset: Dataset, cfg: ProtocolConfig | None = None) -> Splits:
    """The train examples, validation and test cases of ``dataset`` under ``cfg``."""
    cfg = cfg or ProtocolConfig()
    inter = k_core(dataset.interactions, cfg.k_core)
    pool = sorted({i.item_id for i in inter}) if cfg.k_core > 1 else sorted(dataset.items)
    pool_set = frozenset(pool)
    seqs = chronological(inter)
    min_len = cfg.min_sequence_length + (1 if cfg.split == "leave_one_out" else 0)
    all_users = sorted(seqs)
    users = [u for u in all_users if len(seqs[u]) >= min_len]
    dropped = len(all_users) - len(users)
    touched = {u: {i.item_id for i in seqs[u]} for u in users}

    def rng_for(user: str, role: str, pos: int) -> random.Random:
        return random.Random(f"{cfg.seed}:{role}:{user}:{pos}")

    def history(user: str, t: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
        start = max(0, t - cfg.max_history)
        part = seqs[user][start:t]
        return tuple(i.item_id for i in part), tuple(float(i.timestamp) for i in part)

    def eval_case(user: str, t: int, role: str, n_neg: int) -> EvalCase:
        rng = rng_for(user, role, t)
        h, ts = history(user, t)
        target = seqs[user][t].item_id
        negs = _sample_negatives(rng, pool, pool_set, touched[user], n_neg)
        cands = [(target, 1)] + [(n, 0) for n in negs]
        rng.shuffle(cands)
        return EvalCase(user, h, ts, tuple(c for c, _ in cands), tuple(lab for _, lab in cands))

    def train_examples(user: str, positions: list[int]) -> list[TrainExample]:
        out = []
        for t in positions:
            rng = rng_for(user, "train", t)
            h, ts = history(user, t)
            out.append(TrainExample(user, h, ts, seqs[user][t].item_id, 1))
            for n in _sample_negatives(rng, pool, pool_set, touched[user], cfg.train_negatives):
                out.append(TrainExample(user, h, ts, n, 0))
        return out

    train: list[TrainExample] = []
    valid: list[EvalCase] = []
    test: list[EvalCase] = []
    train_seen: set[str] = set()
    train_seqs: dict[str, tuple[str, ...]] = {}
    if cfg.split == "user":
        tr_u, va_u, te_u = split_users(users, seed=cfg.seed, train_frac=cfg.train_frac,
                                       valid_frac=cfg.valid_frac)
        for u in tr_u:
            L = len(seqs[u])
            positions = list(range(L - 1, max(0, L - 1 - cfg.train_targets_per_user), -1))
            train += train_examples(u, sorted(positions))
            train_seen |= touched[u]
            train_seqs[u] = tuple(i.item_id for i in seqs[u])
        valid = [eval_case(u, len(seqs[u]) - 1, "valid", cfg.valid_negatives) for u in va_u]
        test = [eval_case(u, len(seqs[u]) - 1, "test", cfg.test_negatives) for u in te_u]
    else:
        tr_u = va_u = te_u = users
        for u in users:
            L = len(seqs[u])
            last_train = L - 3
            positions = [t for t in range(last_train, last_train - cfg.train_targets_per_user, -1) if t >= 1]
            train += train_examples(u, sorted(positions))
            train_seen |= {i.item_id for i in seqs[u][:L - 2]}
            train_seqs[u] = tuple(i.item_id for i in seqs[u][:L - 2])
            valid.append(eval_case(u, L - 2, "valid", cfg.valid_negatives))
            test.append(eval_case(u, L - 1, "test", cfg.test_negatives))
    test_items = {c for case in test for c in case.candidates}
    return Splits(train=train, valid=valid, test=test, train_users=tuple(tr_u),
                  valid_users=tuple(va_u), test_users=tuple(te_u),
                  cold_items=frozenset(test_items - train_seen), n_items=len(pool),
                  dropped_users=dropped, train_sequences=train_seqs)
