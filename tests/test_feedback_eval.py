"""The "feedback that is kept" evaluation (mllm_msr/evaluation/feedback.py) with fake backends: the
scripted messages, the kept / dropped measures, the sign of the rank changes, and the store the
feedback versions go to."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import pytest

from fakes import CountingChat, OverlapScorer
from helpers import SMALL_SYNTH
from mllm_msr.agents.recommender import RecommenderConfig
from mllm_msr.agents.user_memory import blocks_of
from mllm_msr.config import MSRConfig
from mllm_msr.data.covers import ALT_CATALOG
from mllm_msr.data.loaders import load_microlens
from mllm_msr.data.protocol import build_splits
from mllm_msr.data.synth import generate_benchmark, load_ground_truth
from mllm_msr.evaluation.feedback import (
    VOCAB,
    FeedbackMessage,
    Request,
    evaluate_feedback,
    feedback_report,
    flags,
    forms,
    occurrences,
    ranks,
    run_feedback,
    script_messages,
    vocabulary,
)
from mllm_msr.evaluation.fidelity import current_likes, names
from mllm_msr.pipeline import build_services
from mllm_msr.stores.summaries import StoreConfig, SummaryStore

CALM = "The user appears to have a preference for calm items."
Policy = Callable[[str, str], str]  # (previous summary, message) -> new summary


class FeedbackChat(CountingChat):
    """CountingChat whose user summaries name no attribute, and whose feedback prompts are answered
    by ``policy``."""

    ROLES = {**CountingChat.ROLES, "user": CALM}

    def __init__(self, policy: Policy, user_summary: str = CALM) -> None:
        self.ROLES = {**self.ROLES, "user": user_summary}
        super().__init__()
        self.policy = policy

    def generate(self, requests, **kw):
        out = []
        for r in requests:
            text = " ".join(p.get("text", "") for p in r.user_content)
            if "The user just said" in text:
                previous, said = re.findall(r"<data>(.*?)</data>", text, re.S)[:2]
                out.append(self.policy(previous, said))
            else:
                out.append(super().generate([r], **kw)[0])
        return out


@pytest.fixture(scope="module")
def gt(synth_root):
    return load_ground_truth(synth_root)


@pytest.fixture(scope="module")
def cases(synth_dataset):
    return build_splits(synth_dataset).valid


def services(dataset, tmp_path, policy: Policy, user_summary: str = CALM):
    cfg = MSRConfig(store=StoreConfig(path=str(tmp_path / "chroma")), run_dir=str(tmp_path / "run"),
                    recommender=RecommenderConfig(adapter=None))
    return build_services(cfg, dataset, generator=FeedbackChat(policy, user_summary), scorer=OverlapScorer())


def scratch(s, tmp_path) -> SummaryStore:
    return SummaryStore(StoreConfig(path=str(tmp_path / "scratch")), embedding=s.store.embedding)


def echo(previous: str, said: str) -> str:
    return f"{previous} The user said: {said}"


def test_scripted_set_is_distinct_deterministic_and_over_real_vocabulary(cases, gt):
    _check_script(cases, gt, VOCAB)


def test_scripted_set_on_the_alt_catalog_uses_its_vocabulary(tmp_path):
    """The second benchmark catalog: messages ask for and ban its own values, in recognised word forms."""
    alt = SMALL_SYNTH.model_copy(update={"catalog": "alt", "cold_item_fraction": 0.0, "cold_target_prob": 0.0})
    root = generate_benchmark(tmp_path / "alt", alt)
    gt = load_ground_truth(root)
    vocab = vocabulary(ALT_CATALOG)
    assert vocab != VOCAB and set(vocab) == set(VOCAB)
    ms = _check_script(build_splits(load_microlens(root)).valid, gt, vocab)
    asked_or_banned = {r.value for m in ms for r in (m.ask, m.ban) if r}
    assert not asked_or_banned & {v for vs in VOCAB.values() for v in vs}  # no default value
    assert flags("loves crosses and checkered covers", FeedbackMessage("u", "", Request("shape", "cross"),
                                                                        Request("pattern", "checkerboard"))) == {
        "ask_kept": True, "ban_dropped": False}


def _check_script(cases, gt, vocab) -> list[FeedbackMessage]:
    ms = script_messages(cases, gt, 60, seed=0)
    assert len({m.text for m in ms}) == 60 >= 50
    assert ms == script_messages(cases, gt, 60, seed=0) and ms != script_messages(cases, gt, 60, seed=1)
    assert all(m.ask or m.ban for m in ms)
    assert Counter((m.ask is not None, m.ban is not None) for m in ms) == {(True, True): 20, (True, False): 20,
                                                                           (False, True): 20}
    by_user = {c.user_id: c for c in cases}
    for m in ms:
        c = by_user[m.user_id]
        for r in (m.ask, m.ban):
            if r is None:
                continue
            assert r.value in vocab[r.attribute]
            assert any(gt["items"][i][r.attribute] == r.value for i in c.candidates)  # something to move
            assert any(names(m.text, f) for f in forms(r.value)), m  # the message names it
        if m.ask:  # never what the user already likes, and said affirmatively
            assert m.ask.value != current_likes(gt["users"][m.user_id]).get(m.ask.attribute)
            assert not all(occurrences(m.text, m.ask.value))
        if m.ban:  # every phrasing of a ban is a negated phrase
            assert all(occurrences(m.text, m.ban.value))
        assert m.ask != m.ban
    assert {r.attribute for m in ms for r in (m.ask, m.ban) if r} == set(vocab)
    return ms


def test_ban_and_ask_flags():
    m = FeedbackMessage("u", "more like the blue ones, nothing with stripes", Request("colour", "blue"),
                        Request("pattern", "striped"))
    # the summary: both requests lost (the ban is absent, so it is "dropped" but the ask is not kept)
    assert flags("The user appears to have a preference for a sci-fi film.", m) == {"ask_kept": False,
                                                                                  "ban_dropped": True}
    assert flags("The user appears to have a preference for blue covers without stripes.", m) == {
        "ask_kept": True, "ban_dropped": True}
    assert flags("The user likes blue, but not striped ones", m)["ban_dropped"] is True
    assert flags("The user now avoids anything with stripes and prefers blue", m) == {"ask_kept": True,
                                                                                       "ban_dropped": True}
    assert flags("The user doesn't want any more striped items", m)["ban_dropped"] is True
    assert flags("The user likes striped blue covers", m) == {"ask_kept": True, "ban_dropped": False}
    assert flags("The user does not like blue; prefers stripes", m) == {"ask_kept": False, "ban_dropped": False}
    # word forms: shapes as plurals, sci-fi spelled out
    assert flags("loves stars", FeedbackMessage("u", "", Request("shape", "star")))["ask_kept"]
    assert flags("enjoys science fiction", FeedbackMessage("u", "", Request("genre", "sci-fi")))["ask_kept"]
    assert ranks([0.9, 0.1, 0.5, 0.5]) == [1, 4, 2.5, 2.5]


def test_a_memory_that_keeps_the_message_scores_one(synth_dataset, tmp_path):
    s = services(synth_dataset, tmp_path, echo)
    report, rows = evaluate_feedback(s, scratch(s, tmp_path), n_messages=50, n_users=4)
    assert report["n_messages"] == len(rows) == 50 and report["n_users"] == 4
    assert report["kept"] == report["kept_ask"] == report["dropped_ban"] == report["kept_both"] == 1.0
    assert report["kept_met"]
    # it only quoted the user: with the verbatim message removed, the model itself kept no ask
    assert report["model_words"]["kept_ask"] == 0.0 and report["model_words"]["dropped_ban"] == 1.0
    # the unchanged summary names nothing: the control keeps no ask
    assert report["before"]["kept_ask"] == 0.0 and report["before"]["dropped_ban"] == 1.0
    assert sum(v["n_ask"] for v in report["by_attribute"].values()) == sum(r["ask"] is not None for r in rows)
    row = rows[0]
    assert CALM in row["summary_before"] and row["summary_after"].endswith(row["message"])
    assert len(row["candidates"]) == len(row["rank_before"]) == len(row["rank_after"]) == 21
    assert sum(report["n_ranked"].values()) == 50 * 21


def test_a_memory_that_ignores_the_message_keeps_no_ask(synth_dataset, tmp_path):
    s = services(synth_dataset, tmp_path, lambda previous, said: previous)
    report, rows = evaluate_feedback(s, scratch(s, tmp_path), n_messages=12, n_users=4)
    assert report["kept_ask"] == 0.0 and report["dropped_ban"] == 1.0  # nothing named, nothing liked
    assert report["dropped_ban_stated"] is None and report["n_ban_stated"] == 0
    assert report["kept"] == pytest.approx(4 / 12, abs=1e-4)  # only the ban-only messages
    assert not report["kept_met"]
    assert all(r["rank_before"] == r["rank_after"] for r in rows)  # same summary, same ranking
    assert set(report["rank_change"].values()) <= {0.0, None}


def _genre_messages(cases, gt, kind: str) -> list[FeedbackMessage]:
    out = []
    for c in cases:
        g = Counter(gt["items"][i]["genre"] for i in c.candidates).most_common(1)[0][0]
        r = Request("genre", g)
        out.append(FeedbackMessage(c.user_id, f"I'd like more {g}", ask=r) if kind == "ask"
                   else FeedbackMessage(c.user_id, f"no {g} please", ban=r))
    return out


def test_rank_changes_have_the_right_sign_with_an_overlap_scorer(synth_dataset, cases, gt, tmp_path):
    # ask: the new summary names the genre, so titles with it overlap more and move up
    s = services(synth_dataset, tmp_path / "ask", lambda previous, said: f"{previous} More {said.split()[-1]}.")
    report = feedback_report(run_feedback(s, cases, _genre_messages(cases, gt, "ask"),
                                          scratch(s, tmp_path / "ask"), gt["items"]))
    assert report["rank_change"]["ask"] > 0 > report["rank_change"]["other"] and report["ask_up_met"]
    assert report["kept_ask"] == 1.0
    # ban: the previous summary named every genre; the new one drops the banned one, whose items move down
    every = "The user appears to have a preference for " + " ".join(VOCAB["genre"]) + "."
    banned = _genre_messages(cases, gt, "ban")
    by_text = {m.text: m.ban.value for m in banned if m.ban}
    s = services(synth_dataset, tmp_path / "ban", lambda previous, said: previous.replace(by_text[said], ""),
                 user_summary=every)
    rows = run_feedback(s, cases, banned, scratch(s, tmp_path / "ban"), gt["items"])
    report = feedback_report(rows)
    assert report["rank_change"]["ban"] < 0 < report["rank_change"]["other"] and report["ban_down_met"]
    assert report["dropped_ban"] == report["dropped_ban_stated"] == 1.0 and report["before"]["dropped_ban"] == 0.0
    assert report["n_ban_stated"] == len(banned)


def test_feedback_versions_go_to_the_scratch_store_only(synth_dataset, cases, gt, tmp_path):
    s = services(synth_dataset, tmp_path, echo)
    side = scratch(s, tmp_path)
    with pytest.raises(ValueError, match="scratch"):
        run_feedback(s, cases, script_messages(cases, gt, 3), s.store, gt["items"])
    messages = script_messages(cases, gt, 9)
    run_feedback(s, cases, messages, side, gt["items"])
    for c in cases:  # the services' store: the history chain a pipeline run caches, no feedback
        assert {v.source for v in s.store.user_history(c.user_id)} == {"history"}
    used = {m.user_id for m in messages}
    assert s.store.users.count() == sum(len(blocks_of(len(c.history), s.memory.cfg.block_size))
                                        for c in cases if c.user_id in used)
    assert side.items.count() == 0
    fed = [v for c in cases for v in side.user_history(c.user_id)]
    assert len(fed) == side.users.count() == 9 and {v.source for v in fed} == {"feedback"}
