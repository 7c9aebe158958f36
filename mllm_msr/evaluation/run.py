"""`msr eval`, the computing half: every row on the same test users and candidates, cached.

All rows of one protocol seed see exactly the same split and test candidates (``build_splits``).
Baseline rows pick their settings on the validation users with the test protocol (a small recorded
grid, :func:`mllm_msr.evaluation.baselines.tune`); LLM rows are config variants of the one
pipeline (:func:`mllm_msr.pipeline.score_cases`, which returns per-user rows). Every row also
records its validation metrics (the first ``valid_users`` validation users, test protocol).

Each row's result per seed is cached as ``<out>/eval/<row>/<seed>.json`` with a key of everything
it depends on (dataset fingerprint, protocol, config, adapter weights hash): adding a row or a seed
recomputes nothing else, and a retrained adapter recomputes its rows. With a committed results
folder (``EvalContext.results_dir``) every record is also kept there (:mod:`mllm_msr.evaluation.store`,
with the command that produced it) and reused from there when its key matches, so a committed row
costs nothing to rerun, also on a fresh clone. Rows whose adapter was trained on users they would
score are refused by the pipeline's leak guard and reported.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_msr.config import MSRConfig, load_config
from mllm_msr.data.protocol import EvalCase, ProtocolConfig, Splits, build_splits
from mllm_msr.data.schema import Dataset
from mllm_msr.evaluation import store
from mllm_msr.evaluation.baselines import BASELINES, BaselineConfig, BaselineGrid, tune
from mllm_msr.evaluation.rows import REFERENCE_ROW, ROWS, Row
from mllm_msr.metrics import evaluate
from mllm_msr.models.base import ModelBackend
from mllm_msr.paths import adapter_sha256
from mllm_msr.pipeline import (
    Services,
    adapter_leak,
    build_services,
    finalize_config,
    make_backends,
    memory_adapter_folder,
    score_cases,
)
from mllm_msr.prompting import list_prompts, load_prompt
from mllm_msr.stores.summaries import SummaryStore

log = logging.getLogger(__name__)

CACHE_VERSION = 2


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def case_rows(cases: Sequence[EvalCase], scores: Sequence[Sequence[float]], cold: frozenset[str]) -> list[dict]:
    """The per-user records every report is computed from (the target's cold flag included)."""
    return [{"user_id": c.user_id, "candidates": list(c.candidates), "labels": list(c.labels),
             "scores": [float(x) for x in s], "cold": c.target in cold} for c, s in zip(cases, scores, strict=True)]


@dataclass
class EvalContext:
    dataset: Dataset
    protocol: ProtocolConfig
    out_dir: Path
    baseline_cfg: BaselineConfig
    msr_cfg: MSRConfig | None = None  # needed only by LLM rows
    users: int | None = None  # cap on test users (smoke runs); None = every test user
    valid_users: int = 100  # validation users scored per row (test protocol); 0 = none
    grid: BaselineGrid | None = None  # None: the default grid; tune=False: no grid at all
    tune: bool = True
    services_factory: Callable[[MSRConfig, Dataset], Services] | None = None
    show_progress: bool = False
    results_dir: Path | None = None  # committed results folder: records kept and reused under rows/
    command: str = ""  # the command line, recorded in every record this run computes


class _SplitCache:
    def __init__(self, ctx: EvalContext):
        self.ctx = ctx
        self._splits: dict[int, Splits] = {}

    def __call__(self, seed: int) -> Splits:
        if seed not in self._splits:
            self._splits[seed] = build_splits(self.ctx.dataset, self.ctx.protocol.model_copy(update={"seed": seed}))
        return self._splits[seed]


def row_config(ctx: EvalContext, row: Row, seed: int) -> MSRConfig:
    """The LLM row's config as it will really run (adapters resolved: the key carries their hash)."""
    assert ctx.msr_cfg is not None
    base = ctx.msr_cfg.model_copy(update={"protocol": ctx.protocol.model_copy(update={"seed": seed})})
    return finalize_config(load_config(None, list(row.overrides), base=base))


def row_key(ctx: EvalContext, row: Row, seed: int, llm_cfg: MSRConfig | None = None) -> str:
    common = [CACHE_VERSION, ctx.dataset.fingerprint(), ctx.protocol.model_copy(update={"seed": seed}).model_dump(),
              row.key, ctx.users, ctx.valid_users]
    if row.kind == "baseline":
        return _hash(*common, ctx.baseline_cfg.model_dump(), ctx.tune and (ctx.grid or BaselineGrid()).model_dump())
    assert llm_cfg is not None
    # where summaries are kept (store) or written (run_dir) never changes a score: stored summaries
    # are keyed by their inputs, so the same row computed against another store is the same row
    cfg = llm_cfg.model_dump(exclude={"run_dir", "seed", "max_test_users", "store"})
    # only the adapter this row scores with: re-shipping another adapter must not recompute it
    name = llm_cfg.recommender.adapter
    cfg["scorer"].pop("adapters", None)
    cfg["generator"].pop("adapters", None)
    for role in ("items", "memory", "recommender"):  # prompts count by content (below), not by folder
        cfg[role].pop("prompt_dir", None)
    weights = adapter_sha256(llm_cfg.scorer.adapters.get(name)) if name else None
    # the memory's adapter by content too: a retrained memory rewrites every summary the row reads
    memory = adapter_sha256(memory_adapter_folder(llm_cfg))
    return _hash(*common, cfg, name, weights, *([memory] if memory else []), _prompt_versions(llm_cfg))


# prompts no evaluation row reads (chat feedback): editing them must not recompute a row
_UNSCORED_PROMPTS = frozenset({"user_feedback"})


def _prompt_versions(cfg: MSRConfig) -> dict[str, dict[str, str]]:
    """The content hash of every prompt file a row's roles read: an edited prompt is a new row."""
    dirs = {"items": cfg.items.prompt_dir, "memory": cfg.memory.prompt_dir, "recommender": cfg.recommender.prompt_dir}
    return {role: {n: load_prompt(n, d).version for n in list_prompts(d) if n not in _UNSCORED_PROMPTS}
            for role, d in dirs.items()}


def skip_reason(ctx: EvalContext, row: Row, seed: int, splits: Splits) -> str | None:
    """Why a row cannot be scored here (None: it can)."""
    if row.key == "sasrec_image" and not any(it.image_path for it in ctx.dataset.items.values()):
        return "dataset has no cover images (text only): SASRec+image would equal SASRec"
    if row.kind != "llm":
        return None
    if ctx.msr_cfg is None:
        return "no MSRConfig given (LLM rows need the pipeline's settings)"
    cfg = row_config(ctx, row, seed)
    wanted = _wanted_adapter(row, ctx.msr_cfg)
    if wanted and ctx.services_factory is None and cfg.recommender.adapter is None:
        return (f"no LoRA adapter {wanted!r} for this row: train it with `msr finetune sft benchmark` "
                f"(see README, Fine-tuning) and set scorer.adapters.{wanted}=PATH")
    users = [c.user_id for c in _test_cases(ctx, splits)] + [c.user_id for c in _valid_cases(ctx, splits)]
    return adapter_leak(cfg, ctx.dataset, users)


def _wanted_adapter(row: Row, base: MSRConfig) -> str | None:
    for ov in row.overrides:
        k, _, v = ov.partition("=")
        if k == "recommender.adapter":
            return None if v in ("null", "None", "") else v
    return base.recommender.adapter


def _test_cases(ctx: EvalContext, splits: Splits) -> list[EvalCase]:
    return list(splits.test[: ctx.users or None])


def _valid_cases(ctx: EvalContext, splits: Splits) -> list[EvalCase]:
    return list(splits.valid[: ctx.valid_users]) if ctx.valid_users else []


def _metrics(cases: Sequence[EvalCase], scores: Sequence[Sequence[float]]) -> dict[str, float]:
    return evaluate(cases, scores) if cases else {}


def _run_baseline(ctx: EvalContext, row: Row, seed: int, splits: Splits) -> dict:
    assert row.baseline is not None
    base = ctx.baseline_cfg.model_copy(update={"seed": ctx.baseline_cfg.seed + seed})
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if ctx.tune and splits.valid:
        tuned = tune(row.baseline, splits, ctx.dataset, base, ctx.grid)
        model = tuned.fitted
        info["grid"] = json.loads(tuned.model_dump_json())
        info["config"] = tuned.chosen.model_dump()
    else:
        model = BASELINES[row.baseline](base).fit(splits, ctx.dataset)
        info["config"] = base.model_dump()
    info["fit_s"] = round(time.perf_counter() - t0, 2)
    test, valid = _test_cases(ctx, splits), _valid_cases(ctx, splits)
    scores = model.score_many(test)
    return {"metrics": _metrics(test, scores), "cases": case_rows(test, scores, splits.cold_items),
            "valid_metrics": _metrics(valid, model.score_many(valid)) if valid else None, "info": info}


class _LLMRunner:
    """Builds backends and the summary store once and reuses them for every LLM row and seed."""

    def __init__(self, ctx: EvalContext):
        self.ctx = ctx
        self._shared: tuple[ModelBackend, ModelBackend, SummaryStore] | None = None

    def services(self, cfg: MSRConfig) -> Services:
        if self.ctx.services_factory is not None:
            return self.ctx.services_factory(cfg, self.ctx.dataset)
        if self._shared is None:
            assert self.ctx.msr_cfg is not None
            full = finalize_config(self.ctx.msr_cfg)
            # every adapter any row may ask for, so one scorer serves all rows
            adapters = {**full.scorer.adapters, **cfg.scorer.adapters}
            scorer = full.scorer.model_copy(update={"adapters": adapters})
            gen, sc = make_backends(full.model_copy(update={"scorer": scorer}))
            self._shared = (gen, sc, SummaryStore(full.store))
        gen, sc, store = self._shared
        return build_services(cfg, self.ctx.dataset, generator=gen, scorer=sc, store=store)

    def run(self, row: Row, seed: int, splits: Splits, cfg: MSRConfig, partial: Path | None = None) -> dict:
        """Score the row's test and validation users; with ``partial`` (a folder), scored users are
        appended there as they finish, so a killed evaluation resumes where it stopped."""
        s = self.services(cfg)
        if partial is not None:
            partial.mkdir(parents=True, exist_ok=True)
        test, valid = _test_cases(self.ctx, splits), _valid_cases(self.ctx, splits)
        timings: dict[str, float] = {}
        calls0 = (s.summarizer.model_calls, s.memory.model_calls, s.recommender.model_calls)
        rows = score_cases(s, test, timings=timings, resume_file=partial / "test.jsonl" if partial else None)
        vrows = score_cases(s, valid, resume_file=partial / "valid.jsonl" if partial else None) if valid else []
        info = {"adapter": s.cfg.recommender.adapter, "timings_s": {k: round(v, 2) for k, v in timings.items()},
                "model_calls": {"item_summaries": s.summarizer.model_calls - calls0[0],
                                "user_summaries": s.memory.model_calls - calls0[1],
                                "scored_pairs": s.recommender.model_calls - calls0[2]},
                "overrides": list(row.overrides)}
        scores = [r["scores"] for r in rows]
        cases = case_rows(test, scores, splits.cold_items)
        for c, r in zip(cases, rows, strict=True):
            c["summary"] = r["summary"]  # the preference text the recommender read (fidelity diagnostic)
        return {"metrics": _metrics(test, scores), "cases": cases,
                "valid_metrics": _metrics(valid, [r["scores"] for r in vrows]) if valid else None, "info": info}


def row_entry(key: str) -> dict[str, Any]:
    """A row's result entry before any seed is in (``per_seed``: seed → record; ``source``: seed →
    computed | cache | committed)."""
    row = ROWS[key]
    return {"key": key, "label": row.label, "kind": row.kind, "sees": row.sees, "status": "ok", "reason": None,
            "per_seed": {}, "source": {}, "block_size": row.block_size}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _reusable(ctx: EvalContext, path: Path, key: str, seed: int, rkey: str) -> tuple[dict | None, str]:
    """A stored record with cache key ``rkey``: the committed one first, then the working cache."""
    if ctx.results_dir is not None:
        committed = store.load(store.row_path(ctx.results_dir, key, seed))
        if committed is not None and committed.get("cache_key") == rkey:
            return committed, "committed"
    cached = _read_json(path)
    if cached is not None and cached.get("cache_key") == rkey:
        return cached, "cache"
    return None, "computed"


def _same_as_reference(ctx: EvalContext, eval_dir: Path, row: Row, seed: int, cfg: MSRConfig,
                       rkey: str) -> dict | None:
    """The reference row's record, relabelled, when ``row`` runs exactly the reference row's config
    (e.g. the block-size sweep's default size): the same scores, never computed twice."""
    ref = ROWS[REFERENCE_ROW]
    if row.key == ref.key or row_config(ctx, ref, seed) != cfg:
        return None
    rec, _ = _reusable(ctx, eval_dir / ref.key / f"{seed}.json", ref.key, seed, row_key(ctx, ref, seed, cfg))
    if rec is None:
        return None
    log.info("row %s seed %s runs the %s config: its record is reused", row.key, seed, ref.key)
    rec = {k: v for k, v in rec.items() if k != "fidelity"}  # the diagnostic stays with the reference row
    return {**rec, "row": row.key, "label": row.label, "cache_key": rkey, "same_as": ref.key}


def _stamp(ctx: EvalContext, rec: dict[str, Any], seed: int) -> dict[str, Any]:
    """What a committed record must name to be compared with later evaluations (all of it in the
    cache key already), the command that produced it, and scores rounded as they are stored."""
    rec.update({"dataset": ctx.dataset.fingerprint(), "valid_users": ctx.valid_users,
                "protocol": ctx.protocol.model_copy(update={"seed": seed}).model_dump()})
    rec.setdefault("command", ctx.command)
    return store.round_scores(rec)


def run_eval(ctx: EvalContext, rows: Sequence[str], seeds: Sequence[int] = (0,)) -> dict[str, dict]:
    """Compute (or load from cache) every row × seed; returns ``{row: entry}`` with per-seed results
    (``metrics``, ``valid_metrics``, ``cases``, ``info``, ``command``) and a status/reason for rows
    not run. With ``ctx.results_dir`` every record is also kept (and first looked up) there."""
    if ctx.results_dir is not None and ctx.users is not None:
        raise ValueError("a capped (smoke) evaluation cannot use committed results")
    eval_dir = ctx.out_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    splits_of = _SplitCache(ctx)
    llm = _LLMRunner(ctx)
    results: dict[str, dict] = {}
    for key in rows:
        row = ROWS[key]
        entry = results[key] = row_entry(key)
        for seed in seeds:
            splits = splits_of(seed)
            reason = skip_reason(ctx, row, seed, splits)
            if reason:
                entry.update(status="not run", reason=reason)
                log.warning("row %s (seed %s) not run: %s", key, seed, reason)
                break
            llm_cfg = row_config(ctx, row, seed) if row.kind == "llm" else None
            rkey = row_key(ctx, row, seed, llm_cfg)
            path = eval_dir / key / f"{seed}.json"
            rec, source = _reusable(ctx, path, key, seed, rkey)
            if rec is None and llm_cfg is not None:
                rec = _same_as_reference(ctx, eval_dir, row, seed, llm_cfg, rkey)
                source = f"same config as {REFERENCE_ROW}" if rec is not None else source
            if rec is not None:
                entry["per_seed"][seed], entry["source"][seed] = _stamp(ctx, rec, seed), source
                if source != "committed" and ctx.results_dir is not None:
                    store.save(ctx.results_dir, rec)
                log.info("row %s seed %s: reused its %s record", key, seed, source)
                continue
            t0 = time.perf_counter()
            try:
                # an LLM row's scored users are kept under a folder named by its cache key (resume)
                partial = eval_dir / key / f"{seed}.partial-{rkey}"
                res = (_run_baseline(ctx, row, seed, splits) if row.kind == "baseline"
                       else llm.run(row, seed, splits, llm_cfg, partial))  # type: ignore[arg-type]
            except Exception as e:  # one failing row must not lose the others
                log.exception("row %s seed %s failed", key, seed)
                entry.update(status="failed", reason=f"{type(e).__name__}: {e}")
                break
            res.update({"row": key, "label": row.label, "seed": seed, "cache_key": rkey,
                        "n_cases": len(res["cases"]), "wall_s": round(time.perf_counter() - t0, 2),
                        "split": splits.summary(),
                        "config": json.loads(llm_cfg.model_dump_json()) if llm_cfg is not None else None,
                        "adapter_sha256": (adapter_sha256(llm_cfg.scorer.adapters.get(llm_cfg.recommender.adapter))
                                           if llm_cfg is not None and llm_cfg.recommender.adapter else None)})
            _stamp(ctx, res, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(res), encoding="utf-8")
            tmp.replace(path)
            if ctx.results_dir is not None:
                store.save(ctx.results_dir, res)
            if row.kind == "llm":
                shutil.rmtree(partial, ignore_errors=True)  # the row's file now holds every user
            entry["per_seed"][seed], entry["source"][seed] = res, "computed"
    return results
