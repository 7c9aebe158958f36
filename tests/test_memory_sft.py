"""Expert iteration of the user memory (``msr finetune memory``): the data-computed reward, the
continuation-only labels, the memory adapter's wiring through the config, and a whole tiny run
that resumes from its samples."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import SMALL_SYNTH


def test_retrieval_reward_prefers_the_text_naming_the_next_items_words():
    from mllm_msr.finetune.memory import RetrievalReward

    items = {"a": "A sci-fi film. The cover is a green striped ring.",
             "b": "A romance novel. The cover is a blue dotted square.",
             "c": "A horror film. The cover is a red plain star.",
             "d": "A comedy show. The cover is a yellow checked cross."}
    r = RetrievalReward(items)
    good, bad, empty = r.auc(["green striped sci-fi", "blue dotted romance", "nothing here"], ["a"], ["b", "c", "d"])
    assert good == 1.0
    assert bad == pytest.approx(1 / 3)  # "b" outranks the positive; "c", "d" tie with it (half each)
    assert empty == 0.5  # no shared word: every negative ties


def test_continuation_rows_label_only_what_follows_the_prefill(tiny_idefics3):
    from mllm_msr.finetune.memory import continuation_rows
    from mllm_msr.models.base import ChatRequest
    from mllm_msr.models.hf_backend import TransformersBackend

    be = TransformersBackend(tiny_idefics3)
    req = ChatRequest.user("Summarise: green ring, sci-fi", prefill="The user likes: a")
    (row,) = continuation_rows(be, [(req, "The user likes: a green ring")])
    labelled = row["input_ids"][row["labels"] != -100].tolist()
    text = be.tokenizer.decode(labelled)
    assert "green ring" in text and text.endswith(be.tokenizer.eos_token)
    assert "Summarise" not in text and "likes" not in text
    with pytest.raises(ValueError, match="prefill"):
        continuation_rows(be, [(req, "Something else entirely")])


def test_memory_adapter_resolution(tmp_path):
    from mllm_msr.config import load_config
    from mllm_msr.pipeline import SHIPPED_MEMORY_ADAPTER, finalize_config, memory_adapter_folder

    shipped = (SHIPPED_MEMORY_ADAPTER / "adapter_config.json").exists()
    auto = finalize_config(load_config(None, []))
    assert auto.memory.adapter == ("memory" if shipped else None)
    assert memory_adapter_folder(auto) == (str(SHIPPED_MEMORY_ADAPTER) if shipped else None)
    assert finalize_config(load_config(None, ["memory.adapter=null"])).memory.adapter is None
    mine = finalize_config(load_config(None, [f"generator.adapters={{mem2: {tmp_path}}}", "memory.adapter=mem2"]))
    assert mine.memory.adapter == "mem2" and memory_adapter_folder(mine) == str(tmp_path)
    missing = finalize_config(load_config(None, ["memory.adapter=nope"]))
    assert missing.memory.adapter is None  # not configured: the base model, with a warning
    assert finalize_config(mine) == mine  # idempotent


def test_memory_versions_are_keyed_by_the_adapter(tmp_path, synth_dataset):
    from mllm_msr.agents.user_memory import MemoryConfig, UserHistory, UserMemory
    from mllm_msr.models.base import ModelBackend
    from mllm_msr.stores.summaries import ItemSummary, StoreConfig, SummaryStore

    class Echo(ModelBackend):
        model_id = "echo"
        supports_images = False

        def __init__(self):
            self.adapters: list = []

        def generate(self, requests, *, max_new_tokens=96, temperature=0.0):
            self.adapters += [r.adapter for r in requests]
            return [r.completed(f" {r.adapter}") for r in requests]

        def score_yes_no(self, requests):
            return [0.5] * len(requests)

    store = SummaryStore(StoreConfig(path=str(tmp_path / "chroma")))
    items = list(synth_dataset.items)[:6]
    sums = {i: ItemSummary(i, f"k{i}", f"summary {i}", "", "") for i in items}
    h = [UserHistory("u1", tuple(items), tuple(range(6)))]
    llm = Echo()
    base = UserMemory(llm, store, MemoryConfig(adapter=None)).update_many(h, synth_dataset.items, sums)
    auto = UserMemory(llm, store, MemoryConfig()).update_many(h, synth_dataset.items, sums)  # unresolved = base
    assert auto["u1"].key == base["u1"].key and llm.adapters == [None, None]
    a1 = UserMemory(llm, store, MemoryConfig(adapter="m"), "sha1").update_many(h, synth_dataset.items, sums)
    a2 = UserMemory(llm, store, MemoryConfig(adapter="m"), "sha2").update_many(h, synth_dataset.items, sums)
    assert len({base["u1"].key, a1["u1"].key, a2["u1"].key}) == 3  # new weights: new versions
    assert llm.adapters[2:] == ["m"] * 4 and a1["u1"].summary.endswith("m")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_memory_expert_iteration_end_to_end_and_resume(tiny_idefics3, tmp_path):
    """A whole tiny run through the CLI; a second run reuses every stored sample."""
    work = tmp_path / "mem"
    msr = [f"synth.{k}={v}" for k, v in SMALL_SYNTH.model_dump().items() if k in ("n_users", "n_items", "seed",
                                                                                  "image_size")]
    msr += ["generator.backend=transformers", f"generator.model={tiny_idefics3}", f"scorer.model={tiny_idefics3}",
            "memory.max_new_tokens=10", "items.image_tokens=6", "items.text_tokens=6", "items.fuse_tokens=6"]
    cmd = [sys.executable, "-m", "mllm_msr.cli", "finetune", "memory", "--work-dir", str(work),
           *[a for s in msr for a in ("--msr-set", s)],
           "--set", "max_train_users=4", "--set", "samples=3", "--set", "min_reward=0", "--set", "max_valid_users=3",
           "--set", "lora.max_steps=2", "--set", "lora.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=800)
    prov_file = work / "adapter" / "PROVENANCE.json"
    if first.returncode != 0 and "no sampled update beat the greedy one" in first.stderr:
        pytest.fail("no sample beat greedy on the tiny model: " + first.stderr[-500:])
    assert first.returncode == 0, first.stderr[-2000:]
    prov = json.loads(prov_file.read_text())
    sel = prov["selection"]
    assert 0 < sel["kept"] <= sel["prompts"]
    assert sel["kept_reward"] > sel["greedy_reward"] - 1e-9
    kept = [json.loads(x) for x in (work / "selection.jsonl").read_text().splitlines()]
    assert all(r["best_reward"] > r["greedy_reward"] for r in kept if r["kept"])
    assert len(prov["data"]["train_user_ids"]) == 4 and prov["command"].startswith("msr finetune memory")
    assert set(prov["valid"]) == {"base", "adapter"} and prov["valid"]["adapter"]["users"] == 3
    assert (work / "adapter" / "adapter_model.safetensors").is_file()
    lines = (work / "samples.jsonl").read_text().splitlines()
    assert len(lines) == sel["prompts"]
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=800)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (work / "samples.jsonl").read_text().splitlines() == lines  # nothing sampled twice
    assert f"{sel['prompts']} prompts" in second.stderr and "0 to sample" in second.stderr


def test_leak_guard_checks_the_memory_adapter_too(tmp_path, synth_dataset):
    from mllm_msr.config import load_config
    from mllm_msr.pipeline import adapter_leak, finalize_config

    folder = tmp_path / "memory_adapter"
    folder.mkdir()
    users = list(synth_dataset.users)
    (folder / "PROVENANCE.json").write_text(json.dumps({"data": {
        "train_user_ids": users[:3], "dataset_fingerprint": synth_dataset.fingerprint()}}))
    cfg = finalize_config(load_config(None, [f"generator.adapters={{memory: {folder}}}", "memory.adapter=memory",
                                             "recommender.adapter=null"]))
    why = adapter_leak(cfg, synth_dataset, [users[1], users[10]])
    assert why is not None and "memory adapter 'memory'" in why and users[1] in why
    assert adapter_leak(cfg, synth_dataset, users[5:]) is None
