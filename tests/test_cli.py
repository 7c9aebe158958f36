"""The `msr` CLI end to end on a tiny real model (transformers): run, resume after SIGKILL, lock,
recommend, data commands."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mllm_msr.cli import app

runner = CliRunner()


def _sets(tiny: Path, run: Path) -> list[str]:
    args = {"generator.model": tiny, "scorer.model": tiny, "run_dir": run, "store.path": run / "chroma",
            "synth.n_users": 30, "synth.n_items": 50, "items.batch_size": 4}
    return [a for k, v in args.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MSR_HOME", str(tmp_path / "home"))
    return tmp_path


def test_data_synth_and_stats(env):
    res = runner.invoke(app, ["data", "stats", "synth", "--set", "synth.n_users=30", "--set", "synth.n_items=50"])
    assert res.exit_code == 0, res.output
    assert "test_users" in res.output and "cold_test_items" in res.output


def test_run_then_cached_rerun_then_recommend(env, tiny_idefics3):
    run = env / "run"
    first = runner.invoke(app, ["run", "--quiet", *_sets(tiny_idefics3, run)])
    assert first.exit_code == 0, first.output
    m1 = json.loads((run / "metrics.json").read_text())
    assert m1["model_calls"]["item_summaries"] > 0 and m1["model_calls"]["scored_pairs"] == 21 * m1["users"]
    second = runner.invoke(app, ["run", "--quiet", *_sets(tiny_idefics3, run)])
    assert second.exit_code == 0, second.output
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["metrics"] == m1["metrics"]
    assert m2["model_calls"] == {"item_summaries": 0, "user_summaries": 0, "scored_pairs": 0}
    user = json.loads((run / "scores.jsonl").read_text().splitlines()[0])["user_id"]
    rec = runner.invoke(app, ["recommend", "--user", user, "--top", "5", *_sets(tiny_idefics3, run)])
    assert rec.exit_code == 0, rec.output
    assert "preference summary" in rec.output and "top items" in rec.output
    bad = runner.invoke(app, ["recommend", "--user", "nobody", *_sets(tiny_idefics3, run)])
    assert bad.exit_code == 2 and "unknown user" in bad.output


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_identical_metrics_and_recomputes_nothing_stored(env, tiny_idefics3):
    run_a, run_b = env / "a", env / "b"
    base = [sys.executable, "-m", "mllm_msr.cli", "run", "--quiet"]
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    # reference: an uninterrupted run
    subprocess.run(base + _sets(tiny_idefics3, run_a), check=True, env=e, capture_output=True)
    ref = json.loads((run_a / "metrics.json").read_text())
    # interrupted: kill -9 once some item summaries are stored
    p = subprocess.Popen(base + _sets(tiny_idefics3, run_b), env=e, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    def rows_stored() -> int:
        db = run_b / "chroma" / "chroma.sqlite3"
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return con.execute("select count(*) from embeddings").fetchone()[0]
        except sqlite3.Error:
            return 0

    deadline = time.time() + 180
    while time.time() < deadline and rows_stored() < 8 and p.poll() is None:
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    import chromadb

    client = chromadb.PersistentClient(path=str(run_b / "chroma"))
    names = [c.name for c in client.list_collections()]
    stored = client.get_collection("item_summaries").count() if "item_summaries" in names else 0
    del client
    # the rerun on the same folder works (the kill released the lock) and finishes the job
    done = subprocess.run(base + _sets(tiny_idefics3, run_b), env=e, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads((run_b / "metrics.json").read_text())
    assert got["metrics"] == ref["metrics"]
    # nothing already stored was recomputed: 3 model calls (image, text, fusion) per item not yet stored
    assert 0 < stored, "the kill came before any item summary was stored; make the test wait longer"
    assert got["model_calls"]["item_summaries"] == ref["model_calls"]["item_summaries"] - 3 * stored


def test_second_concurrent_run_on_the_same_folder_is_refused(env, tiny_idefics3):
    import fcntl

    run = env / "locked"
    run.mkdir()
    with open(run / ".msr-lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = runner.invoke(app, ["run", "--quiet", *_sets(tiny_idefics3, run)])
    assert res.exit_code == 2 and "another msr run" in res.output
    # a different run folder on the same store is refused too (the store has its own lock)
    other = env / "other"
    store = run / "chroma"
    store.mkdir()
    with open(store / ".msr-lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = runner.invoke(app, ["run", "--quiet", *_sets(tiny_idefics3, other), "--set", f"store.path={store}"])
    assert res.exit_code == 2 and str(store) in res.output.replace("\n", "")


def test_library_noise_is_hidden_unless_verbose(monkeypatch):
    """Default: transformers logs errors only and draws no bars, hub bars off (also for
    subprocesses, through the environment); `msr --verbose` restores the libraries' defaults."""
    import logging

    from transformers.utils import logging as hf_logging

    from mllm_msr.cli.common import QUIET_ENV

    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    assert runner.invoke(app, ["config", "--yaml"]).exit_code == 0
    assert {k: os.environ.get(k) for k in QUIET_ENV} == QUIET_ENV
    assert hf_logging.get_verbosity() == logging.ERROR and not hf_logging.is_progress_bar_enabled()
    assert logging.getLogger("vllm").getEffectiveLevel() == logging.ERROR
    assert runner.invoke(app, ["--verbose", "config", "--yaml"]).exit_code == 0
    assert not any(k in os.environ for k in QUIET_ENV)
    assert hf_logging.get_verbosity() == logging.WARNING and hf_logging.is_progress_bar_enabled()


def test_run_prints_no_library_progress_bars_or_config_warnings(env, tiny_idefics3):
    """`msr run` in a fresh process: our own lines and results only (no 'Loading weights' bars,
    no transformers config warnings); `--verbose` shows the libraries' output again."""
    e = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    e["OMP_NUM_THREADS"] = "1"
    msr = [sys.executable, "-m", "mllm_msr.cli"]
    quiet = subprocess.run([*msr, "run", "--users", "1", *_sets(tiny_idefics3, env / "q")], env=e,
                           capture_output=True, text=True, timeout=500)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    out = quiet.stdout + quiet.stderr
    assert "MLLM-MSR on" in out and "Loading weights" not in out and "[transformers]" not in out
    loud = subprocess.run([*msr, "--verbose", "run", "--users", "1", *_sets(tiny_idefics3, env / "v")], env=e,
                          capture_output=True, text=True, timeout=500)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "Loading weights" in loud.stdout + loud.stderr


def test_run_record_refuses_smoke_runs_and_overrides(tmp_path):
    """`msr run --record` writes the committed main-job result: only the default job may write it."""
    for extra in (["--users", "2"], ["--set", "memory.block_size=4"]):
        res = runner.invoke(app, ["run", "--quiet", "--record", str(tmp_path / "run"), *extra])
        assert res.exit_code == 2, res.output
        assert "--record" in res.output
    assert not (tmp_path / "run").exists()
