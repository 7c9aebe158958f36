"""Graphs for LangGraph's own server (`langgraph dev`, see langgraph.json) and the web demo.

Services are built once per process from the default config (or ``MSR_CONFIG``, a YAML file), so
the served graphs use the same models, prompts and Chroma store as `msr run`.
"""
from __future__ import annotations

import asyncio
import os
from functools import lru_cache

from mllm_msr.graphs.chat import compile_chat
from mllm_msr.graphs.pipeline import compile_pipeline
from mllm_msr.pipeline import Services


@lru_cache(maxsize=1)
def services() -> Services:
    from mllm_msr.config import load_config
    from mllm_msr.pipeline import build_services, finalize_config, load_data

    cfg = finalize_config(load_config(os.environ.get("MSR_CONFIG") or None))
    return build_services(cfg, load_data(cfg))


async def pipeline():
    """The MLLM-MSR pipeline graph (the platform supplies the checkpointer). Building services
    loads data and models, so it runs in a worker thread, off the server's event loop."""
    return compile_pipeline(await asyncio.to_thread(services))


async def chat():
    """The conversational recommender graph."""
    return compile_chat(await asyncio.to_thread(services))
