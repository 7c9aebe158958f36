"""Batch runner: the whole protocol over many users, stage by stage.

The graph handles one user per thread; for a dataset it is faster to run each stage for all users
at once, so local backends get full batches: every needed item summary (batched, cached), then the
memory step b of every user as one batch, then each user's candidates in one prefix-shared scoring
call. The stages call the same agents the graph nodes call. Scores are appended to
``scores.jsonl`` per user, so a killed run resumes where it stopped and recomputes nothing stored.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

from rich.progress import Progress

from mllm_msr.agents.user_memory import UserHistory
from mllm_msr.data.protocol import EvalCase
from mllm_msr.evaluation.metrics import evaluate
from mllm_msr.graphs.nodes import Services
from mllm_msr.paths import adapter_sha256
from mllm_msr.stores.summaries import digest


def adapter_fingerprint(backend, name: str | None) -> str | None:
    """Content hash of the named LoRA adapter, so a retrained adapter under the same name never
    reuses scores cached with the old one (None: no adapter or not a local folder)."""
    adapters = getattr(getattr(backend, "cfg", None), "adapters", None) or getattr(backend, "adapters", None) or {}
    return adapter_sha256(adapters.get(name)) if name else None


def scorer_key(s: Services) -> str:
    r = s.recommender
    return digest(r.backend.model_id, r.cfg.adapter, adapter_fingerprint(r.backend, r.cfg.adapter), r.p_image.version, r.p_text.version, r.cfg.use_images,
                  r.cfg.recent_items, r.cfg.history, r.p_titles.version if r.cfg.history == "titles" else None,
                  r.cfg.title_history if r.cfg.history == "titles" else None)


def _read_done(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    done[row["key"]] = row
                except (ValueError, KeyError):
                    continue  # a line cut by a kill mid-write: recompute that user
    return done


def run_cases(s: Services, cases: Sequence[EvalCase], run_dir: str | Path,
              show_progress: bool = True) -> dict:
    """Score every case; returns metrics + timings and writes scores.jsonl / metrics.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    calls0 = (s.summarizer.model_calls, s.memory.model_calls, s.recommender.model_calls)
    titles = s.recommender.cfg.history == "titles"  # TALLRec-style: no summaries at all
    with Progress(disable=not show_progress, transient=False) as prog:
        summaries, latest = {}, {}
        if not titles:
            # 1. item summaries for every history and candidate item
            ids = list(dict.fromkeys(i for c in cases for i in (*c.history, *c.candidates)))
            task = prog.add_task("item summaries", total=len(ids))
            summaries = s.summarizer.summarize([s.catalog[i] for i in ids],
                                               progress=lambda n: prog.advance(task, n))
            timings["items_s"] = time.perf_counter() - t0
            # 2. recurrent user summaries, all users' block b in one batch
            t1 = time.perf_counter()
            hist = [UserHistory(c.user_id, tuple(c.history), tuple(c.history_timestamps)) for c in cases]
            task = prog.add_task("user summaries", total=None)
            latest = s.memory.update_many(hist, s.catalog, summaries, progress=lambda n: prog.advance(task, n))
            prog.update(task, total=prog.tasks[task].completed)
            timings["users_s"] = time.perf_counter() - t1
        # 3. scoring, resumable per user
        t2 = time.perf_counter()
        out_path = run_dir / "scores.jsonl"
        done = _read_done(out_path)
        skey = scorer_key(s)
        task = prog.add_task("scoring", total=len(cases))
        rows = []
        with open(out_path, "a", encoding="utf-8") as f:
            for c in cases:
                v = latest.get(c.user_id)
                if titles:
                    summary = s.recommender.titles_context([s.catalog[i].title for i in c.history])
                else:
                    summary = v.summary if v else "No preferences known yet."
                key = digest(c.user_id, v.key if v else summary, list(c.candidates), skey)
                if key in done:
                    rows.append(done[key])
                else:
                    k = 0 if titles else s.recommender.cfg.recent_items
                    recent = [summaries[i].summary for i in c.history[-k:]] if k else []
                    scores = s.recommender.score(summary, [s.catalog[i] for i in c.candidates], recent)
                    row = {"key": key, "user_id": c.user_id, "candidates": list(c.candidates),
                           "labels": list(c.labels), "scores": scores, "summary": summary}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    rows.append(row)
                prog.advance(task)
        timings["scoring_s"] = time.perf_counter() - t2
    by_user = {r["user_id"]: r for r in rows}
    metrics = evaluate(cases, [by_user[c.user_id]["scores"] for c in cases])
    calls = (s.summarizer.model_calls, s.memory.model_calls, s.recommender.model_calls)
    result = {
        "metrics": metrics,
        "users": len(cases),
        "model_calls": {"item_summaries": calls[0] - calls0[0], "user_summaries": calls[1] - calls0[1],
                        "scored_pairs": calls[2] - calls0[2]},
        "timings_s": {k: round(v, 2) for k, v in {**timings, "total_s": time.perf_counter() - t0}.items()},
    }
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return result
