"""Retrieval before item summaries exist: the catalog's titles and texts, embedded once per process
with the store's own embedding function (MiniLM), searched by cosine similarity.

``msr chat`` / ``msr recommend --retrieve`` / the web page summarize only one user's history, so on
a fresh store most candidates have no summary yet; :func:`agents.retriever.retrieve` fills its list
from here."""
from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet

import numpy as np

from mllm_msr.data.schema import Item

_CACHE: dict[tuple[int, int], tuple[list[str], np.ndarray]] = {}


def item_text(item: Item) -> str:
    return f"{item.title}. {item.text or ''}".strip()


def _index(embedding, catalog: Mapping[str, Item]) -> tuple[list[str], np.ndarray]:
    key = (id(embedding), hash(tuple(catalog)))
    if key not in _CACHE:
        ids = list(catalog)
        vecs = np.asarray(embedding([item_text(catalog[i]) for i in ids]), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
        _CACHE[key] = (ids, vecs)
    return _CACHE[key]


def search_titles(embedding, catalog: Mapping[str, Item], query: str, n: int,
                  exclude: AbstractSet[str] = frozenset()) -> list[tuple[str, float]]:
    """The ``n`` catalog items whose title + text are nearest ``query`` (cosine), skipping ``exclude``."""
    if n <= 0 or not catalog:
        return []
    ids, vecs = _index(embedding, catalog)
    q = np.asarray(embedding([query]), dtype=np.float32)[0]
    q /= max(float(np.linalg.norm(q)), 1e-12)
    sims = vecs @ q
    out = []
    for k in np.argsort(-sims):
        if ids[k] not in exclude:
            out.append((ids[k], float(sims[k])))
            if len(out) == n:
                break
    return out
