"""Conversational recommender: the user's words update the preference summary (a new stored
version), then retrieval + the recommender answer with items, scores and a one-line reason.

    START → listen (fold the message into memory) → retrieve → recommend → respond → END
"""
from __future__ import annotations

import operator
import time
from typing import Annotated

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.cache.base import BaseCache
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from mllm_msr.agents.retriever import retrieve
from mllm_msr.graphs.nodes import _event, make_recommend, recommend_cache
from mllm_msr.graphs.state import RecState
from mllm_msr.pipeline import NO_PREFERENCES, Services


class ChatState(RecState, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    shown: Annotated[list[str], operator.add]  # items already recommended in this conversation


def make_listen(s: Services):
    def listen(state: ChatState) -> dict:
        t0 = time.perf_counter()
        uid = state["user_id"]
        last = next((m for m in reversed(state.get("messages", [])) if isinstance(m, HumanMessage)), None)
        history = s.store.user_history(uid)
        current = history[-1] if history else None
        if last is None or not str(last.content).strip():
            summary = current.summary if current else NO_PREFERENCES
            return {"user_summary": summary, "events": [_event("listen", t0, updated=False)]}
        v = s.memory.fold_feedback(current, uid, str(last.content))
        return {"user_summary": v.summary, "summary_step": v.step, "summary_key": v.key,
                "candidates": [], "events": [_event("listen", t0, updated=True)]}
    return listen


def make_retrieve_unseen(s: Services):
    """Retrieval that skips the history and everything this conversation has already shown, so each
    reply brings new items (filtering after a top-n cut would run dry after a few replies).
    Not ``nodes.make_retrieve`` with a parameter: LangGraph hands a node only the keys of the state
    type its function is annotated with, and ``RecState`` has no ``shown`` (tried, the chat test fails)."""
    def retrieve_unseen(state: ChatState) -> dict:
        t0 = time.perf_counter()
        seen = set(state.get("history", [])) | set(state.get("shown", []))
        ids = retrieve(s.store, state["user_summary"], s.retrieve_n, seen, s.catalog)
        return {"candidates": ids, "events": [_event("retrieve", t0, candidates=len(ids), excluded=len(seen))]}
    return retrieve_unseen


def make_respond(s: Services, top: int = 3):
    def respond(state: ChatState) -> dict:
        ranking = state.get("ranking", [])[:top]
        keys = [s.summarizer.key(s.catalog[r["item_id"]]) for r in ranking]
        sums = s.store.get_items(keys)
        lines = [f"Your taste as I understand it: {state['user_summary']}"]
        for r, k in zip(ranking, keys, strict=True):
            # no summary yet (chat summarizes only the user's history): the item's own text
            why = sums[k].image_description if k in sums and sums[k].image_description else (
                sums[k].summary if k in sums else s.catalog[r["item_id"]].text or "")
            lines.append(f"- {r['title']} (score {r['score']:.2f}) — {why[:120]}")
        if not ranking:
            lines.append("I have nothing new to suggest yet.")
        return {"messages": [AIMessage("\n".join(lines))], "shown": [r["item_id"] for r in ranking]}
    return respond


def build_chat_graph(s: Services) -> StateGraph:
    g = StateGraph(ChatState)
    g.add_node("listen", make_listen(s))
    g.add_node("retrieve", make_retrieve_unseen(s))
    g.add_node("recommend", make_recommend(s), cache_policy=recommend_cache(s))
    g.add_node("respond", make_respond(s))
    g.add_edge(START, "listen")
    g.add_edge("listen", "retrieve")
    g.add_edge("retrieve", "recommend")
    g.add_edge("recommend", "respond")
    g.add_edge("respond", END)
    return g


def compile_chat(s: Services, checkpointer=None, cache: BaseCache | None = None):
    """The compiled chat graph; with ``cache`` (``graphs.pipeline.make_node_cache``) a repeated ranking is
    not recomputed."""
    return build_chat_graph(s).compile(checkpointer=checkpointer, cache=cache)
