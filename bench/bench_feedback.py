"""Feedback that is kept: scripted chat messages ("more like the blue ones, nothing with stripes")
folded into validation users' preference summaries, as `msr chat` folds them, then the same
candidates ranked again (mllm_msr/evaluation/feedback.py has the definitions).

    python bench/bench_feedback.py                     # the embedded model, 50 messages over 10 validation users
    python bench/bench_feedback.py --store runs/store/chroma   # reuse the summaries `msr run` cached
    python bench/bench_feedback.py --model tiny --set synth.n_users=20 --set synth.n_items=40 --messages 6 --users 2

Services are built as the one-user commands build them (``interactive_config``: each role on its
``interactive_backend``). For each message: the user's current summary (the memory's latest version
for the validation case's history), the case's 21 candidates scored, the message folded in by
``UserMemory.fold_feedback``, the candidates scored again. Item summaries and history versions go
to the services' store (a fresh one in the temporary folder, or ``--store``: the same cache entries a
pipeline run writes); the feedback versions go to a scratch store in the temporary folder only, so
no later chat starts from them.

Measured: ``kept`` (every request of the message in the new summary: the ask named outside a negated
phrase, the ban absent or only negated), ``kept_ask``, ``dropped_ban``, the same on the unchanged
summary (``before``, the control), and the mean rank change (positive = up) of the candidates that
match the ask, carry the ban, or neither. Targets: kept ≥ 0.8; ask items up (> 0), banned items
down (< 0). Results: ``bench/results/bench_feedback.json`` (the real run only: ≥ 50 messages, not
``--model tiny``) and the per-message rows next to it (``bench_feedback.rows.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import bench_setup, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
MIN_MESSAGES = 50


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded | tiny | an HF folder")
    ap.add_argument("--messages", type=int, default=MIN_MESSAGES, help="scripted feedback messages")
    ap.add_argument("--users", type=int, default=10, help="validation users the messages go round (each "
                    "user's candidates are scored once before, then once per message)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the users' sample and of the script")
    ap.add_argument("--store", type=Path, default=None, help="the services' summary store (default: a fresh "
                    "one in the temporary folder); feedback versions never go there")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="msr --set key=value (repeatable)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"result file (default: {RESULTS / 'bench_feedback.json'} for a real run, the "
                    "temporary folder otherwise)")
    args = ap.parse_args(argv)

    from mllm_msr.evaluation.feedback import KEPT_TARGET, evaluate_feedback
    from mllm_msr.graphs.prepare import interactive_config
    from mllm_msr.pipeline import build_services, finalize_config
    from mllm_msr.stores.summaries import StoreConfig, SummaryStore

    real = args.model != "tiny" and args.messages >= MIN_MESSAGES
    if not real and args.out is not None and args.out.resolve().parent == RESULTS:
        raise SystemExit(f"a smoke run (--model tiny or < {MIN_MESSAGES} messages) never writes into {RESULTS}")
    work, sets, cfg, ds = bench_setup(args.model, args.sets, "bench-feedback-")
    out = args.out or (RESULTS / "bench_feedback.json" if real else work / "bench_feedback.json")
    store = args.store or work / "chroma"
    cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(store)})})
    s = build_services(interactive_config(finalize_config(cfg)), ds)
    scratch = SummaryStore(StoreConfig(path=str(work / "feedback-chroma")), embedding=s.store.embedding)
    print(f"dataset {ds.name} ({len(ds.items)} items); {args.messages} messages over {args.users} validation "
          f"users; store {store}; feedback versions -> {work / 'feedback-chroma'}", flush=True)

    def advance(n: int, total: int) -> None:
        if n % 10 == 0 or n == total:
            print(f"  {n}/{total} messages ({time.perf_counter() - t0:.0f} s)", flush=True)

    t0 = time.perf_counter()
    report, rows = evaluate_feedback(s, scratch, args.messages, args.users, args.seed, advance=advance)
    wall = round(time.perf_counter() - t0, 1)
    rows_file = out.with_name(out.stem + ".rows.jsonl")
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, b = report["rank_change"], report["before"]
    print(f"kept {report['kept']} (target >= {KEPT_TARGET}: {'met' if report['kept_met'] else 'NOT met'}); "
          f"kept_ask {report['kept_ask']}, dropped_ban {report['dropped_ban']}, both {report['kept_both']}; "
          f"unchanged summary: kept {b['kept']}, kept_ask {b['kept_ask']}, dropped_ban {b['dropped_ban']}")
    if report.get("model_words"):
        mw = report["model_words"]
        print(f"the model's own words (the user's verbatim message removed): kept {mw['kept']}, "
              f"kept_ask {mw['kept_ask']}, dropped_ban {mw['dropped_ban']}")
    print(f"mean rank change (+ = up): ask {rc['ask']}, ban {rc['ban']}, both {rc['both']}, other {rc['other']} "
          f"(n {report['n_ranked']})")
    ratio = round(report["kept"] / KEPT_TARGET, 3) if report["kept"] is not None else None
    print(f"ratio kept / target: {ratio}; {wall} s; rows -> {rows_file}")
    write_result(out, {"bench": "feedback", "model": args.model, "sets": args.sets, "messages": args.messages,
                       "users": args.users, "seed": args.seed, **report, "ratio": ratio,
                       "targets": {"kept": f">= {KEPT_TARGET}", "rank_change.ask": "> 0", "rank_change.ban": "< 0"},
                       "met": report["kept_met"], "wall_s": wall,
                       "model_calls": {"item_summaries": s.summarizer.model_calls,
                                       "user_memory": s.memory.model_calls, "feedback": len(rows),
                                       "scoring": s.recommender.model_calls},
                       "rows_file": rows_file.name})
    return 0


if __name__ == "__main__":
    sys.exit(main())
