"""The whole method end to end: an authors'-style pipeline vs our default pipeline, on the same
test users, side by side in one run, per stage (items, memory, scoring) and in total.

    python bench/bench_pipeline.py                   # 50 test users of the bundled benchmark
    python bench/bench_pipeline.py --users 2         # quick
    python bench/bench_pipeline.py --model tiny --users 1 --set synth.n_users=20 --out /tmp/p.json  # smoke

* **baseline** (as the authors' public code runs it): transformers ``generate`` in batches of 8 for
  the item summaries, one user at a time through the recurrent memory (each block a batch of 1),
  one full forward pass per candidate (batch 1, no prefix sharing), no caching (fresh store);
* **ours**: the default config as ``msr run`` builds it (``pipeline.build_services`` +
  ``run_cases``: vLLM generator, all users' block b in one batch, prefix-shared scoring), with its
  own fresh store.

Both read the same dataset, split, test users, prompts, model weights and the shipped LoRA
adapter. Target: **≥ 5× in total**. Metrics are compared; generation differences (greedy outputs
of two engines, e.g. float rounding in batched kernels) are reported as the share of identical
item / user summaries. Results: ``bench/results/bench_pipeline.json``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import bench_setup, machine, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 5.0


def baseline(cfg, ds, cases, work: Path) -> tuple[list[list[float]], dict, object]:
    """Authors'-style: batch-8 generate, one user at a time, one forward per candidate, no cache."""
    from mllm_msr.agents.user_memory import UserHistory
    from mllm_msr.models.factory import resolve_model_path
    from mllm_msr.models.hf_backend import TransformersBackend
    from mllm_msr.pipeline import adapter_folder, build_services, finalize_config
    from mllm_msr.stores.summaries import SummaryStore

    cfg = finalize_config(cfg.model_copy(update={
        "store": cfg.store.model_copy(update={"path": str(work / "chroma")}),
        "items": cfg.items.model_copy(update={"batch_size": 8})}))
    path = resolve_model_path(cfg.generator.model)
    gen = TransformersBackend(path, dtype="float32", batch_size=8, prefix_sharing=False,
                              max_length=cfg.generator.max_model_len)
    folder = adapter_folder(cfg)
    sc = TransformersBackend(path, {cfg.recommender.adapter: folder} if folder else None, dtype="float32",
                             batch_size=1, prefix_sharing=False, max_length=cfg.scorer.max_model_len)
    s = build_services(cfg, ds, generator=gen, scorer=sc, store=SummaryStore(cfg.store))
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    ids = list(dict.fromkeys(i for c in cases for i in (*c.history, *c.candidates)))
    summaries = s.summarizer.summarize(s.items(ids, "cases"))
    t["items_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    latest = {}
    for c in cases:  # one user at a time, each block waits for the previous one
        latest.update(s.memory.update_many([UserHistory(c.user_id, tuple(c.history), tuple(c.history_timestamps))],
                                           s.catalog, summaries))
    t["users_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    scores = []
    for c in cases:
        v = latest.get(c.user_id)
        text = s.preference_text(c.history, v.summary if v else None, summaries)
        scores.append(s.recommender.score(text, s.items(c.candidates, "candidates")))  # batch 1: 1 forward each
    t["scoring_s"] = time.perf_counter() - t2
    t["total_s"] = time.perf_counter() - t0
    out = {"timings_s": {k: round(v, 2) for k, v in t.items()},
           "item_summaries": {i: summaries[i].summary for i in ids},
           "user_summaries": {u: v.summary for u, v in latest.items()},
           "model_calls": {"item_summaries": s.summarizer.model_calls, "user_summaries": s.memory.model_calls,
                           "scored_pairs": s.recommender.model_calls},
           "backends": {"generator": "transformers batch 8", "scorer": "transformers batch 1, no prefix sharing"}}
    gen.close()
    sc.close()
    return scores, out, s


def ours(cfg, ds, cases, work: Path) -> tuple[list[list[float]], dict, object]:
    from mllm_msr.pipeline import build_services, run_cases

    cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(work / "chroma")})})
    s = build_services(cfg, ds)
    t0 = time.perf_counter()
    res = run_cases(s, cases, work / "run", show_progress=False)
    total = time.perf_counter() - t0
    rows = res["rows"]
    ids = list(dict.fromkeys(i for c in cases for i in (*c.history, *c.candidates)))
    sums = s.summarizer.summarize(s.items(ids, "cases"))  # all cached now: no model call
    users = {u: v[-1].summary for u in (c.user_id for c in cases) if (v := s.store.user_history(u))}
    out = {"timings_s": {**{k: v for k, v in res["timings_s"].items() if k != "total_s"}, "total_s": round(total, 2)},
           "item_summaries": {i: sums[i].summary for i in ids}, "user_summaries": users,
           "model_calls": res["model_calls"],
           "backends": {"generator": f"{s.cfg.generator.backend} {s.cfg.generator.dtype}",
                        "scorer": f"{s.cfg.scorer.backend} {s.cfg.scorer.dtype}"}}
    for b in {id(s.summarizer.llm): s.summarizer.llm, id(s.recommender.backend): s.recommender.backend}.values():
        b.close()
    return [r["scores"] for r in rows], out, s


def same_share(a: dict[str, str], b: dict[str, str]) -> float:
    keys = set(a) & set(b)
    return round(sum(a[k] == b[k] for k in keys) / max(len(keys), 1), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded | tiny | an HF folder")
    ap.add_argument("--users", type=int, default=50, help="test users (the first N of the split)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="msr --set key=value (repeatable)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_pipeline.json")
    args = ap.parse_args(argv)

    from mllm_msr.data.protocol import build_splits
    from mllm_msr.metrics import evaluate

    work, sets, cfg, ds = bench_setup(args.model, args.sets, "bench-pipeline-")
    cases = build_splits(ds, cfg.protocol).test[: args.users]
    print(f"{len(cases)} test users of {ds.name} ({len(ds.items)} items); default generator "
          f"{cfg.generator.backend}, scorer {cfg.scorer.backend}", flush=True)
    sides = {}
    for name, fn in (("baseline", baseline), ("ours", ours)):
        before = machine()["load_avg"]
        scores, out, _ = fn(cfg, ds, cases, work / name)
        gc.collect()
        out["metrics"] = evaluate(cases, scores)
        out["load_avg_before_after"] = [before, machine()["load_avg"]]
        out["scores"] = scores
        sides[name] = out
        print(f"{name:8s} {out['timings_s']}  metrics {out['metrics']}  ({out['backends']})", flush=True)
    b, o = sides["baseline"], sides["ours"]
    ratios = {k.removesuffix("_s"): round(b["timings_s"][k] / max(o["timings_s"][k], 1e-9), 2)
              for k in ("items_s", "users_s", "scoring_s", "total_s")}
    diff = {"identical_item_summaries": same_share(b["item_summaries"], o["item_summaries"]),
            "identical_user_summaries": same_share(b["user_summaries"], o["user_summaries"]),
            "metric_deltas": {k: round(o["metrics"][k] - b["metrics"][k], 4) for k in b["metrics"]
                              if isinstance(b["metrics"][k], (int, float))}}
    same_text = [k for k, c in enumerate(cases)
                 if b["user_summaries"].get(c.user_id) == o["user_summaries"].get(c.user_id)]
    if same_text:
        dp = max(abs(x - y) for k in same_text for x, y in zip(b["scores"][k], o["scores"][k], strict=True))
        diff["max_abs_dp_same_summary"] = float(f"{dp:.3g}")
    met = ratios["total"] >= TARGET
    print("ratio baseline/ours: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"total ratio {ratios['total']:.2f}x (target >= {TARGET:g}x): {'MET' if met else 'NOT MET'}")
    print(f"generation differences: {diff}")
    for side in sides.values():
        side.pop("item_summaries")
        side.pop("user_summaries")
        side.pop("scores")
    write_result(args.out, {"bench": "pipeline", "model": args.model, "users": len(cases), "sets": args.sets,
                            "baseline": b, "ours": o, "ratios": ratios, "ratio": ratios["total"],
                            "target": TARGET, "met": ratios["total"] >= TARGET, "differences": diff})
    return 0


if __name__ == "__main__":
    sys.exit(main())
