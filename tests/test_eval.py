"""`msr eval`: rows, caching, paired intervals, warm/cold, result files, README tables, leak guard,
memory fidelity."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from mllm_msr.config import load_config
from mllm_msr.data.protocol import ProtocolConfig, build_splits
from mllm_msr.evaluation import baselines
from mllm_msr.evaluation.baselines import BaselineConfig
from mllm_msr.evaluation.fidelity import current_likes, degeneration, item_fidelity, names, user_fidelity
from mllm_msr.evaluation.report import build_results, render_tables, update_readme
from mllm_msr.evaluation.rows import ROWS, parse_rows
from mllm_msr.evaluation.run import EvalContext, run_eval
from mllm_msr.evaluation.suite import SmokeRunError, run_suite
from mllm_msr.metrics import evaluate, user_bootstrap
from mllm_msr.models.base import ModelBackend
from mllm_msr.pipeline import LeakError, adapter_leak, build_services

torch.set_num_threads(1)
FAST = BaselineConfig(epochs=2, dim=8, batch_size=16, patience=0)
BASE = ["popularity", "gru4rec", "sasrec", "sasrec_image"]


@pytest.fixture(scope="module")
def ds(synth_dataset):
    return synth_dataset


class LenScorer(ModelBackend):
    """Deterministic fake scorer: p(yes) from the prompt's length (prompt-dependent, no model)."""

    model_id = "len-scorer"

    def generate(self, requests, **kw):  # pragma: no cover - never asked to generate
        raise NotImplementedError

    def score_yes_no(self, requests):
        return [(len(str(r.messages)) % 97) / 97 for r in requests]


def _fake_chat():
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from mllm_msr.models.factory import LangChainChatBackend

    chat = LangChainChatBackend(GenericFakeChatModel(messages=itertools.cycle([AIMessage("A red mystery.")])))
    chat.model_id = "fake-chat"
    return chat


def test_rows_name_what_they_see_and_only_the_paper_row_is_called_mllm_msr():
    assert parse_rows("baselines,mllm_msr") == [*BASE, "mllm_msr"]
    assert parse_rows("blocks") == ["block_1", "block_2", "block_3", "block_4", "block_6"]
    assert all(r.sees for r in ROWS.values())
    paper = ROWS["mllm_msr"]
    assert paper.overrides == () and "recent" not in paper.sees  # the paper's input, nothing else
    assert load_config(None, list(paper.overrides)).recommender.recent_items == 0
    ext = ROWS["mllm_msr_recent"]
    assert ext.label != "MLLM-MSR" and "recommender.recent_items=3" in ext.overrides
    with pytest.raises(ValueError, match="unknown row"):
        parse_rows("nope")


def test_user_bootstrap_pairs_the_same_users():
    class C:
        def __init__(self, labels):
            self.labels, self.candidates, self.user_id = labels, tuple(range(len(labels))), "u"

    rng = np.random.default_rng(0)
    cases = [C([1] + [0] * 20) for _ in range(200)]
    good = [list(rng.normal(size=21) + np.r_[1.0, np.zeros(20)]) for _ in cases]
    noise = [list(rng.normal(size=21)) for _ in cases]
    r = user_bootstrap(cases, good, noise, n_resamples=300)
    assert r["auc"]["value"] == pytest.approx(evaluate(cases, good)["auc"])
    assert r["auc"]["low"] < r["auc"]["value"] < r["auc"]["high"]
    assert r["auc"]["diff"]["low"] > 0  # a real gain is detected
    same = user_bootstrap(cases, good, good, n_resamples=300)["auc"]["diff"]
    assert same["value"] == 0 and same["low"] == 0 and same["high"] == 0  # paired: identical rows differ by 0


def test_baseline_rows_cached_tuned_on_validation_with_valid_metrics(ds, tmp_path, monkeypatch):
    calls = []
    for name, cls in baselines.BASELINES.items():
        orig = cls.fit

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(cls, "fit", counted)
    grid = baselines.BaselineGrid(dim=[8], lr=[3e-3], dropout=[0.2, 0.5], epochs=[2])
    ctx = EvalContext(dataset=ds, protocol=ProtocolConfig(), out_dir=tmp_path, baseline_cfg=FAST, grid=grid,
                      valid_users=3)
    res = run_eval(ctx, ["popularity", "sasrec"])
    assert calls == ["popularity", "sasrec", "sasrec"]  # popularity: no grid; sasrec: 2 grid points
    r = res["sasrec"]["per_seed"][0]
    assert len(r["info"]["grid"]["points"]) == 2 and r["valid_metrics"]["n_cases"] == 3
    splits = build_splits(ds, ProtocolConfig())
    assert [c["user_id"] for c in r["cases"]] == [c.user_id for c in splits.test]
    assert [c["cold"] for c in r["cases"]] == [c.target in splits.cold_items for c in splits.test]
    calls.clear()
    run_eval(ctx, ["popularity", "sasrec"])
    assert calls == []  # cached


def _fake_adapters(tmp_path, names=("rec", "rec_recent", "tallrec")) -> str:
    out = {}
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "adapter_model.safetensors").write_bytes(n.encode())
        (tmp_path / n / "adapter_config.json").write_text("{}")
        out[n] = str(tmp_path / n)
    return "scorer.adapters=" + json.dumps(out)


def test_llm_rows_through_the_pipeline_and_result_files(ds, tmp_path):
    cfg = load_config(None, [f"store.path={tmp_path / 'chroma'}", f"run_dir={tmp_path / 'run'}",
                             _fake_adapters(tmp_path)])
    from mllm_msr.stores.summaries import SummaryStore

    store, chat, seen = SummaryStore(cfg.store), _fake_chat(), []

    def factory(c, dataset):
        seen.append((c.recommender.adapter, c.memory.mode, c.memory.block_size, c.recommender.recent_items))
        return build_services(c, dataset, generator=chat, scorer=LenScorer(), store=store)

    ctx = EvalContext(dataset=ds, protocol=ProtocolConfig(), out_dir=tmp_path / "run", baseline_cfg=FAST,
                      msr_cfg=cfg, users=3, valid_users=2, tune=False, services_factory=factory)
    rows = ["popularity", "zero_shot", "mllm_msr", "mllm_msr_recent", "no_recurrence", "block_2"]
    res = run_eval(ctx, rows)
    assert all(res[k]["status"] == "ok" for k in rows), {k: res[k]["reason"] for k in rows}
    assert set(seen) >= {(None, "recurrent", 3, 0), ("rec", "recurrent", 3, 0), ("rec_recent", "recurrent", 3, 3),
                         ("rec", "direct", 3, 0), ("rec", "recurrent", 2, 0)}
    users = [[c["user_id"] for c in res[k]["per_seed"][0]["cases"]] for k in rows]
    assert all(u == users[0] for u in users) and len(users[0]) == 3  # same users for every row
    payload = build_results(res, 0, {"dataset": ds.fingerprint(), "test_users": 3, "candidates": 21,
                                     "negatives": 20, "valid_users": 2}, n_resamples=100)
    ref = payload["rows"]["mllm_msr"]["test"]["all"]["auc"]
    assert "diff" not in ref  # the reference row has no difference to itself
    zs = payload["rows"]["zero_shot"]["test"]["all"]["auc"]
    assert zs["diff"]["value"] == pytest.approx(zs["value"] - ref["value"])
    table = render_tables(payload)
    assert "| MLLM-MSR + recent items (extension) |" in table and "what the model sees" in table
    seen.clear()
    run_eval(ctx, rows)
    assert seen == []  # every LLM row cached


class DyingScorer(LenScorer):
    """LenScorer that fails on its ``die_at``-th call (a kill mid-row) and counts its calls."""

    def __init__(self, die_at: int | None = None):
        self.die_at, self.calls = die_at, 0

    def score_yes_no(self, requests):
        self.calls += 1
        if self.calls == self.die_at:
            raise RuntimeError("killed")
        return super().score_yes_no(requests)


def test_an_interrupted_llm_row_resumes_from_its_scored_users(ds, tmp_path):
    cfg = load_config(None, [f"store.path={tmp_path / 'chroma'}", f"run_dir={tmp_path / 'run'}"])
    from mllm_msr.stores.summaries import SummaryStore

    store, chat = SummaryStore(cfg.store), _fake_chat()
    scorer = DyingScorer(die_at=3)  # one call per user: users 1-2 are scored, the 3rd dies

    def ctx_with(sc):
        return EvalContext(dataset=ds, protocol=ProtocolConfig(), out_dir=tmp_path / "run", baseline_cfg=FAST,
                           msr_cfg=cfg, users=4, valid_users=0, tune=False,
                           services_factory=lambda c, d: build_services(c, d, generator=chat, scorer=sc, store=store))

    first = run_eval(ctx_with(scorer), ["zero_shot"])
    assert first["zero_shot"]["status"] == "failed"
    partial = list((tmp_path / "run" / "eval" / "zero_shot").glob("0.partial-*/test.jsonl"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 2
    again = DyingScorer()
    res = run_eval(ctx_with(again), ["zero_shot"])
    assert res["zero_shot"]["status"] == "ok" and again.calls == 2  # only the 2 users not yet scored
    clean = DyingScorer()
    fresh = run_eval(EvalContext(dataset=ds, protocol=ProtocolConfig(), out_dir=tmp_path / "clean",
                                 baseline_cfg=FAST, msr_cfg=cfg, users=4, valid_users=0, tune=False,
                                 services_factory=lambda c, d: build_services(c, d, generator=chat, scorer=clean,
                                                                              store=store)), ["zero_shot"])
    assert res["zero_shot"]["per_seed"][0]["cases"] == fresh["zero_shot"]["per_seed"][0]["cases"]
    assert not list((tmp_path / "run" / "eval" / "zero_shot").glob("0.partial-*"))  # folded into 0.json


def test_smoke_runs_never_write_committed_results(ds, tmp_path):
    cfg = load_config(None, [f"store.path={tmp_path / 'chroma'}"])
    with pytest.raises(SmokeRunError):
        run_suite(cfg, ds, ["popularity"], tmp_path, results_dir=tmp_path / "results", users=2)
    assert not (tmp_path / "results").exists()


def test_readme_blocks_are_regenerated_and_checked(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:eval.x -->\nold\n<!-- /results -->\nend\n")
    assert update_readme(readme, {"eval.x": "| new |"}, check=True) == ["eval.x"]
    assert "old" in readme.read_text()  # check mode writes nothing
    assert update_readme(readme, {"eval.x": "| new |"}) == ["eval.x"]
    assert readme.read_text() == "intro\n<!-- results:eval.x -->\n| new |\n<!-- /results -->\nend\n"
    assert update_readme(readme, {"eval.x": "| new |"}, check=True) == []


def test_leak_guard_refuses_training_users_and_names_the_adapter(ds, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"w")
    (folder / "adapter_config.json").write_text("{}")
    splits = build_splits(ds, ProtocolConfig())
    trained = list(splits.train_users[:5])
    (folder / "PROVENANCE.json").write_text(json.dumps(
        {"data": {"train_user_ids": trained, "dataset_fingerprint": ds.fingerprint()}}))
    cfg = load_config(None, [f"store.path={tmp_path / 'chroma'}", f"scorer.adapters={{rec: {folder}}}"])
    why = adapter_leak(cfg, ds, [trained[0], splits.test[0].user_id])
    assert why and "'rec'" in why and trained[0] in why
    assert adapter_leak(cfg, ds, [c.user_id for c in splits.test]) is None
    s = build_services(cfg, ds, generator=_fake_chat(), scorer=LenScorer())
    with pytest.raises(LeakError):
        s.check_users([trained[1]])
    from mllm_msr.pipeline import score_cases

    leaky = [c for c in splits.train if c.user_id == trained[0]][:1]
    with pytest.raises(LeakError):
        score_cases(s, leaky)
    zero = cfg.model_copy(update={"recommender": cfg.recommender.model_copy(update={"adapter": None})})
    assert adapter_leak(zero, ds, trained) is None  # no adapter, nothing learned from anyone


def test_degeneration_counts_loops_and_summaries_cut_by_the_token_limit():
    got = degeneration(["The user likes: a red star, a mystery film, a red star, a",  # loop, cut
                        "The user likes: a red star and a blue ring.",                # neither
                        "The user likes: a mystery film, a Mystery film."])           # loop (case, period)
    assert got == {"n": 3, "repeated": 2 / 3, "unfinished": 1 / 3}
    assert degeneration([]) == {"n": 0, "repeated": None, "unfinished": None}


def test_fidelity_names_current_values_only():
    assert names("a striped GREEN ring", "green") and not names("greenish", "green")
    gt_user = {"length": 9, "timeline": [{"colour": "blue", "genre": "drama", "pattern": "dotted", "start": 0},
                                         {"colour": "red", "genre": "drama", "pattern": "dotted", "start": 5}]}
    assert current_likes(gt_user)["colour"] == "red"
    f = user_fidelity({"u": "likes blue and drama", "v": "likes red, dotted"}, {"u": gt_user, "v": gt_user})
    assert f["n"] == 2 and f["colour"] == 0.5 and f["genre"] == 0.5 and f["pattern"] == 0.5
    items = {"i": {"colour": "red", "pattern": "solid", "shape": "star", "genre": "drama"}}
    assert item_fidelity({"i": "A red star, drama."}, items) == {"n": 1, "colour": 1.0, "pattern": 0.0,
                                                                 "shape": 1.0, "genre": 1.0}


def test_readme_result_blocks_match_the_committed_result_files():
    """Every README block marked <!-- results:NAME --> is exactly what `msr report` renders from
    the committed results/ files (so no figure in those blocks can drift from its file)."""
    from pathlib import Path

    from mllm_msr.evaluation.report import MARK, committed_tables

    root = Path(__file__).resolve().parents[1]
    tables = committed_tables(root / "results")
    readme = root / "README.md"
    named = {m.group("name") for m in MARK.finditer(readme.read_text(encoding="utf-8"))}
    assert named <= set(tables), f"README blocks without a result file: {sorted(named - set(tables))}"
    assert update_readme(readme, tables, check=True) == []


def test_eval_cli_registered():
    from typer.testing import CliRunner

    from mllm_msr.cli import app

    res = CliRunner().invoke(app, ["eval", "--help"])
    assert res.exit_code == 0 and "--rows" in res.output and "--results" in res.output
    res = CliRunner().invoke(app, ["report", "--help"])
    assert res.exit_code == 0 and "--check" in res.output


def test_row_cache_key_follows_only_the_rows_own_adapter(ds, tmp_path):
    """Re-shipping another row's adapter must not invalidate this row's cached result."""
    from mllm_msr.evaluation.run import row_config, row_key

    cfg = load_config(None, [f"store.path={tmp_path / 'chroma'}", _fake_adapters(tmp_path)])
    ctx = EvalContext(dataset=ds, protocol=ProtocolConfig(), out_dir=tmp_path, baseline_cfg=FAST, msr_cfg=cfg)
    keys = {r: row_key(ctx, ROWS[r], 0, row_config(ctx, ROWS[r], 0)) for r in ("zero_shot", "mllm_msr")}
    (tmp_path / "rec" / "adapter_model.safetensors").write_bytes(b"retrained")
    after = {r: row_key(ctx, ROWS[r], 0, row_config(ctx, ROWS[r], 0)) for r in ("zero_shot", "mllm_msr")}
    assert after["zero_shot"] == keys["zero_shot"] and after["mllm_msr"] != keys["mllm_msr"]



def test_row_cache_key_ignores_where_summaries_are_kept_but_not_what_the_row_reads(ds, tmp_path):
    """A row computed against another store (or run folder) is the same row; a memory setting is not."""
    from mllm_msr.evaluation.run import row_config, row_key

    adapters = _fake_adapters(tmp_path)

    def key(*sets: str) -> str:
        cfg = load_config(None, [adapters, *sets])
        ctx = EvalContext(dataset=ds, protocol=ProtocolConfig(), out_dir=tmp_path, baseline_cfg=FAST, msr_cfg=cfg)
        return row_key(ctx, ROWS["mllm_msr"], 0, row_config(ctx, ROWS["mllm_msr"], 0))

    base = key(f"store.path={tmp_path / 'a'}", f"run_dir={tmp_path / 'r1'}")
    assert key(f"store.path={tmp_path / 'b'}", f"run_dir={tmp_path / 'r2'}") == base
    assert key("store.host=127.0.0.1", "store.port=9") == base
    assert key(f"store.path={tmp_path / 'a'}", "memory.item_titles=false") != base
    # an edited prompt the row reads is a new row; the chat-feedback prompt (no row reads it) is not
    import shutil

    from mllm_msr.prompts import PROMPT_DIR

    for name, changes in (("user_block", True), ("user_feedback", False)):
        d = tmp_path / f"prompts-{name}"
        shutil.copytree(PROMPT_DIR, d, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        f = d / f"{name}.yaml"
        f.write_text(f.read_text().replace("system: You", "system: Now you"))
        edited = key(f"store.path={tmp_path / 'a'}", f"memory.prompt_dir={d}", f"items.prompt_dir={d}",
                     f"recommender.prompt_dir={d}")
        assert (edited != base) is changes, name

# ------------------------------------------------------------- committed rows (results/<dataset>/rows)

@pytest.fixture
def suite(ds, synth_root, tmp_path, monkeypatch):
    """``run(rows, out, results="results", **kw)``: `run_suite` with the fake LLM and fast baselines;
    ``counts`` holds the baseline fits and the LLM's scored pairs of every run."""
    from mllm_msr.stores.summaries import SummaryStore

    cfg = load_config(None, [f"store.path={tmp_path / 'chroma'}", f"dataset={synth_root}",
                             _fake_adapters(tmp_path)])
    counts: dict = {"fits": [], "scored": 0}
    for name, cls in baselines.BASELINES.items():
        monkeypatch.setattr(cls, "fit", lambda self, *a, _orig=cls.fit, _name=name, **k:
                            counts["fits"].append(_name) or _orig(self, *a, **k))

    class Counting(LenScorer):
        def score_yes_no(self, requests):
            counts["scored"] += len(requests)
            return super().score_yes_no(requests)

    def run(rows, out, results="results", command=None, **kw):
        store = SummaryStore(cfg.store.model_copy(update={"path": str(tmp_path / f"chroma-{out}")}))
        chat = _fake_chat()
        return run_suite(cfg, ds, rows, tmp_path / out, results_dir=tmp_path / results if results else None,
                         valid_users=2, baseline_cfg=FAST, tune=False, n_resamples=50,
                         command=command or f"msr eval --rows {','.join(rows)}",
                         services_factory=lambda c, d: build_services(c, d, generator=chat, scorer=Counting(),
                                                                      store=store), **kw)

    return run, counts


def test_committed_rows_accumulate_pair_with_the_committed_reference_and_are_reused(suite, tmp_path, monkeypatch):
    from mllm_msr.evaluation import suite as suite_mod

    run, counts = suite
    fidelity_runs = []
    monkeypatch.setattr(suite_mod, "fidelity_for",
                        lambda ctx, res, seed: fidelity_runs.append(seed) or {"fused item summary": {"n": 4}})
    run(["mllm_msr"], "out")
    assert counts["scored"] > 0 and counts["fits"] == [] and fidelity_runs == [0]
    assert (tmp_path / "results" / "rows" / "mllm_msr" / "0.json.gz").is_file()
    counts.update(fits=[], scored=0)
    second = run(["popularity"], "out")
    assert counts == {"fits": ["popularity"], "scored": 0}  # only the new row is computed
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(saved["rows"]) == ["popularity", "mllm_msr"]  # the order of ROWS
    pop, ref = (saved["rows"][k]["test"]["all"]["auc"] for k in ("popularity", "mllm_msr"))
    assert pop["diff"]["value"] == pytest.approx(pop["value"] - ref["value"])  # paired with the committed row
    assert saved["rows"]["mllm_msr"]["command"] == "msr eval --rows mllm_msr"
    assert saved["rows"]["popularity"]["command"] == "msr eval --rows popularity"
    assert saved["fidelity"] == {"fused item summary": {"n": 4}} and fidelity_runs == [0]
    table = (tmp_path / "results" / "table.md").read_text()
    assert "* MLLM-MSR: `msr eval --rows mllm_msr`" in table and "* Popularity: `msr eval --rows popularity`" in table

    counts.update(fits=[], scored=0)  # a fresh clone: an empty working folder reuses every committed row
    fresh = run(["popularity", "mllm_msr"], "fresh", command="msr eval --rows default")
    assert counts == {"fits": [], "scored": 0} and fidelity_runs == [0]
    assert json.dumps(fresh["rows"], sort_keys=True) == json.dumps(second["rows"], sort_keys=True)
    assert fresh["fidelity"] == saved["fidelity"]

    smoke = run(["popularity"], "smoke", results=None, users=2)  # its own users: nothing committed is merged
    assert list(smoke["rows"]) == ["popularity"] and smoke["rows"]["popularity"]["n_cases"] == 2


def test_a_committed_row_on_other_test_users_or_data_is_left_out(suite, tmp_path, caplog):
    from mllm_msr.evaluation import store

    run, _ = suite
    run(["popularity"], "out")
    rec = store.load(store.row_path(tmp_path / "results", "popularity", 0))
    assert rec is not None and rec["command"] == "msr eval --rows popularity"
    other_users = json.loads(json.dumps(rec)) | {"row": "gru4rec"}
    other_users["cases"][0]["user_id"] = "someone else"
    other_data = json.loads(json.dumps(rec)) | {"row": "sasrec_image"}
    other_data["dataset"] = {**rec["dataset"], "digest": "another"}
    for r in (other_users, other_data, json.loads(json.dumps(rec)) | {"row": "sasrec"}):
        store.save(tmp_path / "results", r)
    with caplog.at_level("WARNING"):
        payload = run(["popularity"], "out")
    assert list(payload["rows"]) == ["popularity", "sasrec"]  # same users: kept; the others: left out
    assert "committed row gru4rec left out" in caplog.text and "committed row sasrec_image" in caplog.text


def test_committed_row_files_are_byte_identical_across_identical_runs(suite, tmp_path, monkeypatch):
    import time

    from mllm_msr import pipeline
    from mllm_msr.evaluation import run as run_mod

    class Frozen:  # timings recorded in the rows: identical runs must give identical files
        perf_counter = staticmethod(lambda: 0.0)

        def __getattr__(self, name):
            return getattr(time, name)

    for mod in (run_mod, pipeline):
        monkeypatch.setattr(mod, "time", Frozen())
    run, _ = suite
    run(["popularity", "mllm_msr"], "a", results="ra")
    run(["popularity", "mllm_msr"], "b", results="rb")
    files = sorted(p.relative_to(tmp_path / "ra") for p in (tmp_path / "ra" / "rows").rglob("*.json.gz"))
    assert [str(f) for f in files] == ["rows/mllm_msr/0.json.gz", "rows/popularity/0.json.gz"]
    assert all((tmp_path / "ra" / f).read_bytes() == (tmp_path / "rb" / f).read_bytes() for f in files)
    before = {f: (tmp_path / "ra" / f).stat().st_mtime_ns for f in files}
    run(["popularity", "mllm_msr"], "c", results="ra")  # reused: the files are not even rewritten
    assert {f: (tmp_path / "ra" / f).stat().st_mtime_ns for f in files} == before


def test_a_row_running_the_reference_config_reuses_its_record(suite, tmp_path):
    """The block-size sweep's default size is the paper row itself: its scores are never computed
    twice, and it is listed under its own name with the same per-user scores."""
    from mllm_msr.evaluation import store

    run, counts = suite
    run(["mllm_msr"], "out")
    assert counts["scored"] > 0
    counts.update(fits=[], scored=0)
    payload = run(["block_3", "block_2"], "out")
    ref = store.load(store.row_path(tmp_path / "results", "mllm_msr", 0))
    same = store.load(store.row_path(tmp_path / "results", "block_3", 0))
    assert ref is not None and same is not None
    assert same["same_as"] == "mllm_msr" and same["label"] == "MLLM-MSR, block size 3"
    assert [c["scores"] for c in same["cases"]] == [c["scores"] for c in ref["cases"]]
    assert "fidelity" not in same and same["cache_key"] != ref["cache_key"]
    n_users = len(ref["cases"]) + 2  # test + validation users: only block_2 is scored
    assert counts["scored"] == n_users * len(ref["cases"][0]["candidates"])
    b3 = payload["rows"]["block_3"]["test"]["all"]["auc"]
    assert b3["diff"]["value"] == 0.0 and b3["value"] == payload["rows"]["mllm_msr"]["test"]["all"]["auc"]["value"]


def test_text_match_probe_scores_what_the_preference_text_names_and_pairs_with_the_row():
    """The probe reads only the text the row's recommender read: a text naming the positive's colour
    and genre ranks it first; Δ = probe − the row's own scores over the same users; the table shows it."""
    from mllm_msr.evaluation.fidelity import probe_scores
    from mllm_msr.evaluation.report import probe_stats, render_probe

    gt = {"a": {"colour": "blue", "pattern": "striped", "shape": "circle", "genre": "fantasy"},
          "b": {"colour": "red", "pattern": "dotted", "shape": "square", "genre": "horror"},
          "c": {"colour": "green", "pattern": "plain", "shape": "star", "genre": "fantasy"}}
    cases = [{"user_id": f"u{n}", "candidates": ["a", "b", "c"], "labels": [1, 0, 0],
              "summary": "The user likes blue covers and fantasy films, not red ones", "scores": [0.2, 0.5, 0.4]}
             for n in range(20)]
    probe = probe_scores(cases, gt)
    assert probe[0] == [2.0, 1.0, 1.0]  # "red" is named (a word match, negation not parsed): 1 for b
    st = probe_stats(cases, probe, n_resamples=50)
    assert st["users"] == 20 and st["auc"]["value"] == 1.0
    assert st["auc"]["diff"]["value"] == pytest.approx(1.0 - 0.0)  # the row's scores rank the positive last
    table = render_probe({"mllm_msr": {"label": "MLLM-MSR", **st}},
                         {"mllm_msr": {"test": {"all": {"auc": {"value": 0.0, "low": 0.0, "high": 0.0}}}}})
    assert "| MLLM-MSR | 20 | 1.000 [1.000, 1.000] | 0.000 [0.000, 0.000] | +1.000" in table
