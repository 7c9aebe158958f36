"""Smoke tests of the benchmark scripts: each runs with the tiny random model and tiny sizes, prints
a ratio and writes its JSON line. Absolute times are never asserted (the machine is shared)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# Tiny generation lengths keep `msr run` on the tiny model to a few seconds.
SHORT = ["--set", "items.image_tokens=4", "--set", "items.text_tokens=4", "--set", "items.fuse_tokens=4",
         "--set", "memory.max_new_tokens=4", "--set", "synth.n_users=10", "--set", "synth.n_items=40"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("msr-home")
    return {**os.environ, "MSR_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def bench(name: str, args: list[str], env: dict, out: Path, timeout: int = 300) -> dict:
    p = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--model", "tiny",
                        "--out", str(out), *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ratio" in p.stdout, p.stdout[-3000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert "ratio" in row
    return row


def test_bench_summarize_transformers(env, tmp_path):
    row = bench("bench_summarize", ["--items", "3", "--max-new-tokens", "4", "--repeats", "1",
                                    "--no-vllm"], env, tmp_path / "r.json")
    assert set(row["transformers"]) == {"batch1", "batch3"}
    tr = row["transformers"]  # the ratio is the batched variant's throughput over batch size 1
    assert row["ratios"]["transformers"] == pytest.approx(tr["batch3"]["tok_s"] / tr["batch1"]["tok_s"], abs=0.01)


@pytest.mark.slow
def test_bench_summarize_vllm(env, tmp_path):
    row = bench("bench_summarize", ["--items", "4", "--max-new-tokens", "4", "--repeats", "1"],
                env, tmp_path / "r.json", timeout=600)
    assert {"transformers", "vllm", "vllm_server"} <= set(row["ratios"])


def test_bench_cache(env, tmp_path):
    row = bench("bench_cache", ["--n-users", "10", "--n-items", "40", "--repeats", "1", *SHORT[:8]],
                env, tmp_path / "r.json")
    assert row["second_zero_calls"] and row["identical_metrics"]
    assert row["second_model_calls"]["item_summaries"] == 0
    assert row["first_model_calls"]["item_summaries"] > 0


def test_bench_incremental(env, tmp_path):
    row = bench("bench_incremental", ["--sizes", "3", "9", "--max-new-tokens", "2"], env,
                tmp_path / "r.json")
    assert row["flat"] and row["linear"]
    assert [r["incremental_calls"] for r in row["rows"]] == [1, 1]
    assert [r["scratch_calls"] for r in row["rows"]] == [2, 4]


def test_bench_flops(env, tmp_path):
    row = bench("bench_flops", ["--candidates", "3", "--repeats", "1", "--matmul-n", "128"], env,
                tmp_path / "r.json")
    count = row["count"]
    assert count["rows"] == 3 and count["total_flops"] == pytest.approx(sum(count["flops"].values()))
    assert count["tokens"] <= count["padded_tokens"]
    assert row["ratio"] == pytest.approx(row["achieved_gflops"] / row["peak_gflops"], rel=0.02)


def test_bench_memory(env, tmp_path):
    row = bench("bench_memory", ["--users", "1", *SHORT], env, tmp_path / "r.json")
    assert row["processes"] >= 1 and row["peak_rss_gb"] >= 0.1  # the sampler saw `msr run` (torch alone > 100 MB)
    assert row["ratio"] == pytest.approx(row["peak_rss_gb"] / row["target_gb"], abs=1e-3)
    assert row["model_calls"]["scored_pairs"] == 21 * row["users"]
