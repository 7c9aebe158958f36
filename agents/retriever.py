"""Candidate retrieval: when no candidate list is given, the items whose stored summaries are nearest
the user's preference summary (MiniLM embeddings in Chroma), for the recommender to rank."""
from __future__ import annotations

from collections.abc import Mapping

from mllm_msr.data.schema import Item
from mllm_msr.stores.summaries import SummaryStore


def retrieve(store: SummaryStore, user_summary: str, n: int, exclude: set[str],
             catalog: Mapping[str, Item]) -> list[str]:
    """Candidate retrieval: top-n items whose stored summaries are nearest the user summary; while
    fewer than n items have summaries, the rest by title + text embeddings (``title_index``)."""
    from mllm_msr.agents.title_index import search_titles

    out = [iid for iid, _ in store.search_items(user_summary, n, exclude=exclude) if iid in catalog]
    if len(out) < n:
        out += [iid for iid, _ in search_titles(store.embedding, catalog, user_summary, n - len(out),
                                                set(exclude) | set(out))]
    return out
