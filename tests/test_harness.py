"""`msr eval` harness: outputs, caching per row and seed, confidence intervals, CLI wiring."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from mllm_msr.data.protocol import ProtocolConfig
from mllm_msr.evaluation import baselines, harness
from mllm_msr.evaluation.baselines import BaselineConfig
from mllm_msr.evaluation.harness import EvalContext, parse_rows, run_eval

torch.set_num_threads(1)
FAST = BaselineConfig(epochs=3, dim=8, batch_size=16)
ROWS = ["popularity", "gru4rec", "sasrec", "sasrec_image"]


@pytest.fixture(scope="module")
def ds(synth_dataset):
    return synth_dataset


def _ctx(ds, out, **kw):
    return EvalContext(dataset=ds, protocol=ProtocolConfig(), out_dir=out, baseline_cfg=FAST, **kw)


@pytest.fixture()
def fit_calls(monkeypatch):
    calls = []
    for name, cls in baselines.BASELINES.items():
        orig = cls.fit

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(cls, "fit", counted)
    return calls


def test_parse_rows():
    assert parse_rows("baselines,mllm_msr") == [*ROWS, "mllm_msr"]
    assert parse_rows("blocks") == ["block_1", "block_2", "block_3", "block_4", "block_6"]
    assert parse_rows(None) == list(harness.DEFAULT_ROWS)
    with pytest.raises(ValueError, match="unknown row"):
        parse_rows("sasrec,nope")


def test_outputs_cache_and_ci(ds, tmp_path, fit_calls):
    out = tmp_path / "run"
    res = run_eval(_ctx(ds, out), ROWS, [0, 1])
    ev = out / "eval"
    for f in ("table.md", "results.csv", "results.json", "plot_auc.png", "plot_hr5.png",
              "plot_mrr5.png", "plot_ndcg5.png"):
        assert (ev / f).is_file() and (ev / f).stat().st_size > 0, f
    for r in ROWS:
        assert (ev / r / "0.json").is_file() and (ev / r / "1.json").is_file()
    assert sorted(fit_calls) == sorted(ROWS * 2)

    table = (ev / "table.md").read_text()
    for label in ("Popularity", "GRU4Rec", "SASRec", "SASRec+image"):
        assert f"| {label} |" in table
    assert "AUC" in table and "HR@5" in table and "MRR@5" in table and "NDCG@5" in table
    with open(ev / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["row"], r["seed"]) for r in rows) == sorted((r, s) for r in ROWS for s in ("0", "1"))
    data = json.loads((ev / "results.json").read_text())
    assert set(data["rows"]) == set(ROWS)
    # two different protocol seeds: different splits/negatives -> positive CI half-width
    pop = data["rows"]["popularity"]["summary"]["auc"]
    a, b = pop["values"]
    assert a != b and pop["ci"] == pytest.approx(12.7062047 * abs(a - b) / 2, rel=1e-6)  # t(0.975, 1 dof)
    # same splits and candidates for every row of a seed
    c0 = {r: [c["candidates"] for c in res["rows"][r]["per_seed"][0]["cases"]] for r in ROWS}
    assert all(v == c0["popularity"] for v in c0.values())

    # second invocation: everything from the cache, no fit
    fit_calls.clear()
    res2 = run_eval(_ctx(ds, out), ROWS, [0, 1])
    assert fit_calls == []
    assert res2["summary"]["sasrec"]["auc"]["mean"] == res["summary"]["sasrec"]["auc"]["mean"]
    # one seed: half-width 0; a new row or seed computes only what is missing
    res3 = run_eval(_ctx(ds, out), ["popularity", "sasrec"], [0])
    assert fit_calls == [] and res3["summary"]["sasrec"]["auc"]["ci"] == 0.0
    run_eval(_ctx(ds, out), ["popularity", "sasrec"], [0, 1, 2])
    assert sorted(fit_calls) == ["popularity", "sasrec"]
    # changed baseline settings invalidate the cache of the trained rows
    fit_calls.clear()
    run_eval(EvalContext(dataset=ds, protocol=ProtocolConfig(), out_dir=out,
                         baseline_cfg=FAST.model_copy(update={"dim": 12})), ["sasrec"], [0])
    assert fit_calls == ["sasrec"]


def test_llm_rows_without_config_and_text_only(ds, tmp_path, fit_calls):
    from dataclasses import replace

    text_only = replace(ds, items={k: replace(v, image_path=None) for k, v in ds.items.items()}, has_images=False)
    res = run_eval(_ctx(text_only, tmp_path), ["popularity", "sasrec_image", "mllm_msr"], [0])
    rows = res["rows"]
    assert rows["popularity"]["status"] == "ok"
    assert rows["sasrec_image"]["status"] == "not run" and "no cover images" in rows["sasrec_image"]["reason"]
    assert rows["mllm_msr"]["status"] == "not run"
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "not run" in table
    assert fit_calls == ["popularity"]


def test_cli_registers_eval():
    from typer.testing import CliRunner

    from mllm_msr.cli import app

    res = CliRunner().invoke(app, ["eval", "--help"])
    assert res.exit_code == 0 and "--rows" in res.output and "--seeds" in res.output


def test_llm_rows_through_runner_with_fake_models(ds, tmp_path):
    """LLM rows run through run_cases with config variants, cached like the baselines."""
    import itertools

    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from mllm_msr.config import load_config
    from mllm_msr.models.base import ModelBackend
    from mllm_msr.models.factory import LangChainChatBackend
    from mllm_msr.pipeline import build_services
    from mllm_msr.stores.summaries import SummaryStore

    class LenScorer(ModelBackend):
        model_id = "len-scorer"

        def generate(self, requests, **kw):  # pragma: no cover
            raise NotImplementedError

        def score_yes_no(self, requests):
            return [(len(str(r.messages)) % 97) / 97 for r in requests]

    chat = LangChainChatBackend(GenericFakeChatModel(messages=itertools.cycle([AIMessage("A red mystery.")])))
    chat.model_id = "fake-chat"
    cfg = load_config(None, [f"store.path={tmp_path / 'chroma'}", f"run_dir={tmp_path / 'run'}"])
    store = SummaryStore(cfg.store)
    seen = []

    def factory(c, dataset):
        seen.append((c.recommender.adapter, c.memory.mode, c.memory.block_size))
        return build_services(c, dataset, generator=chat, scorer=LenScorer(), store=store)

    ctx = _ctx(ds, tmp_path / "run", msr_cfg=cfg, users=2, services_factory=factory)
    res = run_eval(ctx, ["popularity", "zero_shot", "no_recurrence", "block_2"], [0, 1])
    rows = res["rows"]
    assert all(rows[k]["status"] == "ok" for k in rows), {k: rows[k]["reason"] for k in rows}
    assert sorted(rows["zero_shot"]["per_seed"]) == [0]  # llm_seeds=1
    assert rows["zero_shot"]["per_seed"][0]["n_cases"] == 2
    assert set(seen) == {(None, "recurrent", 3), ("rec", "direct", 3), ("rec", "recurrent", 2)}
    table = (tmp_path / "run" / "eval" / "table.md").read_text()
    assert "same 2 test users" in table and (tmp_path / "run" / "eval" / "block_size.png").is_file()
    seen.clear()
    run_eval(ctx, ["zero_shot", "no_recurrence", "block_2"], [0])
    assert seen == []


def test_llm_seed_on_another_split_than_the_adapter_was_trained_on_is_not_scored(ds, tmp_path):
    """An adapter trained on seed 0's split has seen the users that seed 1 would test on."""
    from mllm_msr.config import load_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "PROVENANCE.json").write_text(json.dumps(
        {"data": {"dataset": "synth", "protocol": ProtocolConfig(seed=0).model_dump()}}))
    cfg = load_config(None, [f"store.path={tmp_path / 'chroma'}", f"scorer.adapters={{rec: {adapter}}}"])
    ctx = _ctx(ds, tmp_path / "run", msr_cfg=cfg, llm_seeds=3)
    llm_cfg = harness._llm_cfg(ctx, harness.ROWS["mllm_msr"], 1)
    assert harness._adapter_overlap(ctx, llm_cfg, 0) is None
    why = harness._adapter_overlap(ctx, llm_cfg, 1)
    assert why and "seed 0" in why and "leak" in why
    zero = harness._llm_cfg(ctx, harness.ROWS["zero_shot"], 1)  # no adapter: nothing to leak
    assert harness._adapter_overlap(ctx, zero, 1) is None
    other = load_config(None, ["dataset=ml-100k", f"scorer.adapters={{rec: {adapter}}}"])
    assert harness._adapter_overlap(_ctx(ds, tmp_path / "r2", msr_cfg=other), llm_cfg, 1) is None


def test_shipped_adapter_guard_applies_without_configured_adapters(ds, tmp_path):
    """`msr eval` on the embedded default: the shipped adapter's provenance is found by itself."""
    from mllm_msr.config import load_config
    from mllm_msr.pipeline import SHIPPED_ADAPTER

    if not (SHIPPED_ADAPTER / "PROVENANCE.json").is_file():
        pytest.skip("no shipped adapter")
    cfg = load_config(None, [f"store.path={tmp_path / 'chroma'}"])
    ctx = _ctx(ds, tmp_path / "run", msr_cfg=cfg, llm_seeds=2)
    trained_seed = json.loads((SHIPPED_ADAPTER / "PROVENANCE.json").read_text())["data"]["protocol"]["seed"]
    other = trained_seed + 1
    # the row config carries the shipped adapter, so its weights hash is part of the row's cache key
    assert harness._llm_cfg(ctx, harness.ROWS["mllm_msr"], other).scorer.adapters["rec"] == str(SHIPPED_ADAPTER)
    assert harness._adapter_overlap(ctx, harness._llm_cfg(ctx, harness.ROWS["mllm_msr"], other), other)
    assert harness._adapter_overlap(ctx, harness._llm_cfg(ctx, harness.ROWS["mllm_msr"], trained_seed),
                                    trained_seed) is None
