"""`msr eval`, the reporting half: intervals, paired differences, result files, README tables.

Every figure is computed from the per-user records of one protocol seed (all rows on the same
users and candidates): the value, a percentile bootstrap 95% interval over users (pooled AUC
recomputed on each resample), and each row's **paired** difference to MLLM-MSR (the same resampled
users for both rows). Warm targets (seen in training) and cold targets (items no training sequence
contains) are reported apart as well as together.

``results.json`` is the machine-readable result; :func:`render_tables` turns it into the Markdown
tables that :func:`update_readme` writes between ``<!-- results:NAME -->`` markers, so the README
is regenerated from committed files by one command (``msr report``) and a test can compare them.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllm_msr.evaluation.fidelity import STAGES
from mllm_msr.evaluation.rows import REFERENCE_ROW, ROWS
from mllm_msr.metrics import user_bootstrap

TABLE_METRICS: tuple[tuple[str, str], ...] = (("auc", "AUC"), ("hr@5", "HR@5"), ("mrr@5", "MRR@5"),
                                             ("ndcg@5", "NDCG@5"))
SUBSETS = ("all", "warm", "cold")


class _Case:
    """Enough of an EvalCase (labels, candidates) to recompute metrics from a stored record."""

    def __init__(self, d: dict):
        self.user_id, self.candidates, self.labels = d["user_id"], tuple(d["candidates"]), tuple(d["labels"])


def _subset(cases: list[dict], which: str) -> list[dict]:
    if which == "all":
        return cases
    return [c for c in cases if bool(c.get("cold")) == (which == "cold")]


def row_stats(cases: list[dict], reference: list[dict] | None, n_resamples: int = 2000) -> dict[str, Any]:
    """Per subset (all / warm / cold): users, and per metric value + interval (+ paired difference
    to ``reference``, matched by user and candidates)."""
    out: dict[str, Any] = {}
    ref = {(c["user_id"], tuple(c["candidates"])): c for c in reference} if reference is not None else None
    for which in SUBSETS:
        sub = _subset(cases, which)
        if ref is not None:
            sub = [c for c in sub if (c["user_id"], tuple(c["candidates"])) in ref]
        if not sub:
            continue
        other = [ref[(c["user_id"], tuple(c["candidates"]))]["scores"] for c in sub] if ref is not None else None
        out[which] = user_bootstrap([_Case(c) for c in sub], [c["scores"] for c in sub], other,
                                    metrics=[m for m, _ in TABLE_METRICS], n_resamples=n_resamples)
    return out


def build_results(results: dict[str, dict], seed: int, meta: dict[str, Any], n_resamples: int = 2000) -> dict:
    """The machine-readable result of one evaluation (``results.json``); rows in the order of ``ROWS``."""
    ref_entry = results.get(REFERENCE_ROW)
    ref_cases = ref_entry["per_seed"][seed]["cases"] if ref_entry and seed in ref_entry["per_seed"] else None
    order = {k: i for i, k in enumerate(ROWS)}
    rows: dict[str, Any] = {}
    for key, e in sorted(results.items(), key=lambda kv: order.get(kv[0], len(order))):
        r = e["per_seed"].get(seed)
        row: dict[str, Any] = {"label": e["label"], "kind": e["kind"], "sees": e["sees"], "status": e["status"],
                               "reason": e["reason"], "block_size": e["block_size"]}
        if r is not None:
            paired = ref_cases if (ref_cases is not None and key != REFERENCE_ROW) else None
            row.update({"test": row_stats(r["cases"], paired, n_resamples), "valid": r.get("valid_metrics"),
                        "config": r.get("config"), "adapter_sha256": r.get("adapter_sha256"),
                        "info": r.get("info"), "split": r.get("split"), "n_cases": r["n_cases"],
                        "command": r.get("command")})
        rows[key] = row
    return {**meta, "seed": seed, "reference_row": REFERENCE_ROW, "rows": rows}


def probe_stats(cases: list[dict], probe: list[list[float]], n_resamples: int = 2000) -> dict[str, Any]:
    """The text-match probe's AUC on a row's stored cases, and its paired difference to the row's
    own scores (probe − recommender, same resampled users)."""
    boot = user_bootstrap([_Case(c) for c in cases], probe, [c["scores"] for c in cases], metrics=["auc"],
                          n_resamples=n_resamples)
    return {"users": len(cases), "auc": boot["auc"]}


def write_results(payload: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float) + "\n", encoding="utf-8")
    tmp.replace(path)
    (folder / "table.md").write_text(render_tables(payload), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- tables

def _ci(e: dict | None) -> str:
    if not e or e.get("value") is None or math.isnan(e["value"]):
        return "–"
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def _diff(e: dict | None) -> str:
    d = (e or {}).get("diff")
    if not d:
        return "–"
    return f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def render_tables(payload: dict) -> str:
    """Markdown: the main table (all targets), warm/cold AUC with paired differences, and what each
    row sees. Deterministic in ``payload`` (the README test regenerates and compares it)."""
    rows = payload["rows"]
    ds = payload.get("dataset", {})
    lines = [f"Dataset `{ds.get('name', '?')}` (fingerprint `{ds.get('digest', '?')}`), protocol seed "
             f"{payload['seed']}: every row on the same {payload.get('test_users', '?')} test users × "
             f"{payload.get('candidates', '?')} candidates (1 positive : {payload.get('negatives', '?')} negatives). "
             "Cells: value [95% bootstrap interval over users]; Δ = paired difference to MLLM-MSR "
             "(same resampled users). Validation AUC: the first "
             f"{payload.get('valid_users', '?')} validation users, same protocol.", "",
             "| Row | AUC | Δ AUC vs MLLM-MSR | HR@5 | MRR@5 | NDCG@5 | valid AUC |",
             "|---|---|---|---|---|---|---|"]
    for _key, r in rows.items():
        if "test" not in r:
            lines.append(f"| {r['label']} | – | – | – | – | – | {r['status']}: {r['reason']} |")
            continue
        a = r["test"]["all"]
        v = (r.get("valid") or {}).get("auc")
        valid = f"{v:.3f}" if v is not None else "–"
        lines.append(f"| {r['label']} | {_ci(a['auc'])} | {_diff(a['auc'])} | {_ci(a['hr@5'])} | "
                     f"{_ci(a['mrr@5'])} | {_ci(a['ndcg@5'])} | {valid} |")
    lines += ["", "| Row | warm users | warm AUC | Δ warm vs MLLM-MSR | cold users | cold AUC | Δ cold vs MLLM-MSR |",
              "|---|---|---|---|---|---|---|"]
    for _key, r in rows.items():
        if "test" not in r:
            continue
        w, c = r["test"].get("warm"), r["test"].get("cold")
        nw = int(w["users"]["value"]) if w else 0
        nc = int(c["users"]["value"]) if c else 0
        lines.append(f"| {r['label']} | {nw} | {_ci(w['auc']) if w else '–'} | {_diff(w['auc']) if w else '–'} | "
                     f"{nc} | {_ci(c['auc']) if c else '–'} | {_diff(c['auc']) if c else '–'} |")
    lines += ["", "| Row | what the model sees |", "|---|---|"]
    lines += [f"| {r['label']} | {r['sees']} |" for r in rows.values()]
    lines += render_commands(rows)
    fid = payload.get("fidelity")
    if fid:
        lines += ["", render_fidelity(fid)]
    probe = payload.get("probe")
    if probe:
        lines += ["", render_probe(probe, rows)]
    return "\n".join(lines) + "\n"


def render_probe(probe: dict, rows: dict) -> str:
    """The text-match probe per LLM row: what the preference text carries vs what the recommender used."""
    lines = ["Text-match probe (ground truth read only here): each candidate scored by how many of its true "
             "colour, pattern, shape and genre the row's preference text names; Δ = probe − the row's "
             "recommender, paired over the same users.", "",
             "| Row | users | probe AUC | recommender AUC | Δ probe − recommender |", "|---|---|---|---|---|"]
    for key, p in probe.items():
        model = rows.get(key, {}).get("test", {}).get("all", {}).get("auc")
        lines.append(f"| {p['label']} | {p['users']} | {_ci(p['auc'])} | {_ci(model)} | {_diff(p['auc'])} |")
    return "\n".join(lines)


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render_commands(rows: dict[str, dict]) -> list[str]:
    """How each row was produced: the command that computed its record, rows grouped by command
    (nothing for results written before rows recorded their command)."""
    groups: dict[str, list[str]] = {}
    for r in rows.values():
        if "test" in r:
            groups.setdefault(r.get("command") or "", []).append(r["label"])
    if not any(groups):
        return []
    lines = ["", "How each row was produced (rerunning the command with the same `--results` reuses the row's "
             "committed per-user records, `rows/<row>/<seed>.json.gz`, while its settings are unchanged):", ""]
    lines += [f"* {', '.join(labels)}: {_code(cmd) if cmd else 'not recorded'}" for cmd, labels in groups.items()]
    return lines


def render_fidelity(fid: dict) -> str:
    """The memory-fidelity diagnostic as a Markdown table (shares per stage and attribute)."""
    attrs = ("colour", "pattern", "shape", "genre")
    lines = ["| stage (share naming the true value) | n | " + " | ".join(attrs) + " |",
             "|---|---|" + "---|" * len(attrs)]
    rank = {s: i for i, s in enumerate(STAGES)}
    for stage, d in sorted(fid.items(), key=lambda kv: rank.get(kv[0], len(rank))):
        cells = [f"{d[a]:.0%}" if d.get(a) is not None else "–" for a in attrs]
        lines.append(f"| {stage} | {d['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


MARK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def update_readme(readme: Path, tables: dict[str, str], check: bool = False) -> list[str]:
    """Replace each ``<!-- results:NAME -->…<!-- /results -->`` block with ``tables[NAME]``.
    Returns the names whose text changed (``check``: compare only, write nothing)."""
    text = readme.read_text(encoding="utf-8")
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in tables:
            return m.group(0)
        body = tables[name] if tables[name].endswith("\n") else tables[name] + "\n"
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    new = MARK.sub(sub, text)
    if not check and new != text:
        readme.write_text(new, encoding="utf-8")
    return changed


def render_run(m: dict) -> str:
    """The main job's committed result (``results/run/metrics.json``, written by a real `msr run`)."""
    k = m["metrics"]
    t, c = m.get("timings_s", {}), m.get("model_calls", {})
    return "\n".join([
        "| test users | AUC [95% CI over users] | HR@5 | MRR@5 | NDCG@5 | wall time "
        "| item / user summaries, scored pairs |",
        "|---|---|---|---|---|---|---|",
        f"| {m['users']} | {k['auc']:.3f} [{k['auc_ci95_low']:.3f}, {k['auc_ci95_high']:.3f}] | {k['hr@5']:.3f} | "
        f"{k['mrr@5']:.3f} | {k['ndcg@5']:.3f} | {t.get('total_s', float('nan')) / 60:.1f} min (items "
        f"{t.get('items_s', 0):.0f} s, users {t.get('users_s', 0):.0f} s, scoring {t.get('scoring_s', 0):.0f} s) | "
        f"{c.get('item_summaries')} / {c.get('user_summaries')}, {c.get('scored_pairs')} |",
        "", f"Run on {m.get('date', '?')} ({m.get('machine', '?')}): `{m.get('command', 'msr run')}`."]) + "\n"


def render_adapters(weights: Path) -> str:
    """The shipped adapters, from their committed ``PROVENANCE.json`` files."""
    lines = ["| adapter | trained with | train examples (users) | steps | training time | validation: before → "
             "with the adapter (users) |", "|---|---|---|---|---|---|"]
    for f in sorted(weights.glob("*/PROVENANCE.json")):
        if not (f.parent / "adapter_config.json").is_file():
            continue  # not a LoRA adapter (e.g. the vision tower)
        p = json.loads(f.read_text(encoding="utf-8"))
        d, tr = p.get("data", {}), p.get("training", {})
        if "selection" in p:  # the user memory's adapter (expert iteration)
            b, a = p["valid"]["base"], p["valid"]["adapter"]
            fid = "".join(f", {k} named {b['fidelity'][k]:.0%} → **{a['fidelity'][k]:.0%}**"
                          for k in ("colour", "pattern", "genre") if "fidelity" in b and "fidelity" in a)
            valid = (f"next-item retrieval AUC {b['retrieval_auc']:.3f} → **{a['retrieval_auc']:.3f}**{fid} "
                     f"({a['users']})")
            examples = f"{p['selection']['kept']} kept of {p['selection']['prompts']} ({len(d['train_user_ids'])})"
        else:
            zs, ad = (p.get("valid_zero_shot") or {}).get("metrics"), (p.get("valid_adapter") or {}).get("metrics")
            pairwise = (tr.get("eval") or {}).get("auc")
            valid = (f"AUC (1:20) {zs['auc']:.3f} → **{ad['auc']:.3f}** ({int(ad['n_cases'])})" if zs and ad
                     else f"AUC (1:20) zero-shot not run → **{ad['auc']:.3f}** ({int(ad['n_cases'])})" if ad
                     else f"not recorded (pairwise 1:1 valid AUC {pairwise:.3f})" if pairwise is not None else "–")
            examples = f"{d.get('sft_train_examples', '?')} ({d.get('sft_train_users', '?')})"
        lines.append(f"| `{f.parent.name}` | `{p.get('command', '?')}` | {examples} | {tr.get('global_step', '?')} | "
                     f"{tr.get('wall_s', float('nan')) / 60:.0f} min | {valid} |")
    return "\n".join(lines) + "\n"


def committed_tables(results_root: Path, weights: Path | None = None) -> dict[str, str]:
    """NAME → table for every committed result file: ``results/<NAME>/results.json`` (eval),
    ``results/run/metrics.json`` (the main job) and the shipped adapters' provenance."""
    out: dict[str, str] = {}
    for f in sorted(results_root.glob("*/results.json")):
        out[f"eval.{f.parent.name}"] = render_tables(json.loads(f.read_text(encoding="utf-8")))
    run = results_root / "run" / "metrics.json"
    if run.is_file():
        out["run"] = render_run(json.loads(run.read_text(encoding="utf-8")))
    from mllm_msr.pipeline import WEIGHTS

    out["adapters"] = render_adapters(weights or WEIGHTS)
    return out


def plots(payload: dict, folder: Path, names: Sequence[str] = ("auc",)) -> list[Path]:
    """Bar chart of AUC with its interval per row, and the block-size curve when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = {k: r for k, r in payload["rows"].items() if "test" in r}
    written = []
    for m in names:
        keys = list(rows)
        fig, ax = plt.subplots(figsize=(max(4.0, 1.0 * len(keys) + 1.5), 3.6))
        vals = [rows[k]["test"]["all"][m] for k in keys]
        err = [[v["value"] - v["low"] for v in vals], [v["high"] - v["value"] for v in vals]]
        colours = ["#8c8c8c" if rows[k]["kind"] == "baseline" else "#3b75af" for k in keys]
        ax.bar(range(len(keys)), [v["value"] for v in vals], yerr=err, capsize=4, color=colours)
        ax.set_xticks(range(len(keys)), [rows[k]["label"] for k in keys], rotation=30, ha="right", fontsize=7)
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_title(f"{m.upper()} on {payload.get('dataset', {}).get('name', '')} "
                     f"({payload.get('test_users')} test users, 95% bootstrap CI)", fontsize=9)
        fig.tight_layout()
        p = folder / f"eval_{m.replace('@', '')}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    blocks = sorted((r["block_size"], k) for k, r in rows.items() if r.get("block_size"))
    if blocks:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        v = [rows[k]["test"]["all"]["auc"] for _, k in blocks]
        ax.errorbar([b for b, _ in blocks], [x["value"] for x in v],
                    yerr=[[x["value"] - x["low"] for x in v], [x["high"] - x["value"] for x in v]],
                    marker="o", capsize=3)
        ax.set_xlabel("block size (items per recurrent step)")
        ax.set_ylabel("AUC")
        ax.set_xticks([b for b, _ in blocks])
        fig.tight_layout()
        p = folder / "eval_block_size.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
