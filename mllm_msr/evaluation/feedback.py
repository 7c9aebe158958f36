"""Feedback that is kept: does a chat message survive ``UserMemory.fold_feedback`` into the new
preference summary, and does the next ranking follow it? (bundled benchmark only)

A scripted, seeded set of messages over validation users asks for one attribute value ("more like
the blue ones", "I'd like more mystery") and/or bans one ("nothing with stripes"); attributes are the
benchmark's colour / pattern / shape (the cover) and genre (the title), with the values of its catalog
(:func:`vocabulary`). For each message:

1. the user's current summary: the memory's latest version for the validation case's history
   (``Services.memory.update_many``, through :func:`mllm_msr.pipeline.summarize_cases`);
2. the case's candidates (1 positive + 20 negatives) scored with it (``Services.preference_text``
   + ``Services.recommender.score``, as ``score_cases`` does);
3. the message folded in (``fold_feedback``) by a copy of the memory that writes to a *scratch*
   store the caller gives: the feedback versions never reach the services' store, whose latest
   version per user is what ``msr chat`` / the web demo start from (the services' store only gets
   the item summaries and history versions any pipeline run caches under the same keys);
4. the same candidates scored again with the new summary.

Measures (per message, then shares):

* ``ask_kept``: the new summary *states* the asked value: it names one of the value's word forms
  (:func:`forms`, matched by :func:`mllm_msr.evaluation.fidelity.names`) at least once outside a
  negated phrase (see below);
* ``ban_dropped``: the new summary does *not* state a liking for the banned value: none of its
  word forms occurs, or every occurrence is negated;
* an occurrence is **negated** when one of the :data:`WINDOW` words before it, within the same
  clause, is a negation cue (:data:`NEGATIONS`: "no", "not", "without", "nothing", "avoid", ...,
  or any word ending in "n't"); clauses end at , ; : . ! ? ( ) and at "but", "while", "whereas",
  "although", "though", "however". "blue but not striped" states blue and drops striped;
  "avoids anything with stripes" drops stripes; "no red, blue or striped" states blue and striped
  (the cue's scope ends at the comma), a known limit of a word-window rule;
* ``kept``: every request of the message holds (``ask_kept`` and/or ``ban_dropped``); the target;
* the same flags on the unchanged summary (``before``): what a memory that ignores the message
  would score (the script never asks for the value the user already likes, so ``kept_ask`` stays
  low there; a ban the old summary never named is "dropped" for free, hence
  ``dropped_ban_stated``: ``dropped_ban`` over the messages whose old summary stated the banned
  value, which the script makes likelier by banning the user's liked value half the time);
* rank change per candidate = rank before − rank after (1 = top, tied scores share their mean
  rank; positive = moved up), pooled over (message, candidate) for the candidates that match the
  ask (and not the ban), carry the ban (and not the ask), both, or neither (``other``).

The benchmark's ground truth (``ground_truth.json``) is read only here, to script the messages and
to know which candidates match; no model sees it.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import fmean

from mllm_msr.data.covers import CATALOGS, DEFAULT_CATALOG, Catalog
from mllm_msr.data.protocol import EvalCase, build_splits
from mllm_msr.data.synth import ground_truth_catalog, load_ground_truth
from mllm_msr.evaluation.fidelity import current_likes, names
from mllm_msr.pipeline import Services, summarize_cases
from mllm_msr.stores.summaries import SummaryStore

KEPT_TARGET = 0.8


def vocabulary(catalog: Catalog = DEFAULT_CATALOG) -> dict[str, tuple[str, ...]]:
    """The attributes a message may ask for or ban, and their values, in ``catalog``."""
    return {"colour": tuple(catalog.colours), "pattern": catalog.patterns, "shape": catalog.shapes,
            "genre": catalog.genres}


VOCAB: dict[str, tuple[str, ...]] = vocabulary()  # the default catalog's
_SHAPES = frozenset(s for c in CATALOGS.values() for s in c.shapes)  # catalogs' values are disjoint
# extra word forms a summary may use for a value, in any catalog (the value itself always counts; shapes
# also as plurals)
EXTRA_FORMS: dict[str, tuple[str, ...]] = {
    "striped": ("stripes", "stripe", "stripy"), "dotted": ("dots", "dot", "polka-dot"),
    "sci-fi": ("science fiction", "scifi"), "comedy": ("comedies",), "documentary": ("documentaries",),
    "western": ("westerns",), "mystery": ("mysteries",), "romance": ("romances",),
    "checkerboard": ("checkered", "chequered", "checks", "checker"), "wavy": ("waves", "wave"),
    "gridded": ("grid", "grids"), "grey": ("gray",), "thriller": ("thrillers",),
    "drama": ("dramas",), "musical": ("musicals",), "animation": ("animated", "cartoons", "cartoon"),
    "biography": ("biographies", "biopic", "biopics"), "adventure": ("adventures",), "war": ("wars",),
    "crime": ("crimes",)}
# how a message names a value: as a noun phrase ("I'd like more {noun}", "nothing with {noun}")
_NOUNS: dict[str, str] = {"striped": "stripes", "dotted": "dots", "solid": "solid covers", "comedy": "comedies",
                          "documentary": "documentaries", "western": "westerns", "checkerboard": "checks",
                          "wavy": "wavy covers", "gridded": "grids", "thriller": "thrillers",
                          "drama": "dramas", "musical": "musicals", "biography": "biographies",
                          "adventure": "adventures", "war": "war films"}
ASK_TEMPLATES = ("more like the {adj} ones", "I'd like more {noun}", "show me more {noun} please",
                 "I'm in the mood for {noun}")
BAN_TEMPLATES = ("nothing with {noun}", "no {noun} please", "please avoid {noun}", "I don't want any {noun}")
NEGATIONS = frozenset({
    "no", "not", "never", "without", "nothing", "none", "neither", "nor", "avoid", "avoids", "avoided",
    "avoiding", "dislike", "dislikes", "disliked", "hate", "hates", "except", "excluding", "instead", "rather",
    "less", "fewer", "tired", "stop", "stopped"})
WINDOW = 4
_CLAUSE = re.compile(r"[,;:.!?()]|\b(?:but|while|whereas|although|though|however)\b")
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


@dataclass(frozen=True)
class Request:
    """One attribute value a message asks for or bans."""

    attribute: str  # colour | pattern | shape | genre
    value: str


@dataclass(frozen=True)
class FeedbackMessage:
    """A scripted chat message to ``user_id``; ``ask`` / ``ban``: what it requests (None: nothing)."""

    user_id: str
    text: str  # what the user types
    ask: Request | None = None
    ban: Request | None = None


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


def forms(value: str) -> tuple[str, ...]:
    """The words that name ``value`` in a summary (the value first)."""
    plural = (_plural(value),) if value in _SHAPES else ()
    return (value, *plural, *EXTRA_FORMS.get(value, ()))


def _phrase(r: Request) -> dict[str, str]:
    adj = f"{r.value}-shaped" if r.attribute == "shape" else r.value
    noun = f"{r.value} covers" if r.attribute == "colour" else _NOUNS.get(
        r.value, _plural(r.value) if r.attribute == "shape" else r.value)
    return {"adj": adj, "noun": noun}


def occurrences(text: str, value: str) -> list[bool]:
    """One flag per occurrence of a word form of ``value`` in ``text``: True when negated (a cue of
    :data:`NEGATIONS` among the :data:`WINDOW` words before it, in the same clause)."""
    low = text.lower().replace("\u2019", "'")
    out = []
    for f in forms(value):
        if not names(low, f):
            continue
        for m in re.finditer(rf"\b{re.escape(f)}\b", low):
            clause = _CLAUSE.split(low[:m.start()])[-1]
            before = _WORD.findall(clause)[-WINDOW:]
            out.append(any(w in NEGATIONS or w.endswith("n't") for w in before))
    return out


def states(text: str, value: str) -> bool:
    """``text`` names ``value`` at least once outside a negated phrase."""
    return any(not negated for negated in occurrences(text, value))


def flags(text: str, m: FeedbackMessage) -> dict[str, bool | None]:
    """``ask_kept`` / ``ban_dropped`` of one summary for one message (None: no such request)."""
    return {"ask_kept": states(text, m.ask.value) if m.ask else None,
            "ban_dropped": not states(text, m.ban.value) if m.ban else None}


def kept(f: Mapping[str, bool | None]) -> bool:
    return all(v for v in f.values() if v is not None)


def ranks(scores: Sequence[float]) -> list[float]:
    """Rank of each score (1 = best); tied scores share their mean rank."""
    return [1 + sum(t > s for t in scores) + (sum(t == s for t in scores) - 1) / 2 for s in scores]


def group(item: Mapping[str, str], m: FeedbackMessage) -> str:
    """'ask' / 'ban' / 'both' / 'other': which of the message's requests the item carries."""
    a = m.ask is not None and item[m.ask.attribute] == m.ask.value
    b = m.ban is not None and item[m.ban.attribute] == m.ban.value
    return "both" if a and b else "ask" if a else "ban" if b else "other"


# ------------------------------------------------------------------------------ the script

def feedback_cases(s: Services, n_users: int, seed: int = 0) -> list[EvalCase]:
    """A seeded sample of ``n_users`` validation cases (ordered by user id)."""
    valid = sorted(build_splits(s.dataset, s.cfg.protocol).valid, key=lambda c: c.user_id)
    if not valid:
        raise ValueError("the split has no validation users")
    picked = random.Random(seed).sample(valid, min(n_users, len(valid)))
    return sorted(picked, key=lambda c: c.user_id)


def script_messages(cases: Sequence[EvalCase], gt: Mapping[str, Mapping], n: int,
                    seed: int = 0) -> list[FeedbackMessage]:
    """``n`` distinct messages, round-robin over ``cases``: ask + ban, ask only, ban only in turn.

    An asked value occurs among the case's candidates and is never the value the user already likes
    (ground truth at the case's position); a banned value occurs among the candidates and is the
    liked one half of the time (when the attribute has one and a candidate carries it). The values
    are those of the benchmark's catalog (``gt["catalog"]``)."""
    vocab = vocabulary(ground_truth_catalog(gt))
    rng = random.Random(seed)
    used: set[str] = set()
    out: list[FeedbackMessage] = []
    for k in range(n):
        c = cases[k % len(cases)]
        items = [gt["items"][i] for i in c.candidates]
        present = {a: sorted({it[a] for it in items}) for a in vocab}
        likes = current_likes(gt["users"][c.user_id]) if c.user_id in gt["users"] else {}
        kind = ("both", "ask", "ban")[k % 3]
        msg = None
        for _ in range(100):
            msg = _draw(rng, c.user_id, kind, vocab, present, likes)
            if msg.text not in used:
                break
        assert msg is not None
        used.add(msg.text)
        out.append(msg)
    return out


def _draw(rng: random.Random, user_id: str, kind: str, vocab: Mapping[str, Sequence[str]],
          present: Mapping[str, Sequence[str]], likes: Mapping[str, str]) -> FeedbackMessage:
    ask = ban = None
    if kind in ("both", "ask"):
        a = rng.choice(list(vocab))
        options = [v for v in present[a] if v != likes.get(a)] or [v for v in vocab[a] if v != likes.get(a)]
        ask = Request(a, rng.choice(options))
    if kind in ("both", "ban"):
        b = rng.choice(list(vocab))
        options = [v for v in present[b] if ask is None or Request(b, v) != ask]
        liked = likes.get(b)
        ban = Request(b, liked if liked in options and rng.random() < 0.5 else rng.choice(options))
    parts = ([rng.choice(ASK_TEMPLATES).format(**_phrase(ask))] if ask else []) + \
            ([rng.choice(BAN_TEMPLATES).format(**_phrase(ban))] if ban else [])
    return FeedbackMessage(user_id, ", ".join(parts), ask, ban)


# ------------------------------------------------------------------------------ the evaluation

def run_feedback(s: Services, cases: Sequence[EvalCase], messages: Sequence[FeedbackMessage],
                 scratch: SummaryStore, gt_items: Mapping[str, Mapping[str, str]],
                 advance: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per message (see the module doc); feedback versions are written to ``scratch`` only."""
    if not s.uses_summaries:
        raise ValueError("feedback is folded into the preference summary: the titles mode reads none")
    if scratch is s.store:
        raise ValueError("the scratch store must not be the services' store")
    by_user = {c.user_id: c for c in cases}
    missing = sorted({m.user_id for m in messages} - set(by_user))
    if missing:
        raise ValueError(f"messages for users without a case: {missing[:5]}")
    used = [by_user[u] for u in dict.fromkeys(m.user_id for m in messages)]
    s.check_users([c.user_id for c in used])
    summaries, latest = summarize_cases(s, used)
    memory = replace(s.memory, store=scratch)
    before: dict[str, tuple[str, list[float]]] = {}
    for c in used:
        v = latest.get(c.user_id)
        text = v.summary if v else ""
        scores = s.recommender.score(s.preference_text(c.history, v.summary if v else None, summaries),
                                     s.items(c.candidates, f"user {c.user_id} candidates"))
        before[c.user_id] = (text, scores)
    rows = []
    for n, m in enumerate(messages, 1):
        c = by_user[m.user_id]
        old, old_scores = before[m.user_id]
        new = memory.fold_feedback(latest.get(m.user_id), m.user_id, m.text)
        new_scores = s.recommender.score(s.preference_text(c.history, new.summary, summaries),
                                         s.items(c.candidates, f"user {c.user_id} candidates"))
        f_before, f_after = flags(old, m), flags(new.summary, m)
        # what the model wrote itself: the summary without any verbatim copy of the user's message
        f_model = flags(new.summary.replace(m.text, " "), m)
        rows.append({"user_id": m.user_id, "message": m.text,
                     "ask": asdict(m.ask) if m.ask else None, "ban": asdict(m.ban) if m.ban else None,
                     "summary_before": old, "summary_after": new.summary,
                     "before": f_before, "after": f_after, "after_model_words": f_model, "kept": kept(f_after),
                     "candidates": list(c.candidates), "groups": [group(gt_items[i], m) for i in c.candidates],
                     "rank_before": ranks(old_scores), "rank_after": ranks(new_scores)})
        if advance:
            advance(n, len(messages))
    return rows


def _share(values: Sequence[bool | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return round(sum(vs) / len(vs), 4) if vs else None


def _measures(rows: Sequence[dict], side: str) -> dict:
    fs = [r[side] for r in rows]
    both = [kept(f) for f in fs if None not in f.values()]
    return {"kept": _share([kept(f) for f in fs]), "kept_ask": _share([f["ask_kept"] for f in fs]),
            "dropped_ban": _share([f["ban_dropped"] for f in fs]), "kept_both": _share(both)}


def _by_attribute(rows: Sequence[dict], attribute: str) -> dict:
    asks = [r["after"]["ask_kept"] for r in rows if r["ask"] and r["ask"]["attribute"] == attribute]
    bans = [r["after"]["ban_dropped"] for r in rows if r["ban"] and r["ban"]["attribute"] == attribute]
    return {"n_ask": len(asks), "kept_ask": _share(asks), "n_ban": len(bans), "dropped_ban": _share(bans)}


def feedback_report(rows: Sequence[dict]) -> dict:
    """The shares (after the feedback, and on the unchanged summary as a control), the mean rank
    change per candidate group, per-attribute shares and whether the targets are met."""
    changes: dict[str, list[float]] = {"ask": [], "ban": [], "both": [], "other": []}
    for r in rows:
        for g, b, a in zip(r["groups"], r["rank_before"], r["rank_after"], strict=True):
            changes[g].append(b - a)
    by_attr = {a: _by_attribute(rows, a) for a in VOCAB}
    after = _measures(rows, "after")
    rank = {g: round(fmean(v), 4) if v else None for g, v in changes.items()}
    stated = [r["after"]["ban_dropped"] for r in rows if r["before"]["ban_dropped"] is False]
    return {"n_messages": len(rows), "n_users": len({r["user_id"] for r in rows}),
            **after, "dropped_ban_stated": _share(stated), "n_ban_stated": len(stated),
            "before": _measures(rows, "before"),
            # the same shares with the user's verbatim words removed from the new summary (a prompt that
            # quotes the message keeps its requests by construction; this is what the model itself kept)
            "model_words": _measures(rows, "after_model_words"),
            "rank_change": rank, "n_ranked": {g: len(v) for g, v in changes.items()}, "by_attribute": by_attr,
            "kept_target": KEPT_TARGET, "kept_met": after["kept"] is not None and after["kept"] >= KEPT_TARGET,
            "ask_up_met": rank["ask"] is not None and rank["ask"] > 0,
            "ban_down_met": rank["ban"] is not None and rank["ban"] < 0}


def evaluate_feedback(s: Services, scratch: SummaryStore, n_messages: int = 50, n_users: int = 10,
                      seed: int = 0, bench_root: str | Path | None = None,
                      advance: Callable[[int, int], None] | None = None) -> tuple[dict, list[dict]]:
    """(report, rows) of ``n_messages`` scripted messages over ``n_users`` validation users of the
    bundled benchmark at ``bench_root`` (default: the services' dataset folder)."""
    root = Path(bench_root) if bench_root is not None else s.dataset.root
    if root is None or not (Path(root) / "ground_truth.json").is_file():
        raise ValueError(f"no ground_truth.json in {root}: the feedback evaluation needs the bundled benchmark")
    gt = load_ground_truth(Path(root))
    cases = feedback_cases(s, n_users, seed)
    messages = script_messages(cases, gt, n_messages, seed)
    rows = run_feedback(s, cases, messages, scratch, gt["items"], advance)
    return feedback_report(rows), rows
