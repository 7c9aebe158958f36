"""LangGraph checkpoints in a real PostgreSQL cluster (throwaway, on loopback), chosen by config.

The pipeline and chat graphs run on the scripted fakes of test_pipeline.py; a graph process killed
mid-thread (SIGKILL inside the memory node) resumes from its Postgres checkpoint to the same final
state as an uninterrupted run, without duplicating stored summary versions.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakes import CountingChat, OverlapScorer
from mllm_msr.config import MSRConfig, load_config
from mllm_msr.data.loaders import load_microlens
from mllm_msr.data.protocol import ProtocolConfig, build_splits
from mllm_msr.data.synth import SynthConfig, generate_benchmark
from mllm_msr.graphs.pipeline import compile_pipeline, make_checkpointer, thread
from mllm_msr.pipeline import build_services
from servers import postgres_database

TESTS = Path(__file__).resolve().parent


def _config(store: Path, checkpointer: str | None, run_dir: Path | None = None) -> MSRConfig:
    overrides = [f"store.path={store}", "recommender.adapter=null", f"run_dir={run_dir or store.parent / 'run'}"]
    return load_config(None, overrides + ([f"checkpointer={checkpointer}"] if checkpointer else []))


def _services(root: Path, store: Path, chat: CountingChat | None = None):
    ds = load_microlens(root)
    return build_services(_config(store, None), ds, generator=chat or CountingChat(), scorer=OverlapScorer())


class GatedChat(CountingChat):
    """Blocks forever on the n-th user-summary batch, after saying so on stdout (for the kill test)."""

    def __init__(self, block_on: int):
        super().__init__()
        self.block_on, self.user_batches = block_on, 0

    def generate(self, requests, **kw):
        if any(self.role(r) == "user" for r in requests):
            self.user_batches += 1
            if self.user_batches == self.block_on:
                print("BLOCKED", flush=True)
                time.sleep(3600)
        return super().generate(requests, **kw)


def child(spec_path: str) -> None:
    """Subprocess entry: run one user's pipeline thread on Postgres, blocking in the memory node."""
    spec = json.loads(Path(spec_path).read_text())
    s = _services(Path(spec["root"]), Path(spec["store"]), GatedChat(spec["block_on"]))
    graph = compile_pipeline(s, make_checkpointer(_config(Path(spec["store"]), spec["url"])))
    graph.invoke(spec["input"], thread(spec["input"]["user_id"]))


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    return generate_benchmark(tmp_path_factory.mktemp("synth"), SynthConfig(n_users=20, n_items=40, seed=3))


@pytest.fixture(scope="module")
def case(bench_root):
    cases = build_splits(load_microlens(bench_root), ProtocolConfig()).test
    return next(c for c in cases if len(c.history) > 6)  # at least 3 memory blocks


def _input(case) -> dict:
    return {"user_id": case.user_id, "history": list(case.history),
            "history_timestamps": list(case.history_timestamps), "candidates": list(case.candidates)}


def _without_events(values: dict) -> dict:
    return {k: v for k, v in values.items() if k != "events"}


def test_checkpointer_is_chosen_by_config(tmp_path):
    from langgraph.checkpoint.sqlite import SqliteSaver

    assert isinstance(make_checkpointer(_config(tmp_path / "c", None, tmp_path / "run"), "chat"), SqliteSaver)
    assert (tmp_path / "run" / "chat.sqlite").exists()
    assert isinstance(make_checkpointer(_config(tmp_path / "c", f"sqlite:///{tmp_path}/x/ck.db")), SqliteSaver)
    assert (tmp_path / "x" / "ck.db").exists()
    with pytest.raises(ValueError, match="checkpointer"):
        load_config(None, ["checkpointer=mysql://h/db"])


@pytest.mark.slow
def test_pipeline_and_chat_graphs_checkpoint_in_postgres(postgres_url, bench_root, case, tmp_path):
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.postgres import PostgresSaver

    from mllm_msr.graphs.chat import compile_chat

    url = postgres_database(postgres_url, "graphs")
    cfg = _config(tmp_path / "chroma", url)
    s = _services(bench_root, tmp_path / "chroma")
    saver = make_checkpointer(cfg)
    assert isinstance(saver, PostgresSaver)
    state = compile_pipeline(s, saver).invoke(_input(case), thread(case.user_id))
    assert len(state["ranking"]) == 21
    chat = compile_chat(s, make_checkpointer(cfg, "chat"))
    conf = thread("chat:" + case.user_id)
    first = chat.invoke({"user_id": case.user_id, "history": list(case.history),
                         "messages": [HumanMessage("more blue ones")]}, conf)
    chat.invoke({"user_id": case.user_id, "history": list(case.history),
                 "messages": [HumanMessage("something else")]}, conf)

    # a new connection pool (as a new process would open) restores both threads
    pipeline2 = compile_pipeline(s, make_checkpointer(cfg))
    assert pipeline2.get_state(thread(case.user_id)).values["ranking"] == state["ranking"]
    assert pipeline2.get_state(thread("someone-else")).values == {}
    restored = compile_chat(s, make_checkpointer(cfg, "chat")).get_state(conf).values
    assert [m.content for m in restored["messages"][:2]] == ["more blue ones", first["messages"][-1].content]
    assert len(restored["messages"]) == 4 and len(restored["shown"]) == 6
    import psycopg

    with psycopg.connect(url) as con:
        threads = {r[0] for r in con.execute("SELECT DISTINCT thread_id FROM checkpoints")}
    assert threads == {thread(case.user_id)["configurable"]["thread_id"], conf["configurable"]["thread_id"]}


@pytest.mark.slow
def test_killed_graph_process_resumes_from_postgres_to_the_same_state(postgres_url, bench_root, case, tmp_path):
    # reference: one uninterrupted run (own store, own database)
    ref_cfg = _config(tmp_path / "ref", postgres_database(postgres_url, "reference"))
    ref_s = _services(bench_root, tmp_path / "ref")
    ref = compile_pipeline(ref_s, make_checkpointer(ref_cfg)).invoke(_input(case), thread(case.user_id))

    # a process blocked in update_memory after its first block is stored, then SIGKILLed
    url = postgres_database(postgres_url, "killed")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"root": str(bench_root), "store": str(tmp_path / "chroma"), "url": url,
                                "block_on": 2, "input": _input(case)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_postgres; test_postgres.child(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(spec)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "BLOCKED":
            break
    assert proc.poll() is None, "".join(lines)[-3000:]
    cfg = _config(tmp_path / "chroma", url)
    s = _services(bench_root, tmp_path / "chroma")
    graph = compile_pipeline(s, make_checkpointer(cfg))
    for _ in range(100):  # the first node's checkpoint (written while the next node runs)
        if graph.get_state(thread(case.user_id)).next == ("update_memory",):
            break
        time.sleep(0.1)
    assert graph.get_state(thread(case.user_id)).next == ("update_memory",)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert [v.step for v in s.store.user_history(case.user_id)] == [0]  # the killed node's first block

    resumed = graph.invoke(None, thread(case.user_id))
    assert graph.get_state(thread(case.user_id)).next == ()
    assert _without_events(resumed) == _without_events(ref)
    assert [e["node"] for e in resumed["events"]] == [e["node"] for e in ref["events"]]
    assert s.summarizer.model_calls == 0  # item summaries came from the killed process's store
    assert s.memory.model_calls == ref_s.memory.model_calls - 1  # only the blocks not stored yet
    versions = [(v.step, v.key, v.summary) for v in s.store.user_history(case.user_id)]
    assert versions == [(v.step, v.key, v.summary) for v in ref_s.store.user_history(case.user_id)]
    assert len({v[0] for v in versions}) == len(versions) == ref_s.memory.model_calls
    assert s.store.items.count() == ref_s.store.items.count()
