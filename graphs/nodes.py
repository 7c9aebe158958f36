"""Graph nodes: small functions State -> partial State over shared services.

Each ``make_*`` returns a node bound to a :class:`mllm_msr.pipeline.Services` (the per-user
recipe lives there, not here); import them to compose your own
``StateGraph`` (see README, "Compose your own graph").
"""
from __future__ import annotations

import time
from collections.abc import Callable

from langgraph.types import CachePolicy

from mllm_msr.agents.retriever import retrieve
from mllm_msr.agents.user_memory import UserHistory
from mllm_msr.graphs.state import RecState
from mllm_msr.hashing import digest
from mllm_msr.pipeline import NO_PREFERENCES, Services

Node = Callable[[RecState], dict]


def _event(node: str, t0: float, **info) -> dict:
    return {"node": node, "seconds": round(time.perf_counter() - t0, 3), **info}


def make_summarize_items(s: Services) -> Node:
    def summarize_items(state: RecState) -> dict:
        t0 = time.perf_counter()
        ids = list(dict.fromkeys(list(state.get("history", [])) + list(state.get("candidates", []))))
        before = s.summarizer.model_calls
        s.summarizer.summarize(s.items(ids, f"user {state.get('user_id')}"))
        return {"events": [_event("summarize_items", t0, items=len(ids),
                                  model_calls=s.summarizer.model_calls - before)]}
    return summarize_items


def make_update_memory(s: Services) -> Node:
    def update_memory(state: RecState) -> dict:
        t0 = time.perf_counter()
        uid, hist = state["user_id"], list(state.get("history", []))
        summaries = s.summarizer.summarize(s.items(hist, f"user {uid} history"))
        ts = tuple(state.get("history_timestamps") or [float(i) for i in range(len(hist))])
        before = s.memory.model_calls
        latest = s.memory.update_many([UserHistory(uid, tuple(hist), ts)], s.catalog, summaries).get(uid)
        update: dict = {"events": [_event("update_memory", t0, model_calls=s.memory.model_calls - before)]}
        if state.get("feedback"):
            latest = s.memory.fold_feedback(latest, uid, state["feedback"])
            update["feedback"] = ""
        if latest is not None:
            update.update(user_summary=latest.summary, summary_step=latest.step, summary_key=latest.key)
        else:
            update.update(user_summary=NO_PREFERENCES, summary_step=-1, summary_key="")
        return update
    return update_memory


def make_retrieve(s: Services) -> Node:
    def retrieve_candidates(state: RecState) -> dict:
        t0 = time.perf_counter()
        ids = retrieve(s.store, state["user_summary"], s.retrieve_n, set(state.get("history", [])), s.catalog)
        return {"candidates": ids, "events": [_event("retrieve", t0, candidates=len(ids))]}
    return retrieve_candidates


def make_recommend(s: Services) -> Node:
    def recommend(state: RecState) -> dict:
        t0 = time.perf_counter()
        items = s.items(list(state.get("candidates", [])), f"user {state.get('user_id')} candidates")
        s.check_users([state["user_id"]])
        text = s.preference_text(list(state.get("history", [])), state.get("user_summary"))
        ranked = s.recommender.rank(text, items)
        return {"ranking": [{"item_id": i, "title": s.catalog[i].title, "score": sc} for i, sc in ranked],
                "events": [_event("recommend", t0, candidates=len(items))]}
    return recommend


def recommend_cache(s: Services) -> CachePolicy:
    """LangGraph's node cache policy for ``recommend``: the same user, preference text, candidates
    and scorer (model, adapter content, prompts: ``Services.scorer_key``) give the same ranking, so a
    repeated request is answered from the graph's cache without loading a model. The leak guard
    runs in the key, so a cache hit is guarded like a computed ranking."""
    def key(state: RecState) -> str:
        uid = state.get("user_id", "")  # LangGraph also asks for keys of empty states (get_graph)
        if uid:
            s.check_users([uid])
        text = s.preference_text(list(state.get("history", [])), state.get("user_summary"))
        return digest("recommend", uid, s.scorer_key, text, list(state.get("candidates", [])))
    return CachePolicy(key_func=key)


def needs_retrieval(state: RecState) -> str:
    return "recommend" if state.get("candidates") else "retrieve"
