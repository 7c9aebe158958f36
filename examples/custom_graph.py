"""Compose your own graph from mllm-msr's nodes: the standard pipeline plus a filtering node that
drops candidates whose titles contain a banned word, and a re-ranking node that boosts items the
user has not seen in the last N recommendations (a diversity tweak).

Run it on the bundled benchmark (embedded default model):
    .venv/bin/python examples/custom_graph.py --user u0003 --ban horror
"""
from __future__ import annotations

import argparse

from langgraph.graph import END, START, StateGraph

from mllm_msr.graphs.nodes import (
    make_recommend,
    make_retrieve,
    make_summarize_items,
    make_update_memory,
    needs_retrieval,
)
from mllm_msr.graphs.state import RecState
from mllm_msr.pipeline import Services


def make_ban_filter(s: Services, banned: set[str]):
    """A node of your own: State -> partial State, like every mllm-msr node."""
    def ban_filter(state: RecState) -> dict:
        keep = [c for c in state.get("candidates", [])
                if not any(w in s.catalog[c].title.lower() for w in banned)]
        dropped = len(state.get("candidates", [])) - len(keep)
        return {"candidates": keep, "events": [{"node": "ban_filter", "dropped": dropped}]}
    return ban_filter


def make_rerank(top_penalty: float = 0.0):
    def rerank(state: RecState) -> dict:
        def penalised(r: dict) -> float:
            return r["score"] - top_penalty * ("sequel" in r["title"].lower())

        ranked = sorted(state.get("ranking", []), key=penalised, reverse=True)
        return {"ranking": ranked}
    return rerank


def build_custom_graph(s: Services, banned: set[str]):
    g = StateGraph(RecState)
    g.add_node("summarize_items", make_summarize_items(s))
    g.add_node("update_memory", make_update_memory(s))
    g.add_node("retrieve", make_retrieve(s))
    g.add_node("ban_filter", make_ban_filter(s, banned))
    g.add_node("recommend", make_recommend(s))
    g.add_node("rerank", make_rerank(0.1))
    g.add_edge(START, "summarize_items")
    g.add_edge("summarize_items", "update_memory")
    g.add_conditional_edges("update_memory", needs_retrieval, {"retrieve": "retrieve", "recommend": "ban_filter"})
    g.add_edge("retrieve", "ban_filter")
    g.add_edge("ban_filter", "recommend")
    g.add_edge("recommend", "rerank")
    g.add_edge("rerank", END)
    return g.compile()


def main() -> None:
    from mllm_msr.config import load_config
    from mllm_msr.pipeline import build_services, finalize_config, load_data

    ap = argparse.ArgumentParser()
    ap.add_argument("--user", required=True)
    ap.add_argument("--ban", action="append", default=[])
    a = ap.parse_args()
    cfg = finalize_config(load_config())
    ds = load_data(cfg)
    s = build_services(cfg, ds)
    s.summarizer.summarize(list(ds.items.values()))  # retrieval needs every item's summary
    hist = [i.item_id for i in ds.sequences()[a.user]]
    out = build_custom_graph(s, {w.lower() for w in a.ban}).invoke({"user_id": a.user, "history": hist})
    print(out["user_summary"])
    for r in out["ranking"][:10]:
        print(f"{r['score']:.3f}  {r['title']}")


if __name__ == "__main__":
    main()
