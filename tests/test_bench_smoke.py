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
# The default generator is vLLM in process; the smoke runs use transformers (vLLM start-up would
# dominate them; the vLLM paths run in the slow tests and the real benches).
SHORT = ["--set", "items.image_tokens=4", "--set", "items.text_tokens=4", "--set", "items.fuse_tokens=4",
         "--set", "memory.max_new_tokens=4", "--set", "synth.n_users=10", "--set", "synth.n_items=40",
         "--set", "generator.backend=transformers"]


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
    row = bench("bench_cache", ["--n-users", "10", "--n-items", "40", "--repeats", "1", *SHORT[:8], *SHORT[-2:]],
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


def test_bench_scoring(env, tmp_path):
    row = bench("bench_scoring", ["--users", "2", "--naive-users", "1", "--candidates", "4", "--no-vllm"], env,
                tmp_path / "r.json")
    v = row["variants"]
    assert set(v) == {"hf_naive", "hf_shared", "hf_shared_bf16"}
    assert v["hf_naive"]["max_abs_dp"] < 1e-4 and v["hf_naive"]["same_ranking"] == 1.0  # prefix sharing is exact
    assert row["ratio"] == pytest.approx(v["hf_naive"]["median_s"] / v[row["fastest_fp32"]]["median_s"], rel=0.02)
    assert v["hf_shared_bf16"]["keeps_results"] == (v["hf_shared_bf16"]["max_abs_dp"] <= 0.01
                                                   and v["hf_shared_bf16"]["same_top5"] >= 0.99)
    assert len(row["load_avg"]) == 3


def test_bench_pipeline(env, tmp_path):
    row = bench("bench_pipeline", ["--users", "2", *SHORT, "--set", "synth.n_users=20"], env, tmp_path / "r.json",
                timeout=600)  # 20 users: 2 test users at 80/10/10
    b, o = row["baseline"], row["ours"]
    assert row["users"] == 2 and b["metrics"]["n_cases"] == o["metrics"]["n_cases"] == 2
    assert b["model_calls"]["scored_pairs"] == o["model_calls"]["scored_pairs"] == 2 * 21
    for stage in ("items", "users", "scoring", "total"):
        t = f"{stage}_s"
        assert row["ratios"][stage] == pytest.approx(b["timings_s"][t] / o["timings_s"][t], rel=0.05)
    d = row["differences"]
    assert 0 <= d["identical_item_summaries"] <= 1 and 0 <= d["identical_user_summaries"] <= 1
    if d["identical_user_summaries"] == 1.0:  # same preference texts: same scores up to float rounding
        assert d["max_abs_dp_same_summary"] < 1e-4


def test_bench_interactive(env, tmp_path):
    row = bench("bench_interactive", SHORT, env, tmp_path / "r.json", timeout=600)
    assert row["progress_shown"]
    for k in ("chat_fresh_s", "chat_next_s", "chat_cached_s", "recommend_fresh_s", "recommend_cached_s"):
        assert row[k] > 0
    assert row["ratio"] == pytest.approx(max(row["chat_fresh_s"], row["recommend_fresh_s"]) / row["fresh_target_s"],
                                         abs=1e-3)


def test_bench_feedback(env, tmp_path):
    row = bench("bench_feedback", ["--messages", "6", "--users", "2", *SHORT[:8]], env, tmp_path / "r.json")
    assert row["n_messages"] == 6 and 0.0 <= row["kept"] <= 1.0
    assert row["ratio"] == pytest.approx(row["kept"] / 0.8, abs=1e-3)
    assert (tmp_path / row["rows_file"]).is_file()
