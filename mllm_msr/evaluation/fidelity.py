"""Memory-fidelity diagnostic on the bundled benchmark: does each link of the chain keep the
hidden attributes (image description → fused item summary → final user summary)?

The benchmark's ground truth is read only here, inside evaluation; no model ever sees it. A text
"names" an attribute when the true value occurs in it as a word (case-insensitive). For users, the
true value is the one liked at the test target's position (the *current* colour after a drift).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mllm_msr.data.synth import load_ground_truth

ITEM_ATTRS = ("colour", "pattern", "shape", "genre")
USER_ATTRS = {"colour": "colour", "pattern": "pattern", "genre": "genre"}


# the chain's links in order (records stored with sorted keys are rendered back in this order)
STAGES = ("image description (MLLM)", "fused item summary", "final user summary (current liked value)")

def names(text: str, value: str) -> bool:
    return re.search(rf"\b{re.escape(value.lower())}\b", text.lower()) is not None


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def item_fidelity(texts: Mapping[str, str], gt_items: Mapping[str, dict]) -> dict:
    """Share of ``texts`` (item id → text) that name the item's colour / pattern / shape / genre."""
    ids = [i for i in texts if i in gt_items]
    out: dict = {"n": len(ids)}
    for a in ITEM_ATTRS:
        out[a] = _share([names(texts[i], gt_items[i][a]) for i in ids])
    return out


def current_likes(user_gt: dict) -> dict[str, str]:
    """What the user likes at their last position (the segment of the timeline active there)."""
    last = user_gt["length"] - 1
    seg = max((s for s in user_gt["timeline"] if s["start"] <= last), key=lambda s: s["start"])
    return {a: seg[a] for a in USER_ATTRS}


def user_fidelity(summaries: Mapping[str, str], gt_users: Mapping[str, dict]) -> dict:
    """Share of final user summaries (user id → text) naming the *current* liked value."""
    ids = [u for u in summaries if u in gt_users]
    out: dict = {"n": len(ids), "shape": None}  # the benchmark has no liked shape
    likes = {u: current_likes(gt_users[u]) for u in ids}
    for a in USER_ATTRS:
        out[a] = _share([names(summaries[u], likes[u][a]) for u in ids])
    return out


def probe_scores(cases: Sequence[Mapping], gt_items: Mapping[str, dict]) -> list[list[float]]:
    """The text-match probe: for each stored case (``summary``: the preference text the row's
    recommender read; ``candidates``), each candidate's count of its true attributes (colour,
    pattern, shape, genre) that the text names. Ranking by it measures what the text carries,
    apart from what the recommender makes of it."""
    return [[float(sum(names(c["summary"], gt_items[i][a]) for a in ITEM_ATTRS)) if i in gt_items else 0.0
             for i in c["candidates"]] for c in cases]


def chain_fidelity(bench_root: str | Path, image_descriptions: Mapping[str, str],
                   item_summaries: Mapping[str, str], user_summaries: Mapping[str, str],
                   only_items: Iterable[str] | None = None) -> dict[str, dict]:
    """Every link of the chain: image descriptions, fused item summaries, final user summaries."""
    gt = load_ground_truth(Path(bench_root))
    keep = set(only_items) if only_items is not None else None

    def pick(d: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in d.items() if keep is None or k in keep}

    return dict(zip(STAGES, (item_fidelity(pick(image_descriptions), gt["items"]),
                             item_fidelity(pick(item_summaries), gt["items"]),
                             user_fidelity(user_summaries, gt["users"])), strict=True))


def degeneration(summaries: Iterable[str]) -> dict[str, float | None]:
    """How often summaries loop or run out of tokens (no ground truth needed): ``repeated`` = the
    share whose answer (after the first ':') lists the same comma/'and'-separated phrase twice (a
    greedy repetition loop), ``unfinished`` = the share that does not end a sentence (cut by the
    token limit)."""
    texts = list(summaries)
    repeated, unfinished = [], []
    for t in texts:
        parts = [p.strip().rstrip(".").lower() for p in re.split(r",| and ", t.split(":", 1)[-1]) if p.strip()]
        repeated.append(len(parts) != len(set(parts)))
        unfinished.append(not t.rstrip().endswith((".", "!", "?")))
    return {"n": len(texts), "repeated": _share(repeated), "unfinished": _share(unfinished)}
