"""The whole stage 2 on the configured dataset (:func:`run_benchmark`): pipeline summaries of the
train and valid users, SFT examples, zero-shot validation, LoRA SFT, validation with the adapter,
provenance. ``msr finetune sft benchmark`` runs it."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllm_msr.finetune.config import SFTConfig
from mllm_msr.finetune.examples import examples_from_sequences, examples_from_store, save_examples_jsonl
from mllm_msr.finetune.trainer import copy_adapter, train_sft
from mllm_msr.hashing import file_sha256

log = logging.getLogger(__name__)


def _histories(splits, users: Sequence[str], cases=None):
    """(user → history window used for the summaries, user → window + target)."""
    from mllm_msr.agents.user_memory import UserHistory

    hist, full = {}, {}
    if cases is None:
        pos = {ex.user_id: ex for ex in splits.train if ex.label == 1}  # latest positive per user
        for ex in splits.train:
            if ex.label == 1 and len(ex.history) >= len(pos[ex.user_id].history):
                pos[ex.user_id] = ex
        for u in users:
            if u in pos:
                ex = pos[u]
                hist[u] = UserHistory(u, tuple(ex.history), tuple(ex.history_timestamps))
                full[u] = (*ex.history, ex.item_id)
    else:
        for c in cases:
            hist[c.user_id] = UserHistory(c.user_id, tuple(c.history), tuple(c.history_timestamps))
            full[c.user_id] = (*c.history, c.target)
    return hist, full


def run_benchmark(config: str | Path | None = None, msr_overrides: Sequence[str] = (),
                  sft_cfg: SFTConfig | None = None, work_dir: str | Path = "runs/sft",
                  ship: str | Path | None = None, max_valid_users: int | None = 100,
                  resume: bool = False, max_train_users: int | None = 120,
                  command: str | None = None, zero_shot: bool = True) -> dict[str, Any]:
    """The whole stage 2 on the configured dataset (default: the bundled benchmark).

    1. item summaries + recurrent user summaries for the TRAIN and VALID users (the pipeline's own
       agents, cached in ``work_dir/store``); 2. SFT examples from the stored versions
       (:func:`examples_from_store`); 3. validation metrics zero-shot (no adapter) on the valid
       users with the test protocol (1 positive : ``protocol.valid_negatives`` negatives); 4. LoRA
       SFT, held-out AUC on the valid users' examples; 5. validation metrics with the adapter;
       6. PROVENANCE.json (training user ids included, for the leak guard) and a copy of the
       adapter in ``ship``. The test set is never read here: ``msr eval`` reads it once per shipped
       configuration. ``max_train_users`` / ``max_valid_users``: the documented subsets that fit a
       CPU budget (the first N of the split's order). ``zero_shot=False`` skips step 3 (the zero-shot
       validation row, which ``msr eval``'s zero-shot row also measures)."""
    from mllm_msr.config import load_config
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.evaluation.baselines import Popularity
    from mllm_msr.pipeline import build_services, load_data, run_cases

    t_all = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sft_cfg = (sft_cfg or SFTConfig()).model_copy(update={"output_dir": str(work / "adapter")})
    titles = sft_cfg.history == "titles"
    if titles:  # TALLRec-style: titles only, no summaries, no images
        sft_cfg = sft_cfg.model_copy(update={"use_images": False})
    base_ov = [f"store.path={work / 'store' / 'chroma'}", "recommender.adapter=null",
               *(["recommender.history=titles", "recommender.use_images=false"] if titles else [])]
    cfg = load_config(config, [*base_ov, *msr_overrides])
    ds = load_data(cfg)
    splits = build_splits(ds, cfg.protocol)
    catalog = ds.items
    services = build_services(cfg, ds)
    backend = services.recommender.backend
    from mllm_msr.models.factory import resolve_model_path

    model_dir = Path(resolve_model_path(cfg.scorer.model))  # training always runs in transformers
    timings: dict[str, float] = {}

    # 1. summaries for train + valid users
    train_users = list(splits.train_users)[: max_train_users or None]
    h_tr, f_tr = _histories(splits, train_users)
    valid_cases = splits.valid[: max_valid_users or None]
    h_va, f_va = _histories(splits, [c.user_id for c in valid_cases], valid_cases)
    hist = {**h_tr, **h_va}
    # negatives by training popularity: the Popularity row's counts (training sequences, never validation)
    popularity = Popularity().fit(splits).counts if sft_cfg.negatives == "popularity" else None
    if titles:  # 2'. examples straight from the sequences
        def titles_text(before: list[str]) -> str:
            return services.preference_text(before, None)

        train_ex = examples_from_sequences(f_tr, f_tr, catalog, titles_text, seed=cfg.seed, popularity=popularity)
        valid_ex = examples_from_sequences(f_va, f_va, catalog, titles_text, seed=cfg.seed, popularity=popularity)
    else:
        t0 = time.perf_counter()
        ids = list(dict.fromkeys(i for h in hist.values() for i in h.items))
        log.info("item summaries for %d items (train+valid histories)", len(ids))
        summaries = services.summarizer.summarize([catalog[i] for i in ids])
        timings["item_summaries_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        log.info("recurrent user summaries for %d users", len(hist))
        services.memory.update_many(list(hist.values()), catalog, summaries)
        timings["user_summaries_s"] = time.perf_counter() - t0

        # 2. examples: the preference text exactly as inference builds it (pipeline recipe)
        def context(summary: str, before: list[str]) -> str:
            return services.preference_text(before, summary, summaries)

        train_ex, valid_ex = (examples_from_store(services.store, f, f, catalog, seed=cfg.seed, context=context,
                                                  positions=sft_cfg.positions, popularity=popularity)
                              for f in (f_tr, f_va))
    save_examples_jsonl(train_ex, work / "train_examples.jsonl")
    save_examples_jsonl(valid_ex, work / "valid_examples.jsonl")
    log.info("SFT examples: %d train, %d valid", len(train_ex), len(valid_ex))

    # 3. zero-shot on the validation users, test protocol
    cases = valid_cases
    t0 = time.perf_counter()
    before = (run_cases(services, cases, work / "valid_zero_shot", show_progress=False) if zero_shot
              else {"skipped": "zero-shot validation not run (--no-zero-shot)"})
    timings["valid_zero_shot_s"] = time.perf_counter() - t0
    backend.close()
    if services.memory.llm is not backend:  # a separate generator (e.g. vLLM): free it before training
        services.memory.llm.close()
    del services, backend

    # 4. SFT
    train_metrics = train_sft(sft_cfg, train_ex, model_dir, valid_ex, resume_from_checkpoint=resume or None)
    timings["sft_s"] = train_metrics["wall_s"]

    # 5. validation users with the adapter
    name = sft_cfg.adapter_name
    cfg_after = load_config(config, [*base_ov, *msr_overrides, f"recommender.adapter={name}",
                                     f"scorer.adapters={{{name}: {sft_cfg.output_dir}}}"])
    services = build_services(cfg_after, ds)
    t0 = time.perf_counter()
    after = run_cases(services, cases, work / "valid_adapter", show_progress=False)
    timings["valid_adapter_s"] = time.perf_counter() - t0
    services.recommender.backend.close()
    timings["total_s"] = time.perf_counter() - t_all

    out = Path(sft_cfg.output_dir)
    prov = {
        "what": "LoRA adapter of the yes/no recommender (MLLM-MSR stage 2), answer-only loss",
        "command": command or "msr finetune sft benchmark ...",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "base_model": {"path": str(model_dir),
                       "build": json.loads((Path(model_dir) / "msr_build.json").read_text())
                       if (Path(model_dir) / "msr_build.json").exists() else None},
        "data": {"dataset": cfg.dataset, "synth": cfg.synth.model_dump() if cfg.dataset == "synth" else None,
                 "synth_config_hash": cfg.synth.config_hash() if cfg.dataset == "synth" else None,
                 "protocol": cfg.protocol.model_dump(), "splits": splits.summary(),
                 "sft_train_examples": len(train_ex), "sft_valid_examples": len(valid_ex),
                 "sft_train_users": len(f_tr), "valid_users_scored": len(cases),
                 "train_user_ids": sorted(f_tr), "valid_user_ids": sorted(f_va),
                 "dataset_fingerprint": ds.fingerprint()},
        "seed": sft_cfg.seed,
        "sft_config": json.loads(sft_cfg.model_dump_json()),
        "msr_config": json.loads(cfg_after.model_dump_json()),
        "training": {k: v for k, v in train_metrics.items()},
        "valid_zero_shot": {k: v for k, v in before.items() if k != "rows"},
        "valid_adapter": {k: v for k, v in after.items() if k != "rows"},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "adapter_sha256": file_sha256(out / "adapter_model.safetensors"),
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
    }
    (out / "PROVENANCE.json").write_text(json.dumps(prov, indent=1, default=str))
    if ship:
        copy_adapter(out, ship, extra=("sft_config.json", "train_log.json", "PROVENANCE.json"))
    return {"metrics": {"zero_shot": before.get("metrics"), "adapter": after["metrics"],
                        "valid": train_metrics.get("eval"), "timings_s": prov["timings_s"]},
            "provenance": str(out / "PROVENANCE.json")}

