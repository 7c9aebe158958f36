"""The one-user path of `msr chat` / `recommend` / the web page: only that user's items are
summarized (never the catalog), progress is reported, and retrieval works on a store without
item summaries (title + text embeddings)."""
from __future__ import annotations

from fakes import CountingChat, OverlapScorer
from mllm_msr.agents.recommender import RecommenderConfig
from mllm_msr.agents.retriever import retrieve
from mllm_msr.config import MSRConfig
from mllm_msr.data.protocol import ProtocolConfig, build_splits
from mllm_msr.graphs.chat import compile_chat
from mllm_msr.graphs.prepare import interactive_config, prepare_user
from mllm_msr.pipeline import build_services
from mllm_msr.stores.summaries import StoreConfig


def _services(tmp_path, ds, chat):
    cfg = MSRConfig(store=StoreConfig(path=str(tmp_path / "chroma")), recommender=RecommenderConfig(adapter=None))
    return build_services(cfg, ds, generator=chat, scorer=OverlapScorer())


def test_prepare_user_summarizes_only_that_user_and_reports_progress(tmp_path, synth_dataset):
    ds = synth_dataset
    case = build_splits(ds, ProtocolConfig()).test[0]
    chat = CountingChat()
    s = _services(tmp_path, ds, chat)
    steps: dict[str, list[tuple[int, int]]] = {}
    v = prepare_user(s, case.user_id, case.history, case.history_timestamps,
                     advance=lambda step, n, total: steps.setdefault(step, []).append((n, total)))
    n_hist = len(set(case.history))
    assert n_hist < len(ds.items)
    assert s.summarizer.model_calls <= 3 * n_hist  # at most 3 prompts per history item, none for the rest
    assert s.store.items.count() == n_hist
    assert v is not None and v.covered == tuple(case.history)
    assert sum(n for n, _ in steps["item summaries"]) == n_hist
    assert {t for _, t in steps["preference summary"]} == {-(-len(case.history) // s.memory.cfg.block_size)}
    before = s.summarizer.model_calls + s.memory.model_calls
    prepare_user(s, case.user_id, case.history, case.history_timestamps)  # cached: no model call
    assert s.summarizer.model_calls + s.memory.model_calls == before


def test_retrieval_before_item_summaries_uses_titles(tmp_path, synth_dataset):
    ds = synth_dataset
    s = _services(tmp_path, ds, CountingChat())
    assert s.store.items.count() == 0
    some = next(iter(ds.items.values()))
    got = retrieve(s.store, some.title, 5, set(), s.catalog)
    assert len(got) == 5 and got[0] == some.item_id  # its own title is nearest
    assert some.item_id not in retrieve(s.store, some.title, 5, {some.item_id}, s.catalog)


def test_chat_first_reply_on_a_fresh_store_touches_only_the_user(tmp_path, synth_dataset):
    from langchain_core.messages import HumanMessage

    ds = synth_dataset
    case = build_splits(ds, ProtocolConfig()).test[0]
    s = _services(tmp_path, ds, CountingChat())
    prepare_user(s, case.user_id, case.history, case.history_timestamps)
    st = compile_chat(s).invoke({"user_id": case.user_id, "history": list(case.history),
                                 "messages": [HumanMessage("more blue covers")]},
                                {"configurable": {"thread_id": "t"}})
    reply = str(st["messages"][-1].content)
    assert reply.count("\n- ") == 3  # three recommendations, retrieved by title before any candidate summary
    assert s.store.items.count() == len(set(case.history))


def test_interactive_config_uses_the_interactive_backend():
    cfg = interactive_config(MSRConfig())
    assert cfg.generator.backend == cfg.generator.interactive_backend == "transformers"
    assert MSRConfig().generator.backend == "vllm"  # msr run: vLLM serves the summarizer by default
