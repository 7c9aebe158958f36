"""The web demo served in-process (FastAPI TestClient) over fake models and real stores."""
from __future__ import annotations

from html.parser import HTMLParser

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
                                           .replace("in their own words", "in a few words"))
    work = tmp_path / "work"
    da, db = complete_prompt_dir(PROMPT_DIR, work), complete_prompt_dir(edited, work)
    assert da != db and (db / "item_text.yaml").read_text() == (PROMPT_DIR / "item_text.yaml").read_text()
    chat, scorer = CountingChat(), OverlapScorer()
    from mllm_msr.stores.summaries import SummaryStore

    store = SummaryStore(cfg.store)
    cases = build_splits(ds, ProtocolConfig()).test

    def mk(d):
        return build_services(with_prompts(cfg, d), ds, generator=chat, scorer=scorer, store=store)

    res = compare(mk, cases, da, db, work, show_progress=False)
    # only the user prompt differs: B re-used every item summary and redid the user summaries
    assert res["model_calls"]["B"]["item_summaries"] == 0 and res["model_calls"]["B"]["user_summaries"] > 0
    assert set(res["diff_b_minus_a"]) == {"auc", "hr@5", "mrr@5", "ndcg@5"}
    for d in res["diff_b_minus_a"].values():  # user-paired bootstrap: B − A and its interval
        assert d["low"] <= d["diff"] <= d["high"] and d["B"] - d["A"] == pytest.approx(d["diff"])
    again = compare(mk, cases, da, db, work, show_progress=False)
    nothing = {"item_summaries": 0, "user_summaries": 0, "scored_pairs": 0}
    assert again["model_calls"]["A"] == again["model_calls"]["B"] == nothing


# ------------------------------------------------------------------------------ security

TOKEN = "s3cret-token-0123456789"
SCRIPT = "<script>alert(1)</script>"
PWNED = "data-pwned"  # what the payloads below would set on <html> if any of them ran in a browser
HOSTILE = (SCRIPT, '" onmouseover="x', "' onmouseover='x", "<img src=x onerror=alert(2)>",
           f"<script>document.documentElement.setAttribute('{PWNED}','script')</script>",
           f"' onload='document.documentElement.setAttribute(\"{PWNED}\",\"attr\")' x='",
           f'" onload="document.documentElement.setAttribute(\'{PWNED}\',\'attr2\')" x="')
HOSTILE_USER = "u\"'><script>alert(3)</script>/../#?"


def hostile_benchmark(folder):
    """The small synthetic benchmark with every title carrying HTML/JS and attribute-breaking quotes
    (written with csv, so the quotes survive the round trip); returns the dataset folder."""
    import csv
    import shutil

    from mllm_msr.data.synth import SynthConfig, generate_benchmark

    src = generate_benchmark(folder.parent / f"{folder.name}-clean", SynthConfig(n_users=20, n_items=40, seed=5))
    shutil.copytree(src, folder)
    titles = folder / "synth_titles.csv"
    with open(titles, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    with open(titles, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [[iid, f"{t} {' '.join(HOSTILE)}"] for iid, t in rows[1:]])
    return folder


class ParsedPage(HTMLParser):
    """Tags, attributes and text of a page, as a browser's parser splits them."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture()
def hostile_app(tmp_path):
    from mllm_msr.data.loaders import load_microlens

    ds = load_microlens(hostile_benchmark(tmp_path / "hostile"))
    cfg = MSRConfig(store=StoreConfig(path=str(tmp_path / "chroma")), recommender=RecommenderConfig(adapter=None))
    s = build_services(cfg, ds, generator=CountingChat(), scorer=OverlapScorer())
    s.summarizer.summarize(list(ds.items.values()))
    case = build_splits(ds, ProtocolConfig()).test[0]
    users = {HOSTILE_USER: {"history": list(case.history), "timestamps": list(case.history_timestamps),
                            "candidates": list(case.candidates)}}
    return (lambda token=None: create_app(s, users, token=token)), case, ds


def test_hostile_titles_and_user_ids_render_inert(hostile_app):
    from urllib.parse import quote

    make, case, ds = hostile_app
    c = TestClient(make())
    index = c.get("/")
    href = "/user/" + quote(HOSTILE_USER, safe="")
    assert f"href='{href}'" in index.text and SCRIPT not in index.text
    r = c.get(href)
    assert r.status_code == 200 and "'none'" in r.headers["content-security-policy"]
    page = r.text
    assert "<script" not in page and "onmouseover=\"" not in page and "onmouseover='" not in page
    dom = ParsedPage(page)
    assert "script" not in dom.tags
    assert not [a for a, _ in dom.attrs if a.startswith("on")], "an attribute escaped its quotes"
    title = ds.items[case.history[0]].title
    assert all(h in title for h in HOSTILE)
    assert ("alt", title) in dom.attrs  # the whole title stayed inside its alt attribute
    assert any(title in t for t in dom.text)  # and shows as text, not markup
    missing = c.get("/user/" + quote(SCRIPT, safe=""))
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
    assert missing.json()["detail"] == f"unknown user {SCRIPT}"  # JSON: data, never markup
    chat = c.post(href + "/chat", data={"message": SCRIPT + "\" onmouseover=\"x"}, follow_redirects=False)
    assert chat.status_code == 303 and chat.headers["location"] == href


def test_token_is_required_on_every_request_when_set(hostile_app):
    from urllib.parse import quote

    make, case, ds = hostile_app
    app = make(TOKEN)
    href = "/user/" + quote(HOSTILE_USER, safe="")
    anon = TestClient(app)
    for method, path in (("get", "/"), ("get", href), ("get", f"/cover/{case.history[0]}"),
                         ("post", href + "/chat")):
        r = getattr(anon, method)(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path)
    assert anon.get("/", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert anon.get("/", params={"token": TOKEN[:-1]}).status_code == 401
    assert anon.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    browser = TestClient(app)
    assert browser.get("/", params={"token": TOKEN}).status_code == 200
    assert browser.get(href).status_code == 200  # the links it follows carry the cookie
    assert TestClient(make()).get("/").status_code == 200  # no token configured: loopback demo as before


def test_binding_beyond_loopback_needs_the_flag_and_a_token(monkeypatch):
    from typer.testing import CliRunner

    from mllm_msr.cli import app
    from mllm_msr.web import check_bind

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_bind(host, allow_remote=False, token=None)
    with pytest.raises(ValueError, match="--allow-remote"):
        check_bind("0.0.0.0", allow_remote=False, token=TOKEN)
    with pytest.raises(ValueError, match="token"):
        check_bind("0.0.0.0", allow_remote=True, token=None)
    with pytest.raises(ValueError, match="at least 16"):
        check_bind("192.168.1.5", allow_remote=True, token="short")
    check_bind("0.0.0.0", allow_remote=True, token=TOKEN)
    monkeypatch.delenv("MSR_WEB_TOKEN", raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["web", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "refusing to bind" in r.output
    r = runner.invoke(app, ["web", "--host", "0.0.0.0", "--allow-remote"])
    assert r.exit_code == 2 and "needs a token" in r.output
