"""The dataset-wide stages as Ray Data pipelines (``engine.kind: ray``).

:func:`mllm_msr.pipeline.score_cases` hands over to :func:`score_cases_ray` when the config says
so; ``msr run``, ``msr eval`` and ``msr finetune sft benchmark`` then run their batch stages on a
Ray cluster (``engine.ray_address``; none = a local one). Each stage is one ``map_batches`` over
an actor pool; every actor builds its own :class:`~mllm_msr.pipeline.Services` from the config
(an in-process transformers / vLLM backend, or a client of OpenAI-compatible endpoints) against
the shared Chroma **server** (``store.host``), which is what makes the stages compose:

1. item summaries: rows are the single-process run's fixed chunks of the deduplicated item list
   (``items.batch_size`` items each), so batch-mates and hence outputs are the same; an item is
   computed once, under its content key, and written to the store;
2. recurrent memory: rows are users (``engine.users_per_batch`` per batch); an actor reads the
   item summaries from the store (no model call) and writes each user's versions;
3. scoring: rows are users; one prefix-shared call per user, as in the single-process run.

Between stages the driver reads the results back from the store (all hits, no model calls), then
writes the rows and the resumable ``scores.jsonl`` exactly as the single-process run does. The
work each actor did is added to the driver's counters, so ``model_calls`` report real calls.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllm_msr import pipeline
from mllm_msr.config import EngineConfig, MSRConfig
from mllm_msr.pipeline import Advance, Services

if TYPE_CHECKING:
    from mllm_msr.data.protocol import EvalCase
    from mllm_msr.data.schema import Dataset
    from mllm_msr.models.base import ModelBackend

BackendFactory = Callable[["MSRConfig"], tuple["ModelBackend", "ModelBackend"]]
# Services.extra key: a picklable (generator, scorer) factory the actors call instead of building
# backends from the config (custom backends; tests use scripted fakes)
BACKENDS_KEY = "ray_backend_factory"


# --------------------------------------------------------------------------------------- actors

class _StageActor:
    """Holds one Services (its backends load on first use) for the life of a stage's actor."""

    def __init__(self, cfg: MSRConfig, dataset: Dataset, backends: BackendFactory | None = None) -> None:
        from mllm_msr.pipeline import build_services

        gen, sc = backends(cfg) if backends else (None, None)
        self.s = build_services(cfg, dataset, generator=gen, scorer=sc)


class ItemStage(_StageActor):
    """Rows: ``chunk`` (JSON list of item ids, one single-process batch). Out: ``ids``, ``calls``."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        ids_out, calls = [], []
        for chunk in batch["chunk"]:
            ids = json.loads(chunk)
            before = self.s.summarizer.model_calls
            self.s.summarizer.summarize(self.s.items(ids, "item stage"))
            ids_out.append(chunk)
            calls.append(self.s.summarizer.model_calls - before)
        return {"chunk": ids_out, "calls": calls}


def _history(row: dict[str, Any]):
    from mllm_msr.agents.user_memory import UserHistory

    return UserHistory(row["user_id"], tuple(json.loads(row["history"])), tuple(json.loads(row["timestamps"])))


def _rows(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    cols = list(batch)
    for n in range(len(batch[cols[0]])):
        yield {c: batch[c][n] for c in cols}


class MemoryStage(_StageActor):
    """Rows: ``user_id, history, timestamps`` (JSON). Out: ``user_id``, ``calls`` (the batch's
    calls on its first row). The batch's users go to the memory together, block b as one batch."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        hists = [_history(r) for r in _rows(batch)]
        s = self.s
        sums = s.summarizer.summarize(s.items(list(dict.fromkeys(i for h in hists for i in h.items)), "memory stage"))
        before = (s.summarizer.model_calls, s.memory.model_calls)
        s.memory.update_many(hists, s.catalog, sums)
        calls = [s.summarizer.model_calls - before[0], s.memory.model_calls - before[1]]
        return {"user_id": [h.user_id for h in hists],
                "calls": [json.dumps(calls if n == 0 else [0, 0]) for n in range(len(hists))]}


class ScoreStage(_StageActor):
    """Rows: ``key, text, candidates`` (JSON). Out: ``key``, ``scores`` (JSON)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        keys, scores = [], []
        for r in _rows(batch):
            keys.append(r["key"])
            scores.append(json.dumps(self.s.recommender.score(r["text"], self.s.items(json.loads(r["candidates"]),
                                                                                       "score stage"))))
        return {"key": keys, "scores": scores}


# ---------------------------------------------------------------------------------------- driver

def ensure_ray(eng: EngineConfig) -> None:
    """Connect to (or start) the configured Ray cluster once per process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=eng.ray_address, num_cpus=None if eng.ray_address else eng.num_cpus,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)


def _map(s: Services, rows: list[dict[str, Any]], stage: type[_StageActor], batch_size: int) -> Iterator[dict]:
    """Stream ``stage``'s output rows over ``rows`` (an actor pool of ``engine.actors``)."""
    import ray.data

    eng = s.cfg.engine
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * eng.actors)))
    out = ds.map_batches(stage, batch_size=batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=min(eng.actors, len(rows))),
                         num_cpus=eng.cpus_per_actor, num_gpus=eng.gpus_per_actor or None,
                         fn_constructor_kwargs={"cfg": s.cfg, "dataset": s.dataset,
                                                "backends": s.extra.get(BACKENDS_KEY)})
    yield from out.iter_rows()


def summarize_cases_ray(s: Services, cases: Sequence[EvalCase], advance: Advance | None = None,
                        timings: dict[str, float] | None = None):
    """:func:`mllm_msr.pipeline.summarize_cases` with both stages on Ray; same return value."""
    from mllm_msr.agents.user_memory import UserHistory

    timings = timings if timings is not None else {}
    if not s.uses_summaries:
        return {}, {}
    t0 = time.perf_counter()
    ids = list(dict.fromkeys(i for c in cases for i in (*c.history, *c.candidates)))
    items = s.items(ids, "cases")
    cached = s.store.get_items([s.summarizer.key(it) for it in items])
    bs = max(1, s.cfg.items.batch_size)
    chunks = [ids[k:k + bs] for k in range(0, len(ids), bs)]  # the single-process run's chunks
    todo = [c for c in chunks if any(s.summarizer.key(s.catalog[i]) not in cached for i in c)]
    for row in (_map(s, [{"chunk": json.dumps(c)} for c in todo], ItemStage, 1) if todo else ()):
        s.summarizer.model_calls += int(row["calls"])
        if advance:
            advance("item summaries", len(json.loads(row["chunk"])), len(ids))
    summaries = s.summarizer.summarize(items)  # all in the store now: no model call
    timings["items_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    hist = [UserHistory(c.user_id, tuple(c.history), tuple(c.history_timestamps)) for c in cases]
    rows = [{"user_id": h.user_id, "history": json.dumps(h.items), "timestamps": json.dumps(h.timestamps)}
            for h in hist if h.items]
    for row in (_map(s, rows, MemoryStage, s.cfg.engine.users_per_batch) if rows else ()):
        items_calls, memory_calls = json.loads(row["calls"])
        s.summarizer.model_calls += items_calls
        s.memory.model_calls += memory_calls
        if advance:
            advance("user summaries", 1, None)
    latest = s.memory.update_many(hist, s.catalog, summaries)  # all in the store now
    timings["users_s"] = time.perf_counter() - t1
    return summaries, latest


def score_cases_ray(s: Services, cases: Sequence[EvalCase], *, resume_file: str | Path | None = None,
                    advance: Advance | None = None, timings: dict[str, float] | None = None) -> list[dict]:
    """:func:`mllm_msr.pipeline.score_cases` with its three stages on Ray; same rows, same
    resumable ``resume_file``."""
    from mllm_msr.hashing import digest
    from mllm_msr.pipeline import _read_done as read_done

    if s.cfg.store.host is None:
        raise ValueError("engine.kind=ray needs the summary store on a Chroma server (store.host): "
                         "actors on several processes or machines share it")
    ensure_ray(s.cfg.engine)
    timings = timings if timings is not None else {}
    s.check_users([c.user_id for c in cases])
    summaries, latest = summarize_cases_ray(s, cases, advance, timings)
    t2 = time.perf_counter()
    done = read_done(Path(resume_file)) if resume_file else {}
    plan = []
    for c in cases:
        v = latest.get(c.user_id)
        text = s.preference_text(c.history, v.summary if v else None, summaries)
        plan.append((c, text, digest(c.user_id, v.key if v else text, list(c.candidates), s.scorer_key)))
    todo = {key: (c, text) for c, text, key in plan if key not in done}
    out = open(resume_file, "a", encoding="utf-8") if resume_file else None
    try:
        rows = [{"key": k, "text": t, "candidates": json.dumps(list(c.candidates))} for k, (c, t) in todo.items()]
        for n, r in enumerate(_map(s, rows, ScoreStage, s.cfg.engine.users_per_batch) if rows else (), 1):
            c, text = todo[r["key"]]
            scores = json.loads(r["scores"])
            s.recommender.model_calls += len(scores)
            row = {"key": r["key"], "user_id": c.user_id, "candidates": list(c.candidates),
                   "labels": list(c.labels), "scores": scores, "summary": text}
            done[r["key"]] = row
            if out is not None:
                out.write(json.dumps(row) + "\n")
                out.flush()
                os.fsync(out.fileno())
            if advance:
                advance("scoring", len(cases) - len(todo) + n, len(cases))
    finally:
        if out is not None:
            out.close()
    timings["scoring_s"] = time.perf_counter() - t2
    return [done[key] for _, _, key in plan]


pipeline.ENGINES["ray"] = score_cases_ray  # engine.kind=ray (pipeline.ENGINE_MODULES names this module)
