"""Faults mid-run (issue #16): each ends with a clear error or a resumed run, and nothing lost.

- the Chroma folder is read-only / the disk is full: a :class:`StoreError` names the folder and
  every summary stored before is still there (a real read-only bind mount and a real full tmpfs,
  made in a private user + mount namespace with ``unshare -rm``, so no root and no host mount);
- SIGKILL during ``msr finetune sft train``: ``--resume`` continues from the last checkpoint and
  the adapter's validation AUC matches an uninterrupted run's within a stated tolerance.

(The managed vLLM server killed mid-run is in test_endpoints.py; SIGKILL at 20 random points of
``msr run`` is bench/bench_kill_resume.py, with its result in bench/results/kill_resume.json.)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS)}


# ---- store: read-only folder, full disk ---------------------------------------------------------
def _items(start: int, n: int, pad: int = 0):
    from mllm_msr.stores.summaries import ItemSummary

    return [ItemSummary(f"i{k}", f"key{k}", f"summary of item {k} " + "x" * pad, f"image {k}", f"text {k}")
            for k in range(start, start + n)]


def store_phase(folder: str, phase: str) -> None:
    """One step of a store scenario, run in a child process; prints a JSON line."""
    from mllm_msr.stores.summaries import StoreConfig, StoreError, SummaryStore

    out: dict = {"phase": phase}
    if phase == "free_then_write":  # space freed: the same folder accepts the batch again
        (Path(folder) / "filler").unlink()
    try:
        store = SummaryStore(StoreConfig(path=folder))
        if phase == "write":
            store.put_items(_items(0, 10))
        elif phase == "fill_then_write":  # the disk fills up, then a batch is written
            with open(Path(folder) / "filler", "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
            store.put_items(_items(100, 50, pad=4000))
        elif phase == "free_then_write":
            store.put_items(_items(100, 50, pad=4000))
        got = store.get_items([f"key{k}" for k in range(10)])
        out["first_ten"] = {k: v.summary for k, v in got.items()}
        out["count"] = store.items.count()
    except StoreError as e:
        out["error"] = str(e)
    print(json.dumps(out))


def _in_namespace(script: str) -> list[dict]:
    """Run ``script`` (bash) as root of a private user + mount namespace; JSON lines it printed."""
    assert shutil.which("unshare"), "util-linux unshare is needed for the mount-fault tests"
    res = subprocess.run(["unshare", "-rm", "bash", "-euc", script], env=ENV, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _phase(folder: Path, phase: str) -> str:
    return f"{sys.executable} -c 'import test_faults as t; t.store_phase(\"{folder}\", \"{phase}\")'"


@pytest.mark.slow
def test_read_only_store_folder_is_a_clear_error_and_keeps_what_was_stored(tmp_path):
    folder = tmp_path / "chroma"
    folder.mkdir()
    write, reopen, check = _in_namespace(f"""
        mount --bind {folder} {folder}
        {_phase(folder, "write")}
        mount -o remount,bind,ro {folder}
        {_phase(folder, "reopen")}
        mount -o remount,bind,rw {folder}
        {_phase(folder, "check")}
    """)
    assert write["count"] == 10 and "error" not in write
    assert str(folder) in reopen["error"] and "read-only" in reopen["error"], reopen
    assert check["count"] == 10 and check["first_ten"] == write["first_ten"]


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_keeps_what_was_stored(tmp_path):
    folder = tmp_path / "chroma"
    folder.mkdir()
    write, full, freed = _in_namespace(f"""
        mount -t tmpfs -o size=6m tmpfs {folder}
        {_phase(folder, "write")}
        {_phase(folder, "fill_then_write")}
        {_phase(folder, "free_then_write")}
    """)
    assert write["count"] == 10 and "error" not in write
    assert str(folder) in full["error"] and "disk is full" in full["error"], full
    assert freed["count"] == 60 and freed["first_ten"] == write["first_ten"]  # nothing lost, usable again


# ---- SIGKILL during `msr finetune sft train` --------------------------------------------------------
# Stated tolerance on the validation AUC of the resumed adapter vs the uninterrupted one. The
# Trainer checkpoint holds the LoRA weights, AdamW state, scheduler, data-order and RNG states, so
# a resumed run replays the same steps: measured |dAUC| = 0 (tiny model, 64 held-out examples,
# kill after checkpoint 20 of 40) and the adapters' weights agree to float rounding; 0.02 leaves
# room for a different BLAS reduction order only.
SFT_AUC_TOLERANCE = 0.02
SFT_ARGS = {"max_steps": 40, "save_steps": 10, "save_total_limit": 5, "logging_steps": 5, "batch_size": 8,
            "learning_rate": 3e-3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "warmup_ratio": 0.05,
            "save_dtype": "float32", "threads": 1, "bf16": False}


def _sft_jsonl(path: Path, n: int, seed: int) -> Path:
    """Examples whose answer is readable from the title ("yes" iff a warm colour), 1:1 yes/no."""
    import random

    rng = random.Random(seed)
    warm, cold = ["red", "orange", "yellow"], ["blue", "green", "purple"]
    with open(path, "w") as fh:
        for k in range(n):
            colour = rng.choice(warm if k % 2 == 0 else cold)
            fh.write(json.dumps({"user_summary": f"The user likes {rng.choice(warm + cold)} things.",
                                 "item_id": f"{seed}-{k}", "title": f"A {colour} {rng.choice(['film', 'book'])}",
                                 "label": "yes" if colour in warm else "no"}) + "\n")
    return path


def _sft_cmd(model: Path, data: Path, valid: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for k, v in {**SFT_ARGS, "output_dir": out}.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "mllm_msr.cli", "finetune", "sft", "train", "--data", str(data),
            "--eval-data", str(valid), "--model-dir", str(model), *sets, *extra]


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_during_sft_then_resume_matches_uninterrupted_run(tmp_path):
    from mllm_msr.models.embedded import build_tiny_idefics3

    model = build_tiny_idefics3(tmp_path / "model")
    data, valid = _sft_jsonl(tmp_path / "train.jsonl", 320, 0), _sft_jsonl(tmp_path / "valid.jsonl", 64, 1)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_sft_cmd(model, data, valid, ref_dir), env=ENV, check=True, capture_output=True)
    ref = json.loads((ref_dir / "metrics.json").read_text())

    proc = subprocess.Popen(_sft_cmd(model, data, valid, run_dir), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done_20 = run_dir / "checkpoints" / "checkpoint-20" / "trainer_state.json"
    deadline = time.time() + 400
    while not done_20.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done_20.exists(), "training never reached checkpoint 20"
    assert not (run_dir / "metrics.json").exists(), "the kill came after training finished"
    kept = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))

    res = subprocess.run(_sft_cmd(model, data, valid, run_dir, "--resume"), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["resumed_from"].endswith(f"checkpoint-{kept[-1]}") and kept[-1] >= 20
    assert got["global_step"] == ref["global_step"] == 40
    steps = [r["step"] for r in json.loads((run_dir / "train_log.json").read_text()) if "loss" in r]
    assert steps == list(range(5, 41, 5))  # the loss log continues where the checkpoint left it
    print(f"valid AUC uninterrupted {ref['eval']['auc']:.4f}, killed+resumed {got['eval']['auc']:.4f}")
    assert ref["eval"]["auc"] > 0.6  # the adapter learned something, so the comparison means something
    assert abs(got["eval"]["auc"] - ref["eval"]["auc"]) <= SFT_AUC_TOLERANCE
    a, b = _adapter_weights(ref_dir), _adapter_weights(run_dir)
    assert a.keys() == b.keys()
    print("max |dW|", max(float((a[k] - b[k]).abs().max()) for k in a))
