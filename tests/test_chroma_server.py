"""The summary store on a real Chroma server (`chroma run` on loopback), chosen by config.

`msr run` on the tiny model gives the same metrics with the server as with the embedded store, and
two processes writing the same server at once (overlapping items and users) lose and duplicate
nothing: the server ends up with exactly the records one serial writer produces.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fakes import CountingChat, OverlapScorer
from mllm_msr.agents.user_memory import UserHistory
from mllm_msr.cli import app
from mllm_msr.config import load_config
from mllm_msr.data.loaders import load_microlens
from mllm_msr.data.synth import SynthConfig, generate_benchmark
from mllm_msr.pipeline import build_services
from mllm_msr.stores.summaries import StoreConfig, SummaryStore

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


def _server(endpoint: tuple[str, int], database: str) -> list[str]:
    host, port = endpoint
    return [f"store.host={host}", f"store.port={port}", f"store.database={database}"]


def _records(store: SummaryStore) -> dict[str, dict]:
    """Every stored record of both collections, by id (document and metadata)."""
    out = {}
    for coll in (store.items, store.users):
        got = coll.get(include=["documents", "metadatas"])
        assert len(got["ids"]) == len(set(got["ids"])) == coll.count()
        out.update({i: {"doc": d, **m} for i, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)})
    return out


def write(spec_path: str) -> None:
    """Subprocess entry: summarise some items and users into the store, in small batches."""
    spec = json.loads(Path(spec_path).read_text())
    ds = load_microlens(Path(spec["root"]))
    cfg = load_config(None, spec["overrides"] + ["items.batch_size=2", "recommender.adapter=null"])
    s = build_services(cfg, ds, generator=CountingChat(), scorer=OverlapScorer())
    while not Path(spec["go"]).exists():  # start together with the other writer
        time.sleep(0.01)
    seqs = ds.sequences()
    users = [ds.users[i] for i in spec["users"]]
    items = [ds.items[i] for i in dict.fromkeys([*spec["items"], *(x.item_id for u in users for x in seqs[u])])]
    sums = s.summarizer.summarize(items)
    for u in users:  # one user at a time: many interleaved small writes
        hist = UserHistory(u, tuple(x.item_id for x in seqs[u]), tuple(x.timestamp for x in seqs[u]))
        s.memory.update_many([hist], ds.items, sums)


@pytest.fixture()
def msr_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MSR_HOME", str(tmp_path / "home"))
    return tmp_path


def test_msr_run_on_a_chroma_server_gives_the_embedded_store_metrics(chroma_endpoint, tiny_idefics3, msr_home):
    def run(run_dir: Path, store: list[str]) -> dict:
        sets = [f"generator.model={tiny_idefics3}", f"scorer.model={tiny_idefics3}", f"run_dir={run_dir}",
                "synth.n_users=30", "synth.n_items=50", "items.batch_size=4", *store]
        res = CliRunner().invoke(app, ["run", "--quiet", *[a for s in sets for a in ("--set", s)]])
        assert res.exit_code == 0, res.output
        return json.loads((run_dir / "metrics.json").read_text())

    embedded = run(msr_home / "embedded", [f"store.path={msr_home / 'chroma'}"])
    served = run(msr_home / "served", _server(chroma_endpoint, "msr_run"))
    assert served["metrics"] == embedded["metrics"]
    assert served["model_calls"] == embedded["model_calls"] and served["model_calls"]["item_summaries"] > 0
    host, port = chroma_endpoint
    on_server = SummaryStore(StoreConfig(host=host, port=port, database="msr_run"))
    local = SummaryStore(StoreConfig(path=str(msr_home / "chroma")))
    assert _records(on_server) == _records(local)
    # the server keeps the summaries: a run in a fresh run folder (no scores yet) only scores
    again = run(msr_home / "served-again", _server(chroma_endpoint, "msr_run"))
    assert again["metrics"] == embedded["metrics"]
    assert again["model_calls"] == {**embedded["model_calls"], "item_summaries": 0, "user_summaries": 0}


def test_two_processes_writing_one_server_lose_and_duplicate_nothing(chroma_endpoint, tmp_path):
    root = generate_benchmark(tmp_path / "synth", SynthConfig(n_users=16, n_items=40, seed=5))
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_chroma_server as t; t.write(sys.argv[1])"
    parts = [(range(0, 26), range(0, 10)), (range(14, 40), range(6, 16))]  # overlapping items and users

    def spec(i: int, items: range, users: range, database: str) -> Path:
        ds_items = sorted(load_microlens(root).items)
        p = tmp_path / f"spec-{database}-{i}.json"
        p.write_text(json.dumps({"root": str(root), "go": str(go), "items": [ds_items[k] for k in items],
                                 "users": list(users), "overrides": _server(chroma_endpoint, database)}))
        return p

    procs = [subprocess.Popen([sys.executable, "-c", code, str(spec(i, *part, "concurrent"))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, part in enumerate(parts)]
    time.sleep(1)
    go.touch()
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    # reference: one writer doing both parts, one after the other, into its own database
    for i, part in enumerate(parts):
        write(str(spec(i, *part, "serial")))

    host, port = chroma_endpoint
    concurrent = SummaryStore(StoreConfig(host=host, port=port, database="concurrent"))
    serial = SummaryStore(StoreConfig(host=host, port=port, database="serial"))
    got, want = _records(concurrent), _records(serial)
    assert got == want
    ds = load_microlens(root)
    all_items = {x.item_id for u in range(16) for x in ds.sequences()[ds.users[u]]} | set(ds.items)
    assert concurrent.items.count() == len(all_items)
    for u in ds.users[:16]:
        steps = [v.step for v in concurrent.user_history(u)]
        assert steps == list(range(len(steps))) and steps, u  # one version per step, none missing


@pytest.mark.parametrize("exists_after", [True, False])
def test_losing_the_race_to_create_the_database_is_fine_only_if_it_exists(monkeypatch, exists_after):
    """Two processes opening a new database at once: the loser's create fails ("Database [x] already
    exists" comes back over HTTP as a plain ChromaError); it goes on if the database is there now."""
    import chromadb
    from chromadb.errors import ChromaError, NotFoundError

    from mllm_msr.stores.summaries import http_client

    gets = iter([False, exists_after])

    class Admin:
        def __init__(self, settings):
            pass

        def get_database(self, name):
            if not next(gets):
                raise NotFoundError(f"Database {name} not found")

        def create_database(self, name):
            raise ChromaError(f"Database [{name}] already exists")

    monkeypatch.setattr(chromadb, "AdminClient", Admin)
    monkeypatch.setattr(chromadb, "HttpClient", lambda **kw: ("client", kw["database"]))
    cfg = StoreConfig(host="127.0.0.1", port=1, database="raced")
    if exists_after:
        assert http_client(cfg) == ("client", "raced")
    else:
        with pytest.raises(ChromaError, match=r"already exists"):
            http_client(cfg)
