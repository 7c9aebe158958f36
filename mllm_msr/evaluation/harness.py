"""`msr eval`: the form of the paper's main table, with several seeds and 95% confidence intervals.

Every row of one seed sees exactly the same splits and test candidates (``build_splits`` with the
protocol seed ``protocol.seed + k``; the seed varies the user split and the negatives, and the
baselines' model seed moves with it). Rows:

* ID baselines trained here (:mod:`mllm_msr.evaluation.baselines`): Popularity, GRU4Rec, SASRec,
  SASRec+image (skipped with a note on text-only datasets).
* LLM rows through the pipeline (:func:`mllm_msr.runner.run_cases`) as config variants:
  zero-shot, TALLRec-style (titles only; needs a text-only adapter ``scorer.adapters.tallrec``),
  MLLM-MSR, w/o recurrence, w/o image summaries, and the block-size sweep (paper Fig. 5).

Each row's result per seed is cached as ``<out>/eval/<row>/<seed>.json`` together with a key of
everything it depends on; a cached result with the same key is reused, so adding a row or a seed
recomputes nothing else. Outputs in ``<out>/eval/``: ``table.md``, ``results.csv``,
``results.json`` and PNG plots (one bar chart per metric with CI error bars, the block-size curve).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Literal, Optional

from mllm_msr.data.protocol import EvalCase, ProtocolConfig, Splits, build_splits
from mllm_msr.data.schema import Dataset
from mllm_msr.evaluation.baselines import BASELINES, BaselineConfig
from mllm_msr.evaluation.metrics import evaluate, mean_ci
from mllm_msr.paths import adapter_sha256

log = logging.getLogger(__name__)

TABLE_METRICS: tuple[tuple[str, str], ...] = (("auc", "AUC"), ("hr@5", "HR@5"), ("mrr@5", "MRR@5"),
                                             ("ndcg@5", "NDCG@5"))
CSV_METRICS = ("auc", "user_auc", "hr@5", "mrr@5", "ndcg@5", "hr@10", "mrr@10", "ndcg@10",
               "mean_rank", "warm_auc")
BLOCK_SIZES = (1, 2, 3, 4, 6)
CACHE_VERSION = 1


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    kind: Literal["baseline", "llm"]
    baseline: str | None = None
    overrides: tuple[str, ...] = ()
    block_size: int | None = None


ROWS: dict[str, Row] = {r.key: r for r in [
    Row("popularity", "Popularity", "baseline", baseline="popularity"),
    Row("gru4rec", "GRU4Rec", "baseline", baseline="gru4rec"),
    Row("sasrec", "SASRec", "baseline", baseline="sasrec"),
    Row("sasrec_image", "SASRec+image", "baseline", baseline="sasrec_image"),
    Row("zero_shot", "Zero-shot MLLM", "llm", overrides=("recommender.adapter=null",)),
    Row("tallrec", "TALLRec-style (titles only)", "llm",
        overrides=("recommender.history=titles", "recommender.use_images=false", "recommender.adapter=tallrec")),
    Row("mllm_msr", "MLLM-MSR", "llm"),
    Row("no_recurrence", "w/o recurrence", "llm", overrides=("memory.mode=direct",)),
    Row("no_image_summaries", "w/o image summaries", "llm", overrides=("items.use_images=false",)),
    *[Row(f"block_{b}", f"MLLM-MSR, block size {b}", "llm", overrides=(f"memory.block_size={b}",),
          block_size=b) for b in BLOCK_SIZES],
]}
BASELINE_ROWS = ("popularity", "gru4rec", "sasrec", "sasrec_image")
LLM_ROWS = ("zero_shot", "tallrec", "mllm_msr", "no_recurrence", "no_image_summaries")
DEFAULT_ROWS = (*BASELINE_ROWS, "mllm_msr", "zero_shot")
GROUPS: dict[str, tuple[str, ...]] = {
    "baselines": BASELINE_ROWS, "llm": LLM_ROWS, "ablations": ("no_recurrence", "no_image_summaries"),
    "blocks": tuple(f"block_{b}" for b in BLOCK_SIZES), "default": DEFAULT_ROWS,
    "all": tuple(ROWS),
}


def parse_rows(spec: str | Sequence[str] | None) -> list[str]:
    """Row keys from ``"baselines,mllm_msr"``-style specs (groups expand; order kept, no repeats)."""
    if spec is None:
        return list(DEFAULT_ROWS)
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for p in (x.strip() for x in parts):
        if not p:
            continue
        keys = GROUPS.get(p, (p,))
        for k in keys:
            if k not in ROWS:
                raise ValueError(f"unknown row {k!r}; rows: {', '.join(ROWS)}; groups: {', '.join(GROUPS)}")
            if k not in out:
                out.append(k)
    return out


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _dataset_fingerprint(ds: Dataset) -> dict:
    return {"name": ds.name, "items": len(ds.items), "interactions": len(ds.interactions),
            "digest": _hash(sorted((i.user_id, i.timestamp, i.item_id) for i in ds.interactions))}


def _case_rows(cases: Sequence[EvalCase], scores: Sequence[Sequence[float]]) -> list[dict]:
    return [{"user_id": c.user_id, "candidates": list(c.candidates), "labels": list(c.labels),
             "scores": [float(x) for x in s]} for c, s in zip(cases, scores)]


def _metrics(cases: Sequence[EvalCase], scores: Sequence[Sequence[float]], cold: frozenset[str]) -> dict:
    m = evaluate(cases, scores)
    warm = [i for i, c in enumerate(cases) if c.target not in cold]
    m["warm_auc"] = evaluate([cases[i] for i in warm], [scores[i] for i in warm])["auc"] if warm else float("nan")
    m["cold_targets"] = float(len(cases) - len(warm))
    return m


class _SimpleCase:
    """Enough of an EvalCase (labels, target) to recompute metrics from a cached JSON."""

    def __init__(self, d: dict):
        self.user_id, self.candidates, self.labels = d["user_id"], tuple(d["candidates"]), tuple(d["labels"])

    @property
    def target(self) -> str:
        return self.candidates[self.labels.index(1)]


# --------------------------------------------------------------------------- the evaluation

@dataclass
class EvalContext:
    dataset: Dataset
    protocol: ProtocolConfig
    out_dir: Path
    baseline_cfg: BaselineConfig
    msr_cfg: Any = None  # MSRConfig, needed only by LLM rows
    users: int | None = None
    llm_seeds: int = 1
    services_factory: Callable[[Any, Dataset], Any] | None = None
    show_progress: bool = False


class _SplitCache:
    def __init__(self, ctx: EvalContext):
        self.ctx, self._splits = ctx, {}

    def __call__(self, seed: int) -> Splits:
        if seed not in self._splits:
            self._splits[seed] = build_splits(self.ctx.dataset, self.ctx.protocol.model_copy(update={"seed": seed}))
        return self._splits[seed]


def _row_key(ctx: EvalContext, row: Row, seed: int, llm_cfg: Any = None) -> str:
    common = [CACHE_VERSION, _dataset_fingerprint(ctx.dataset),
              ctx.protocol.model_copy(update={"seed": seed}).model_dump(), row.key]
    if row.kind == "baseline":
        return _hash(*common, ctx.baseline_cfg.model_dump())
    cfg = llm_cfg.model_dump(exclude={"run_dir", "seed", "max_test_users"})
    # adapter CONTENT, so retraining one in place recomputes its rows
    weights = {name: adapter_sha256(folder) for name, folder in sorted(llm_cfg.scorer.adapters.items())}
    return _hash(*common, cfg, ctx.users, weights)


def _skip_reason(ctx: EvalContext, row: Row) -> str | None:
    if row.key == "sasrec_image" and not any(it.image_path for it in ctx.dataset.items.values()):
        return "dataset has no cover images (text only): SASRec+image would equal SASRec"
    if row.kind == "llm":
        if ctx.msr_cfg is None:
            return "no MSRConfig given (LLM rows need the pipeline's settings)"
        from mllm_msr.pipeline import finalize_config

        if (row.key == "tallrec" and ctx.services_factory is None
                and "tallrec" not in finalize_config(ctx.msr_cfg).scorer.adapters):
            return ("no text-only (TALLRec-style) LoRA adapter: train one with `python -m "
                    "mllm_msr.finetune.sft benchmark --set history=titles --set adapter_name=tallrec` "
                    "and set scorer.adapters.tallrec=PATH")
    return None


def _adapter_overlap(ctx: EvalContext, llm_cfg: Any, seed: int) -> str | None:
    """Why this seed must not be scored with this row's adapter, if it must not.

    An adapter trained on one by-user split has seen the train users' whole sequences, final items
    included. Another protocol seed draws a different split, whose test users are mostly those
    train users: scoring them would leak. The adapter's PROVENANCE.json names its split."""
    name = llm_cfg.recommender.adapter
    folder = llm_cfg.scorer.adapters.get(name) if name else None
    prov_file = Path(folder) / "PROVENANCE.json" if folder else None
    if prov_file is None or not prov_file.is_file():
        return None
    try:
        data = json.loads(prov_file.read_text(encoding="utf-8")).get("data") or {}
    except (OSError, ValueError):
        return None
    trained = data.get("protocol")
    if ctx.msr_cfg is None or data.get("dataset") != ctx.msr_cfg.dataset:
        return None  # trained on another dataset: other users altogether
    here = ctx.protocol.model_copy(update={"seed": seed}).model_dump()
    if trained is None or trained == here:
        return None
    return (f"adapter {name!r} was trained on the split of protocol seed {trained.get('seed')}; other "
            "seeds' test users are mostly its training users (a leak), so only that seed is scored")


def _llm_cfg(ctx: EvalContext, row: Row, seed: int):
    from mllm_msr.config import load_config

    from mllm_msr.pipeline import finalize_config

    base = ctx.msr_cfg.model_copy(update={"protocol": ctx.protocol.model_copy(update={"seed": seed})})
    cfg = load_config(None, list(row.overrides), base=base)
    # the adapters the row will really use (shipped ones included), so the row's cache key carries
    # their weights hash and the leak guard reads their provenance
    return cfg if ctx.services_factory is not None else finalize_config(cfg)


def _run_baseline(ctx: EvalContext, row: Row, seed: int, splits: Splits) -> dict:
    cls = BASELINES[row.baseline]
    bcfg = ctx.baseline_cfg.model_copy(update={"seed": ctx.baseline_cfg.seed + seed})
    t0 = time.perf_counter()
    model = cls(bcfg).fit(splits, ctx.dataset)
    fit_s = time.perf_counter() - t0
    scores = model.score_many(splits.test)
    return {"metrics": _metrics(splits.test, scores, splits.cold_items),
            "cases": _case_rows(splits.test, scores),
            "info": {"fit_s": round(fit_s, 2), "final_train_loss": model.losses[-1] if model.losses else None,
                     "config": bcfg.model_dump()}}


class _LLMRunner:
    """Builds backends and the summary store once and reuses them for every LLM row and seed."""

    def __init__(self, ctx: EvalContext):
        self.ctx, self._shared = ctx, None

    def services(self, cfg):
        from mllm_msr.pipeline import build_services, make_backends, finalize_config

        if self.ctx.services_factory is not None:
            return self.ctx.services_factory(cfg, self.ctx.dataset), cfg
        resolved = finalize_config(cfg)
        if self._shared is None:
            from mllm_msr.stores.summaries import SummaryStore

            full = finalize_config(self.ctx.msr_cfg)
            scorer_cfg = full.scorer.model_copy(update={"adapters": {**full.scorer.adapters, **cfg.scorer.adapters}})
            gen, sc = make_backends(full.model_copy(update={"scorer": scorer_cfg}))
            self._shared = (gen, sc, SummaryStore(full.store))
        gen, sc, store = self._shared
        return build_services(resolved, self.ctx.dataset, generator=gen, scorer=sc, store=store), resolved

    def run(self, row: Row, seed: int, splits: Splits, cfg) -> dict:
        from mllm_msr.pipeline import run_cases

        cases = splits.test[: self.ctx.users or cfg.max_test_users or len(splits.test)]
        services, resolved = self.services(cfg)
        run_dir = self.ctx.out_dir / "eval" / row.key / f"run-seed{seed}"
        result = run_cases(services, cases, run_dir, show_progress=self.ctx.show_progress)
        scores = [r["scores"] for r in result["rows"]]
        info = {"adapter": resolved.recommender.adapter, "model_calls": result.get("model_calls"),
                "timings_s": result.get("timings_s"), "overrides": list(row.overrides)}
        if row.key != "zero_shot" and resolved.recommender.adapter is None and cfg.recommender.adapter is not None:
            info["note"] = f"adapter {cfg.recommender.adapter!r} not available: scored zero-shot"
        return {"metrics": _metrics(cases, scores, splits.cold_items), "cases": _case_rows(cases, scores),
                "info": info}


def run_eval(ctx: EvalContext, rows: Sequence[str], seeds: Sequence[int]) -> dict:
    """Compute (or load from cache) every row × seed, then write the table, CSV, JSON and plots."""
    eval_dir = ctx.out_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    splits_of = _SplitCache(ctx)
    llm = _LLMRunner(ctx)
    results: dict[str, dict] = {}
    for key in rows:
        row = ROWS[key]
        entry = {"key": key, "label": row.label, "kind": row.kind, "status": "ok", "reason": None,
                 "per_seed": {}, "block_size": row.block_size}
        results[key] = entry
        reason = _skip_reason(ctx, row)
        if reason:
            entry.update(status="not run", reason=reason)
            log.warning("row %s not run: %s", key, reason)
            continue
        row_seeds = list(seeds) if row.kind == "baseline" else list(seeds)[: max(1, ctx.llm_seeds)]
        for seed in row_seeds:
            path = eval_dir / key / f"{seed}.json"
            llm_cfg = _llm_cfg(ctx, row, seed) if row.kind == "llm" else None
            overlap = _adapter_overlap(ctx, llm_cfg, seed) if llm_cfg is not None else None
            if overlap:
                entry.setdefault("skipped_seeds", {})[seed] = overlap
                log.warning("row %s: %s", key, overlap)
                continue
            rkey = _row_key(ctx, row, seed, llm_cfg)
            cached = None
            if path.is_file():
                try:
                    cached = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    cached = None
            if cached is not None and cached.get("cache_key") == rkey:
                entry["per_seed"][seed] = cached
                continue
            splits = splits_of(seed)
            t0 = time.perf_counter()
            try:
                res = (_run_baseline(ctx, row, seed, splits) if row.kind == "baseline"
                       else llm.run(row, seed, splits, llm_cfg))
            except Exception as e:  # one failing row must not lose the others
                log.exception("row %s seed %s failed", key, seed)
                entry.update(status="failed", reason=f"{type(e).__name__}: {e}")
                break
            res.update({"row": key, "label": row.label, "seed": seed, "cache_key": rkey,
                        "n_cases": len(res["cases"]), "wall_s": round(time.perf_counter() - t0, 2),
                        "split": splits.summary()})
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(res), encoding="utf-8")
            tmp.replace(path)
            entry["per_seed"][seed] = res
        if not entry["per_seed"] and entry.get("skipped_seeds") and entry["status"] == "ok":
            entry.update(status="not run", reason=next(iter(entry["skipped_seeds"].values())))
    summary = summarise(results)
    write_outputs(ctx, results, summary, list(seeds))
    return {"rows": results, "summary": summary}


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    """Per row and metric: mean and 95% t-interval half-width over seeds, and the seeds used."""
    out: dict[str, dict] = {}
    for key, e in results.items():
        if not e["per_seed"]:
            continue
        seeds = sorted(e["per_seed"])
        row = {"seeds": seeds, "n_cases": [e["per_seed"][s]["n_cases"] for s in seeds]}
        for m in CSV_METRICS:
            vals = [e["per_seed"][s]["metrics"].get(m, float("nan")) for s in seeds]
            vals = [v for v in vals if v is not None and not math.isnan(v)]
            mean, half = mean_ci(vals) if vals else (float("nan"), float("nan"))
            row[m] = {"mean": mean, "ci": half, "values": vals}
        out[key] = row
    return out


def common_subset(results: dict[str, dict]) -> dict | None:
    """When rows saw different test users (``--users`` caps the LLM rows), every row's metrics on
    the users all rows share, per seed that all rows ran; None when all rows saw the same users."""
    ok = {k: e for k, e in results.items() if e["per_seed"]}
    if len(ok) < 2:
        return None
    seeds = sorted(set.intersection(*(set(e["per_seed"]) for e in ok.values())))
    sizes = {e["per_seed"][s]["n_cases"] for e in ok.values() for s in seeds}
    if not seeds or len(sizes) <= 1:
        return None
    table: dict[str, dict] = {}
    n_users = 0
    for key, e in ok.items():
        per = {m: [] for m, _ in TABLE_METRICS}
        for s in seeds:
            users = set.intersection(*({c["user_id"] for c in o["per_seed"][s]["cases"]} for o in ok.values()))
            rows = [c for c in e["per_seed"][s]["cases"] if c["user_id"] in users]
            n_users = len(rows)
            if not rows:
                continue
            m = evaluate([_SimpleCase(c) for c in rows], [c["scores"] for c in rows])
            for name, _ in TABLE_METRICS:
                per[name].append(m[name])
        table[key] = {name: dict(zip(("mean", "ci"), mean_ci(v))) for name, v in per.items()}
    return {"seeds": seeds, "users_per_seed": n_users, "rows": table}


# --------------------------------------------------------------------------- outputs

def _fmt(d: dict) -> str:
    if d is None or d.get("mean") is None or math.isnan(d["mean"]):
        return "–"
    return f"{d['mean']:.3f} ± {d['ci']:.3f}"


def write_outputs(ctx: EvalContext, results: dict, summary: dict, seeds: list[int]) -> None:
    eval_dir = ctx.out_dir / "eval"
    ds = ctx.dataset
    stats = ds.stats()
    lines = [f"# Main table on {ds.name}", "",
             f"{stats['users']} users, {stats['items']} items ({stats['items_with_images']} with covers), "
             f"{stats['interactions']} interactions. Protocol: split={ctx.protocol.split}, "
             f"1 positive : {ctx.protocol.test_negatives} negatives per test user, protocol seeds "
             f"{', '.join(map(str, seeds))} (each seed re-draws the user split and the negatives; "
             "baseline model seeds move with it). Cells: mean ± half-width of the 95% Student-t "
             "interval over seeds (± 0.000 with one seed). All rows of a seed share the same splits "
             "and candidates.", "",
             "| Row | " + " | ".join(lbl for _, lbl in TABLE_METRICS) + " | warm AUC | seeds | test users |",
             "|---|" + "---|" * (len(TABLE_METRICS) + 3)]
    for key, e in results.items():
        s = summary.get(key)
        if s is None:
            why = e.get("reason") or "no result"
            lines.append(f"| {e['label']} | " + " | ".join(["–"] * len(TABLE_METRICS))
                         + f" | – | – | {e['status']}: {why} |")
            continue
        cells = [_fmt(s[m]) for m, _ in TABLE_METRICS]
        n = sorted(set(s["n_cases"]))
        lines.append(f"| {e['label']} | " + " | ".join(cells) + f" | {_fmt(s['warm_auc'])} | "
                     f"{len(s['seeds'])} | {'/'.join(map(str, n))} |")
    notes = [f"- {e['label']}: {e['status']} — {e['reason']}" for e in results.values() if e["reason"]]
    for key, e in results.items():
        for seed, r in e["per_seed"].items():
            note = (r.get("info") or {}).get("note")
            if note:
                notes.append(f"- {e['label']} (seed {seed}): {note}")
        if e.get("skipped_seeds") and e["per_seed"]:
            notes.append(f"- {e['label']}: seeds {', '.join(map(str, e['skipped_seeds']))} not scored: "
                         f"{next(iter(e['skipped_seeds'].values()))}")
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", "warm AUC: AUC over test users whose target was seen in training (cold targets "
              "are items no training sequence contains; ID-only models score them all the same)."]
    sub = common_subset(results)
    if sub:
        lines += ["", f"## All rows on the same {sub['users_per_seed']} test users (seeds "
                  f"{', '.join(map(str, sub['seeds']))})", "",
                  "| Row | " + " | ".join(lbl for _, lbl in TABLE_METRICS) + " |",
                  "|---|" + "---|" * len(TABLE_METRICS)]
        for key, r in sub["rows"].items():
            lines.append(f"| {results[key]['label']} | " + " | ".join(_fmt(r[m]) for m, _ in TABLE_METRICS) + " |")
    (eval_dir / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    with open(eval_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "label", "seed", "status", "n_cases", *CSV_METRICS, "cold_targets"])
        for key, e in results.items():
            if not e["per_seed"]:
                w.writerow([key, e["label"], "", e["status"], "", *[""] * len(CSV_METRICS), ""])
            for seed in sorted(e["per_seed"]):
                r = e["per_seed"][seed]
                w.writerow([key, e["label"], seed, "ok", r["n_cases"],
                            *[r["metrics"].get(m, "") for m in CSV_METRICS], r["metrics"].get("cold_targets", "")])

    payload = {"dataset": _dataset_fingerprint(ds), "protocol": ctx.protocol.model_dump(), "seeds": seeds,
               "baseline_config": ctx.baseline_cfg.model_dump(), "users": ctx.users,
               "rows": {k: {"label": e["label"], "kind": e["kind"], "status": e["status"], "reason": e["reason"], "skipped_seeds": e.get("skipped_seeds", {}),
                            "block_size": e["block_size"], "summary": summary.get(k),
                            "per_seed": {str(s): {"metrics": r["metrics"], "n_cases": r["n_cases"],
                                                  "info": r.get("info"), "split": r.get("split")}
                                         for s, r in sorted(e["per_seed"].items())}}
                        for k, e in results.items()},
               "common_subset": sub}
    (eval_dir / "results.json").write_text(json.dumps(payload, indent=1, default=float), encoding="utf-8")
    _plots(eval_dir, results, summary, ds.name)


def plot_files(results: dict, summary: dict) -> list[str]:
    names = [f"plot_{m.replace('@', '')}.png" for m, _ in TABLE_METRICS]
    if any(results[k]["block_size"] and k in summary for k in results):
        names.append("block_size.png")
    return names


def _plots(eval_dir: Path, results: dict, summary: dict, ds_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in results if k in summary]
    for m, lbl in TABLE_METRICS:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(keys) + 1.5), 3.6))
        means = [summary[k][m]["mean"] for k in keys]
        cis = [summary[k][m]["ci"] for k in keys]
        colours = ["#8c8c8c" if results[k]["kind"] == "baseline" else "#3b75af" for k in keys]
        ax.bar(range(len(keys)), means, yerr=cis, capsize=4, color=colours)
        ax.set_xticks(range(len(keys)), [results[k]["label"] for k in keys], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(lbl)
        if m == "auc":
            ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_title(f"{lbl} on {ds_name} (mean ± 95% CI over seeds)", fontsize=9)
        fig.tight_layout()
        fig.savefig(eval_dir / f"plot_{m.replace('@', '')}.png", dpi=110)
        plt.close(fig)
    blocks = sorted((results[k]["block_size"], k) for k in keys if results[k]["block_size"])
    if blocks:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        for m, lbl in TABLE_METRICS[:2]:
            ax.errorbar([b for b, _ in blocks], [summary[k][m]["mean"] for _, k in blocks],
                        yerr=[summary[k][m]["ci"] for _, k in blocks], marker="o", capsize=3, label=lbl)
        ax.set_xlabel("block size (items per recurrent step)")
        ax.set_xticks([b for b, _ in blocks])
        ax.legend()
        ax.set_title(f"Block size sweep on {ds_name}", fontsize=9)
        fig.tight_layout()
        fig.savefig(eval_dir / "block_size.png", dpi=110)
        plt.close(fig)


# --------------------------------------------------------------------------- CLI

def register(app) -> None:
    """Add the ``eval`` command to the ``msr`` typer app."""
    import typer

    from mllm_msr import cli

    @app.command("eval")
    def eval_cmd(config: Optional[Path] = cli.ConfigOpt, set_: Optional[List[str]] = cli.SetOpt,
                 dataset: Optional[str] = typer.Option(None, help="synth | ml-100k | a dataset folder (default: the config's)."),
                 rows: str = typer.Option(",".join(DEFAULT_ROWS), help=f"Comma-separated rows or groups. Rows: {', '.join(ROWS)}. Groups: {', '.join(GROUPS)}."),
                 seeds: int = typer.Option(3, help="Protocol seeds protocol.seed, +1, … (baseline rows)."),
                 llm_seeds: int = typer.Option(1, help="How many of those seeds the LLM rows run (each is a full pipeline run)."),
                 users: Optional[int] = typer.Option(None, help="Cap on test users for the LLM rows (the table adds all rows on the shared users)."),
                 out: Optional[Path] = typer.Option(None, help="Output folder (default: run_dir); results go to OUT/eval/."),
                 baseline: Optional[List[str]] = typer.Option(None, "--baseline", "-b", help="Baseline setting key=value (repeatable), e.g. epochs=40."),
                 quiet: bool = typer.Option(False, help="No progress bars.")) -> None:
        """The paper's main table (form): baselines and LLM rows on the same splits, seeds, 95% CIs."""
        import yaml

        cfg = cli._cfg(config, set_)
        if dataset:
            cfg = cfg.model_copy(update={"dataset": dataset})
        try:
            row_keys = parse_rows(rows)
            bvals = {}
            for b in baseline or []:
                k, _, v = b.partition("=")
                bvals[k.strip()] = yaml.safe_load(v)
            bcfg = BaselineConfig(**bvals)
        except ValueError as e:
            cli.console.print(f"[red]{e}[/]")
            raise typer.Exit(2)
        out_dir = Path(out or cfg.run_dir)
        from mllm_msr.pipeline import load_data

        with cli.run_lock(out_dir / "eval"):
            ds = load_data(cfg)
            ctx = EvalContext(dataset=ds, protocol=cfg.protocol, out_dir=out_dir, baseline_cfg=bcfg,
                              msr_cfg=cfg, users=users, llm_seeds=llm_seeds, show_progress=not quiet)
            seed_list = [cfg.protocol.seed + k for k in range(max(1, seeds))]
            run_eval(ctx, row_keys, seed_list)
        cli.console.print((out_dir / "eval" / "table.md").read_text(encoding="utf-8"), markup=False, highlight=False)
        cli.console.print(f"results in {out_dir / 'eval'}: table.md, results.csv, results.json, plot_*.png")
