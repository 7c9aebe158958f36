"""SFT examples of the yes/no recommender: :class:`SFTExample`, builders and JSONL I/O.

From the pipeline's stored recurrent summaries (:func:`examples_from_store`): for every training
user and every stored summary version (after block b, covering ``history[:e]``), the next item
``seq[e]`` is a positive and one never-touched item a negative (1:1, as the paper), drawn uniformly
or in proportion to the item's popularity in the training sequences (``popularity``: then positives
and negatives share one item prior, and only the match between preference text and candidate tells
them apart; items never seen in training are never drawn). TALLRec-style rows straight from the
sequences: :func:`examples_from_sequences`.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mllm_msr.data.schema import Item

ANSWERS = ("yes", "no")


@dataclass(frozen=True)
class SFTExample:
    """One pointwise example: preference summary, candidate item, answer ("yes"/"no")."""

    user_summary: str
    item: Item
    label: str
    user_id: str = ""

    def __post_init__(self) -> None:
        if self.label not in ANSWERS:
            raise ValueError(f"label must be 'yes' or 'no', got {self.label!r}")


def _label(v: Any) -> str:
    if isinstance(v, str) and v.strip().lower() in ANSWERS:
        return v.strip().lower()
    if v in (1, True):
        return "yes"
    if v in (0, False):
        return "no"
    raise ValueError(f"label must be yes/no or 1/0, got {v!r}")


def build_sft_examples(triples: Iterable[SFTExample | Sequence[Any]]) -> list[SFTExample]:
    """(user_summary, Item, label) triples (label "yes"/"no" or 1/0, optional 4th: user id)."""
    out: list[SFTExample] = []
    for n, t in enumerate(triples):
        if isinstance(t, SFTExample):
            out.append(t)
            continue
        if len(t) not in (3, 4):
            raise ValueError(f"example {n}: expected (user_summary, item, label[, user_id]), got {len(t)} fields")
        summary, item, label = t[0], t[1], t[2]
        if not isinstance(item, Item):
            raise ValueError(f"example {n}: candidate must be an Item, got {type(item).__name__}")
        out.append(SFTExample(str(summary), item, _label(label), str(t[3]) if len(t) == 4 else ""))
    return out


def _next_position(seq: Sequence[str], covered: Sequence[str]) -> int | None:
    """Index in ``seq`` of the item right after the contiguous window ``covered`` (latest match)."""
    k = len(covered)
    if k == 0 or k > len(seq):
        return None
    cov = list(covered)
    for end in range(len(seq), k - 1, -1):
        if list(seq[end - k:end]) == cov:
            return end
    return None


def examples_from_store(store, sequences: Mapping[str, Sequence[Any]], users: Iterable[str],
                        catalog: Mapping[str, Item], *, seed: int = 0, negatives: int = 1,
                        source: str = "history", positions: Literal["all", "block_ends"] = "all",
                        context: Callable[[str, list[str]], str] | None = None,
                        popularity: Mapping[str, int] | None = None) -> list[SFTExample]:
    """SFT examples from the pipeline's own stored recurrent summaries.

    ``sequences``: user → chronological item ids (or Interactions). Each stored version
    (``store.user_history(user)``, ``source`` versions only) covers the sequence up to some end
    position. ``positions="block_ends"``: one case per version end e; ``"all"``: every position e
    after the first version's end, each with the latest summary whose window ends at or before e
    (the recent items in ``context`` fill the gap; about block_size times more data). At each case
    ``seq[e]`` is a "yes" and ``negatives`` items the user never touched are "no" (seeded per user
    and position), drawn uniformly, or with ``popularity`` (item → count) in proportion to it.
    ``context(summary, history_before_e)`` turns the summary into the preference text the
    recommender shows (``Recommender.context`` with the recent items'
    summaries), so training sees exactly what inference sees."""
    pool = sorted(catalog)
    out: list[SFTExample] = []
    for u in sorted(set(users)):
        seq = [getattr(x, "item_id", x) for x in sequences.get(u, ())]
        if not seq:
            continue
        touched = set(seq)
        by_end: dict[int, str] = {}
        for v in store.user_history(u):  # oldest first: a later version of the same end wins
            if v.source != source or not v.summary.strip():
                continue
            e = _next_position(seq, v.covered)
            if e is not None and e < len(seq):
                by_end[e] = v.summary
        if not by_end:
            continue
        ends = sorted(by_end)
        cases = ends if positions == "block_ends" else range(ends[0], len(seq))
        cands = _negative_pool([i for i in pool if i not in touched], popularity)
        for e in cases:
            summary = by_end[max(x for x in ends if x <= e)]
            text = context(summary, seq[:e]) if context else summary
            out += _case(text, u, seq[e], e, cands, catalog, seed, negatives)
    return out


def _negative_pool(cands: list[str], popularity: Mapping[str, int] | None) -> tuple[list[str], list[int] | None]:
    """Built once per user: (items, None) for a uniform draw, or with ``popularity`` (the items
    with a count > 0, their counts); uniform again when none has a count."""
    if popularity is not None:
        counted = [c for c in cands if popularity.get(c, 0) > 0]
        if counted:
            return counted, [popularity[c] for c in counted]
    return cands, None


def _draw(rng: random.Random, pool: tuple[list[str], list[int] | None], k: int) -> list[str]:
    """``k`` distinct items of the pool: uniformly, or in proportion to its weights."""
    items, weights = pool
    if weights is None:
        return rng.sample(items, min(k, len(items)))
    left, w = list(items), list(weights)
    out: list[str] = []
    while left and len(out) < k:
        n = rng.choices(range(len(left)), weights=w)[0]
        out.append(left.pop(n))
        w.pop(n)
    return out


def _case(text: str, user: str, positive: str, e: int, pool: tuple[list[str], list[int] | None],
          catalog: Mapping[str, Item], seed: int, negatives: int) -> list[SFTExample]:
    """The "yes" at position e and ``negatives`` never-touched "no" items (seeded per user, position)."""
    rng = random.Random(f"{seed}:sft:{user}:{e}")
    return [SFTExample(text, catalog[positive], "yes", user),
            *(SFTExample(text, catalog[n], "no", user) for n in _draw(rng, pool, negatives))]


def examples_from_sequences(sequences: Mapping[str, Sequence[Any]], users: Iterable[str],
                            catalog: Mapping[str, Item], context: Callable[[list[str]], str], *,
                            seed: int = 0, negatives: int = 1, min_history: int = 3,
                            popularity: Mapping[str, int] | None = None) -> list[SFTExample]:
    """TALLRec-style examples straight from the sequences (no summaries): at every position
    e >= ``min_history`` the preference text is ``context(seq[:e])`` (the history's item ids;
    ``Services.preference_text`` in titles mode), ``seq[e]`` is a
    "yes" and ``negatives`` never-touched items are "no" (same seeding and ``popularity`` as
    :func:`examples_from_store`)."""
    pool = sorted(catalog)
    out: list[SFTExample] = []
    for u in sorted(set(users)):
        seq = [getattr(x, "item_id", x) for x in sequences.get(u, ())]
        touched = set(seq)
        cands = _negative_pool([i for i in pool if i not in touched], popularity)
        for e in range(max(1, min_history), len(seq)):
            text = context(seq[:e])
            out += _case(text, u, seq[e], e, cands, catalog, seed, negatives)
    return out


def save_examples_jsonl(examples: Sequence[SFTExample], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for ex in examples:
            it = ex.item
            f.write(json.dumps({"user_id": ex.user_id, "user_summary": ex.user_summary, "label": ex.label,
                                "item_id": it.item_id, "title": it.title, "text": it.text,
                                "image_path": str(it.image_path) if it.image_path else None}) + "\n")
    return p


def load_examples_jsonl(path: str | Path) -> list[SFTExample]:
    """Rows {user_summary, label, item_id, title, [text], [image_path], [user_id]}."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                item = Item(str(r["item_id"]), r["title"], r.get("text"),
                            Path(r["image_path"]) if r.get("image_path") else None)
                out.append(SFTExample(r["user_summary"], item, _label(r["label"]), str(r.get("user_id", ""))))
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{path}: line {n}: {e}") from e
    return out

