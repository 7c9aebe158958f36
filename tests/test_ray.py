"""The batch stages as Ray Data pipelines (``engine.kind=ray``) on a local Ray (2 CPUs, loopback)
against a real Chroma server (`chroma run`), with the tiny Idefics3 model built from the config in
every actor: `msr run` gives the single-process metrics, every item is summarized exactly once,
and a rerun makes no model call.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fakes import CountingChat, OverlapScorer
from mllm_msr.cli import app
from mllm_msr.config import load_config
from mllm_msr.pipeline import build_services, score_cases
from mllm_msr.stores.summaries import SummaryStore

pytestmark = pytest.mark.slow


@pytest.fixture()
def ray_cluster():
    """Ray is started by the engine itself (engine.num_cpus=2, loopback); stopped after the test."""
    import ray

    yield
    ray.shutdown()


def _run(run_dir: Path, sets: list[str]) -> dict:
    res = CliRunner().invoke(app, ["run", "--quiet", *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    return json.loads((run_dir / "metrics.json").read_text())


def test_msr_run_on_ray_gives_the_single_process_metrics(chroma_endpoint, tiny_idefics3, tmp_path, monkeypatch,
                                                         ray_cluster):
    monkeypatch.setenv("MSR_HOME", str(tmp_path / "home"))
    host, port = chroma_endpoint
    common = [f"generator.model={tiny_idefics3}", f"scorer.model={tiny_idefics3}", "synth.n_users=40",
              "synth.n_items=50", "items.batch_size=4", "max_test_users=4", f"store.host={host}",
              f"store.port={port}"]
    ray = ["engine.kind=ray", "engine.num_cpus=2", "engine.actors=2", "engine.cpus_per_actor=1",
           "engine.users_per_batch=2"]

    local = _run(tmp_path / "local", [*common, f"run_dir={tmp_path / 'local'}", "store.database=ray_local"])
    spread = _run(tmp_path / "ray", [*common, *ray, f"run_dir={tmp_path / 'ray'}", "store.database=ray_spread"])
    assert spread["metrics"] == local["metrics"]
    assert spread["model_calls"] == local["model_calls"]
    assert spread["model_calls"]["item_summaries"] > 0 and spread["model_calls"]["scored_pairs"] > 0

    # each needed item was summarized exactly once: one record per item, and 3 calls per imaged item
    store = SummaryStore(load_config(None, [*common, "store.database=ray_spread"]).store)
    got = store.items.get(include=["metadatas"])
    item_ids = [m["item_id"] for m in got["metadatas"]]
    assert len(item_ids) == len(set(item_ids)) == len(got["ids"])
    assert spread["model_calls"]["item_summaries"] == 3 * len(item_ids)  # every synth item has a cover
    scored = [json.loads(line) for line in (tmp_path / "ray" / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == spread["users"] == 4

    # a rerun on the same store and run folder makes no model call and keeps the metrics
    (tmp_path / "ray" / "scores.jsonl").unlink()
    again = _run(tmp_path / "ray", [*common, *ray, f"run_dir={tmp_path / 'ray'}", "store.database=ray_spread"])
    assert again["metrics"] == local["metrics"]
    assert again["model_calls"] == {"item_summaries": 0, "user_summaries": 0, "scored_pairs": 4 * 21}


def test_ray_engine_refuses_an_embedded_store(synth_dataset, tmp_path):
    cfg = load_config(None, ["engine.kind=ray", f"store.path={tmp_path / 'chroma'}", "recommender.adapter=null"])
    s = build_services(cfg, synth_dataset, generator=CountingChat(), scorer=OverlapScorer())
    with pytest.raises(ValueError, match="store.host"):
        score_cases(s, [])
