"""The web demo served in-process (FastAPI TestClient) over fake models and real stores."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from fakes import CountingChat, OverlapScorer
from mllm_msr.agents.recommender import RecommenderConfig
from mllm_msr.config import MSRConfig
from mllm_msr.data.protocol import ProtocolConfig, build_splits
from mllm_msr.pipeline import build_services
from mllm_msr.stores.summaries import StoreConfig
from mllm_msr.web import create_app


@pytest.fixture()
def client(tmp_path, synth_dataset):
    ds = synth_dataset
    cfg = MSRConfig(store=StoreConfig(path=str(tmp_path / "chroma")), recommender=RecommenderConfig(adapter=None))
    s = build_services(cfg, ds, generator=CountingChat(), scorer=OverlapScorer())
    s.summarizer.summarize(list(ds.items.values()))
    cases = build_splits(ds, ProtocolConfig()).test
    users = {c.user_id: {"history": list(c.history), "timestamps": list(c.history_timestamps),
                         "candidates": list(c.candidates)} for c in cases}
    return TestClient(create_app(s, users)), cases, ds


def test_user_page_shows_history_summary_evolution_and_ranked_covers(client):
    c, cases, ds = client
    case = cases[0]
    assert case.user_id in c.get("/").text
    page = c.get(f"/user/{case.user_id}").text
    for iid in case.history:
        assert f"/cover/{iid}" in page
    assert page.count("<tr>") >= 1 + -(-len(case.history) // 3)  # header + one row per block
    assert page.count("score ") == 10
    img = c.get(f"/cover/{case.history[0]}")
    assert img.status_code == 200 and img.content[:2] == b"\xff\xd8"  # a JPEG
    assert c.get("/cover/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert c.get("/user/nobody").status_code == 404


def test_chat_box_updates_memory_and_shows_the_reply(client):
    c, cases, ds = client
    uid = cases[1].user_id
    r = c.post(f"/user/{uid}/chat", data={"message": "nothing with stripes"}, follow_redirects=True)
    assert r.status_code == 200
    assert "id='reply'" in r.text and "Your taste as I understand it" in r.text
    assert "feedback" in r.text  # the new summary version is listed in the evolution table


def test_prompt_workbench_compares_two_prompt_folders_and_caches(tmp_path, synth_dataset):
    from mllm_msr.evaluation.prompt_eval import compare, complete_prompt_dir, with_prompts
    from mllm_msr.prompts import PROMPT_DIR

    ds = synth_dataset
    cfg = MSRConfig(store=StoreConfig(path=str(tmp_path / "chroma")), recommender=RecommenderConfig(adapter=None))
    edited = tmp_path / "mine"
    edited.mkdir()
    (edited / "user_block.yaml").write_text((PROMPT_DIR / "user_block.yaml").read_text()
                                           .replace("one or two sentences", "one sentence"))
    work = tmp_path / "work"
    da, db = complete_prompt_dir(PROMPT_DIR, work), complete_prompt_dir(edited, work)
    assert da != db and (db / "item_text.yaml").read_text() == (PROMPT_DIR / "item_text.yaml").read_text()
    chat, scorer = CountingChat(), OverlapScorer()
    from mllm_msr.stores.summaries import SummaryStore

    store = SummaryStore(cfg.store)
    cases = build_splits(ds, ProtocolConfig()).test
    mk = lambda d: build_services(with_prompts(cfg, d), ds, generator=chat, scorer=scorer, store=store)
    res = compare(mk, cases, da, db, work, show_progress=False)
    # only the user prompt differs: B re-used every item summary and redid the user summaries
    assert res["model_calls"]["B"]["item_summaries"] == 0 and res["model_calls"]["B"]["user_summaries"] > 0
    assert set(res["diff_b_minus_a"]) >= {"hr@5", "ndcg@5"}
    d = res["diff_b_minus_a"]["hr@5"]
    assert d["low"] <= d["diff"] <= d["high"]
    again = compare(mk, cases, da, db, work, show_progress=False)
    assert again["model_calls"]["A"] == again["model_calls"]["B"] == {"item_summaries": 0, "user_summaries": 0, "scored_pairs": 0}
