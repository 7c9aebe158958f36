"""The MLLM-MSR pipeline as a LangGraph state machine, one thread per user.

    START → summarize_items → update_memory ─┬─(candidates given)→ recommend → END
                                              └─(none)→ retrieve ──→ recommend
"""
from __future__ import annotations

import sqlite3
import weakref
from pathlib import Path
from typing import Any

from langgraph.cache.base import BaseCache
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph

from mllm_msr.config import MSRConfig
from mllm_msr.graphs.nodes import (
    make_recommend,
    make_retrieve,
    make_summarize_items,
    make_update_memory,
    needs_retrieval,
    recommend_cache,
)
from mllm_msr.graphs.state import RecState
from mllm_msr.pipeline import Services


def sqlite_checkpointer(path: str | Path) -> Any:
    """LangGraph's SQLite checkpointer on a file (one thread per user; reopening restores state)."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return SqliteSaver(sqlite3.connect(str(path), check_same_thread=False))


def postgres_checkpointer(url: str, max_connections: int = 4) -> BaseCheckpointSaver:
    """LangGraph's PostgreSQL checkpointer over a psycopg connection pool; creates its tables on
    first use. The pool closes when the saver is garbage-collected or the process exits."""
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=True,
                          kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row})
    saver = PostgresSaver(pool)
    saver.setup()
    weakref.finalize(saver, pool.close)
    return saver


def make_checkpointer(cfg: MSRConfig, name: str = "checkpoints") -> BaseCheckpointSaver:
    """The configured checkpointer (``cfg.checkpointer``): ``postgresql://…`` → PostgreSQL,
    ``sqlite:///PATH`` → that SQLite file, unset → SQLite at ``run_dir/<name>.sqlite``."""
    url = cfg.checkpointer
    if not url:
        return sqlite_checkpointer(Path(cfg.run_dir) / f"{name}.sqlite")
    if url.startswith("sqlite:///"):
        return sqlite_checkpointer(url[len("sqlite:///"):])  # sqlite:///rel/path, sqlite:////abs/path
    if url.startswith(("postgres://", "postgresql://")):
        return postgres_checkpointer(url)
    raise ValueError(f"checkpointer {url!r}: expected sqlite:///PATH or postgresql://…")


def make_node_cache(cfg: MSRConfig) -> BaseCache:
    """LangGraph's SQLite node cache at ``run_dir/node_cache.sqlite``: nodes compiled with a cache
    policy (``recommend``) answer a repeated input from it, across processes."""
    from langgraph.cache.sqlite import SqliteCache

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    return SqliteCache(path=str(Path(cfg.run_dir) / "node_cache.sqlite"))


def build_pipeline_graph(services: Services) -> StateGraph:
    """The uncompiled builder, for users who want to add or swap nodes before compiling."""
    g = StateGraph(RecState)
    g.add_node("summarize_items", make_summarize_items(services))
    g.add_node("update_memory", make_update_memory(services))
    g.add_node("retrieve", make_retrieve(services))
    g.add_node("recommend", make_recommend(services), cache_policy=recommend_cache(services))
    g.add_edge(START, "summarize_items")
    g.add_edge("summarize_items", "update_memory")
    g.add_conditional_edges("update_memory", needs_retrieval, ["retrieve", "recommend"])
    g.add_edge("retrieve", "recommend")
    g.add_edge("recommend", END)
    return g


def compile_pipeline(services: Services, checkpointer: Any = None, cache: BaseCache | None = None):
    """The compiled pipeline; with ``cache`` (:func:`make_node_cache`) a repeated ranking is not recomputed."""
    return build_pipeline_graph(services).compile(checkpointer=checkpointer, cache=cache)


def thread(user_id: str) -> dict:
    """The run config that puts a user's graph state on its own checkpoint thread."""
    return {"configurable": {"thread_id": f"user:{user_id}"}}
