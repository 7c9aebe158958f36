"""langgraph.json names graph factories that build from the config in MSR_CONFIG (checked here by
importing them the way the LangGraph server does: by file path and attribute)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_every_graph_in_langgraph_json_builds(tmp_path, monkeypatch, tiny_idefics3):
    cfg = {"generator": {"model": str(tiny_idefics3)}, "scorer": {"model": str(tiny_idefics3)},
           "store": {"path": str(tmp_path / "chroma")}, "synth": {"n_users": 20, "n_items": 40},
           "recommender": {"adapter": None}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("MSR_CONFIG", str(tmp_path / "c.yaml"))
    monkeypatch.setenv("MSR_HOME", str(tmp_path / "home"))
    spec = json.loads((ROOT / "langgraph.json").read_text())
    nodes = {}
    for name, ref in spec["graphs"].items():
        path, attr = ref.split(":")
        mspec = importlib.util.spec_from_file_location(f"lg_{name}", ROOT / path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        graph = asyncio.run(getattr(mod, attr)())
        nodes[name] = set(graph.get_graph().nodes)
    assert {"summarize_items", "update_memory", "retrieve", "recommend"} <= nodes["pipeline"]
    assert {"listen", "retrieve", "recommend", "respond"} <= nodes["chat"]
