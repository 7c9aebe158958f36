"""One evaluation end to end: rows → per-user records → intervals, paired differences, the
memory-fidelity diagnostic → ``results.json``, ``table.md`` and plots (what ``msr eval`` runs).

With a committed results folder the table is the union of this evaluation's rows and every
comparable row committed there earlier (:mod:`mllm_msr.evaluation.store`), so rows accumulate and a
row added later is paired user by user with the committed reference row."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mllm_msr.config import MSRConfig
from mllm_msr.data.schema import Dataset
from mllm_msr.evaluation import store
from mllm_msr.evaluation.baselines import BaselineConfig
from mllm_msr.evaluation.report import build_results, plots, probe_stats, write_results
from mllm_msr.evaluation.rows import REFERENCE_ROW
from mllm_msr.evaluation.run import EvalContext, row_entry, run_eval
from mllm_msr.pipeline import Services

log = logging.getLogger(__name__)


class SmokeRunError(ValueError):
    """A capped (smoke) evaluation asked to write into committed results."""


def fidelity_for(ctx: EvalContext, results: dict[str, dict], seed: int) -> dict | None:
    """The chain's fidelity on the MLLM-MSR row's test users (bundled benchmark only)."""
    entry = results.get(REFERENCE_ROW)
    if ctx.msr_cfg is None or ctx.msr_cfg.dataset != "synth" or not entry or seed not in entry["per_seed"]:
        return None
    from mllm_msr.data.synth import default_benchmark_dir
    from mllm_msr.evaluation.fidelity import chain_fidelity
    from mllm_msr.evaluation.rows import ROWS
    from mllm_msr.evaluation.run import _LLMRunner, row_config

    cases = entry["per_seed"][seed]["cases"]
    s = _LLMRunner(ctx).services(row_config(ctx, ROWS[REFERENCE_ROW], seed))
    ids = sorted({i for c in cases for i in c["candidates"]})
    sums = s.summarizer.summarize(s.items(ids, "fidelity"))  # cached by the row's run: no model calls
    users = {c["user_id"]: c["summary"] for c in cases if "summary" in c}  # the paper row reads the summary only
    return chain_fidelity(default_benchmark_dir(ctx.msr_cfg.synth),
                          {i: v.image_description for i, v in sums.items()},
                          {i: v.summary for i, v in sums.items()}, users)


def _fidelity(ctx: EvalContext, results: dict[str, dict], seed: int) -> dict | None:
    """The reference row's fidelity, kept in its record (so a committed reference row that is
    reused needs no model call: recomputing it would summarize every candidate item again)."""
    entry = results.get(REFERENCE_ROW)
    rec = entry["per_seed"].get(seed) if entry else None
    if entry is None or rec is None:
        return None
    if "fidelity" in rec or entry["source"].get(seed) == "committed":
        return rec.get("fidelity")
    try:
        fid = fidelity_for(ctx, results, seed)
    except Exception as e:  # a diagnostic must not lose the evaluation
        log.warning("memory-fidelity diagnostic failed: %s", e)
        return None
    if fid is not None and ctx.results_dir is not None:
        rec["fidelity"] = fid
        store.save(ctx.results_dir, rec)
    return fid


def _probe(ctx: EvalContext, results: dict[str, dict], seed: int, order: Sequence[str],
           n_resamples: int) -> dict | None:
    """The text-match probe (:func:`mllm_msr.evaluation.fidelity.probe_scores`) on every LLM row's
    stored preference texts, rows in ``order`` (bundled benchmark only; no model call)."""
    if ctx.msr_cfg is None or ctx.msr_cfg.dataset != "synth":
        return None
    from mllm_msr.data.synth import default_benchmark_dir, load_ground_truth
    from mllm_msr.evaluation.fidelity import probe_scores

    gt = load_ground_truth(default_benchmark_dir(ctx.msr_cfg.synth))["items"]
    out: dict[str, Any] = {}
    for key in order:
        e = results[key]
        rec = e["per_seed"].get(seed)
        if e["kind"] != "llm" or rec is None or not rec["cases"] or not all("summary" in c for c in rec["cases"]):
            continue
        out[key] = {"label": e["label"], **probe_stats(rec["cases"], probe_scores(rec["cases"], gt), n_resamples)}
    return out or None


def with_committed(ctx: EvalContext, results: dict[str, dict], seed: int) -> dict[str, dict]:
    """This evaluation's rows plus every comparable row committed in ``ctx.results_dir`` (rows not
    run or failed here keep their committed result)."""
    assert ctx.results_dir is not None
    done = {k: e["per_seed"][seed] for k, e in results.items() if seed in e["per_seed"]}
    committed = store.committed_rows(ctx.results_dir, seed, dataset=ctx.dataset.fingerprint(),
                                     valid_users=ctx.valid_users, anchor=next(iter(done.values()), None),
                                     skip=frozenset(done))
    merged = dict(results)
    for key, rec in committed.items():
        if key in results:
            log.warning("row %s %s here (%s): its committed result is kept", key, results[key]["status"],
                        results[key]["reason"])
        entry = merged[key] = row_entry(key)
        entry["per_seed"][seed], entry["source"][seed] = rec, "committed"
    return merged


def run_suite(cfg: MSRConfig, dataset: Dataset, rows: Sequence[str], out_dir: Path, *,
              results_dir: Path | None = None, users: int | None = None, valid_users: int = 100,
              seed: int | None = None, baseline_cfg: BaselineConfig | None = None, tune: bool = True,
              command: str = "", show_progress: bool = False, n_resamples: int = 2000,
              services_factory: Callable[[MSRConfig, Dataset], Services] | None = None) -> dict[str, Any]:
    """Run ``rows`` on one protocol seed and write ``out_dir/eval/{results.json,table.md,eval_*.png}``;
    with ``results_dir`` (committed results) also there, each row's record under ``results_dir/rows``,
    and the table holds every comparable committed row — refused for capped (smoke) runs."""
    if results_dir is not None and users is not None:
        raise SmokeRunError(f"--users {users} caps the test set: a smoke run never writes committed results "
                            f"({results_dir}); drop --users or --results")
    seed = cfg.protocol.seed if seed is None else seed
    ctx = EvalContext(dataset=dataset, protocol=cfg.protocol, out_dir=out_dir,
                      baseline_cfg=baseline_cfg or BaselineConfig(), msr_cfg=cfg, users=users,
                      valid_users=valid_users, tune=tune, show_progress=show_progress,
                      services_factory=services_factory, results_dir=results_dir, command=command)
    results = run_eval(ctx, rows, [seed])
    if results_dir is not None:
        results = with_committed(ctx, results, seed)
    any_row = next((e["per_seed"][seed] for e in results.values() if seed in e["per_seed"]), None)
    meta = {"dataset": dataset.fingerprint(), "protocol": cfg.protocol.model_dump(), "command": command,
            "test_users": any_row["n_cases"] if any_row else 0,
            "candidates": len(any_row["cases"][0]["candidates"]) if any_row and any_row["cases"] else 0,
            "negatives": cfg.protocol.test_negatives, "valid_users": valid_users,
            "baseline_config": ctx.baseline_cfg.model_dump(), "tuned_on_validation": tune}
    payload = build_results(results, seed, meta, n_resamples=n_resamples)
    payload["fidelity"] = _fidelity(ctx, results, seed)
    payload["probe"] = _probe(ctx, results, seed, list(payload["rows"]), n_resamples)
    for folder in [out_dir / "eval", *([results_dir] if results_dir is not None else [])]:
        write_results(payload, folder)
        plots(payload, folder)
    return payload
