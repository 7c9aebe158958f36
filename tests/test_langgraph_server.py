"""LangGraph's own local server (`langgraph dev`, from langgraph.json) on loopback, called with the
LangGraph SDK: the pipeline ranks given candidates and the chat graph answers."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import free_port, wait_for_http

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_langgraph_dev_serves_pipeline_and_chat(tmp_path, tiny_idefics3):
    from langgraph_sdk import get_client

    from mllm_msr.data.loaders import load_dataset
    from mllm_msr.data.protocol import ProtocolConfig, build_splits
    from mllm_msr.data.synth import SynthConfig

    cfg = {"generator": {"model": str(tiny_idefics3)}, "scorer": {"model": str(tiny_idefics3)},
           "store": {"path": str(tmp_path / "chroma")}, "synth": {"n_users": 20, "n_items": 40},
           "recommender": {"adapter": None}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    env = {**os.environ, "MSR_CONFIG": str(tmp_path / "c.yaml"), "MSR_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1"}
    cli = Path(sys.executable).parent / "langgraph"
    server = subprocess.Popen([str(cli), "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1",
                               "--port", str(port), "--config", str(ROOT / "langgraph.json")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ok", server)
        ds = load_dataset("synth", config=SynthConfig(n_users=20, n_items=40))
        case = build_splits(ds, ProtocolConfig()).test[0]

        async def calls():
            client = get_client(url=f"http://127.0.0.1:{port}")
            graphs = {a["graph_id"] for a in await client.assistants.search()}
            t1 = await client.threads.create()
            out = await client.runs.wait(t1["thread_id"], "pipeline", input={
                "user_id": case.user_id, "history": list(case.history), "candidates": list(case.candidates)})
            t2 = await client.threads.create()
            chat = await client.runs.wait(t2["thread_id"], "chat", input={
                "user_id": case.user_id, "history": list(case.history),
                "messages": [{"role": "user", "content": "more like the blue ones"}]})
            return graphs, out, chat

        graphs, out, chat = asyncio.run(calls())
        assert {"pipeline", "chat"} <= graphs
        assert [e["node"] for e in out["events"]] == ["summarize_items", "update_memory", "recommend"]
        scores = [r["score"] for r in out["ranking"]]
        assert len(scores) == 21 and scores == sorted(scores, reverse=True)
        assert chat["messages"][-1]["content"].startswith("Your taste as I understand it")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
