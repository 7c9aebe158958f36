"""The results table of bench/README.md, rendered from the committed files in bench/results/ only.

    python bench/report.py            # markdown table on stdout
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(row: dict) -> str:
    la = row.get("load_avg")
    return f"{la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f}" if la else "not recorded"


def _scoring(r: dict) -> str:
    v = r["variants"]
    parts = [f"{k} {x['median_s'] * 1000:.0f} ms"
             + (f" (max \\|Δp\\| {x['max_abs_dp']:.1e}, top-5 {x['same_top5']:.0%})" if "max_abs_dp" in x else "")
             for k, x in v.items()]
    return (f"{r['users']} users × {r['candidates']}: " + "; ".join(parts)
            + f" → fastest fp32 **{r['fastest_fp32']}** {r['ratio']}× naive")


def _pipeline(r: dict) -> str:
    b, o = r["baseline"]["timings_s"], r["ours"]["timings_s"]
    stages = ", ".join(f"{k} {b[k + '_s']:.0f}→{o[k + '_s']:.0f} s ({r['ratios'][k]}×)"
                       for k in ("items", "users", "scoring"))
    d = r["differences"]
    return (f"{r['users']} test users; {stages}; **total {b['total_s']:.0f}→{o['total_s']:.0f} s = {r['ratio']}×**; "
            f"AUC {r['baseline']['metrics']['auc']:.3f} vs {r['ours']['metrics']['auc']:.3f}; identical item / user "
            f"summaries {d['identical_item_summaries']:.0%} / {d['identical_user_summaries']:.0%}")


def _interactive(r: dict) -> str:
    return (f"chat fresh {r['chat_fresh_s']:.0f} s, next reply {r['chat_next_s']:.1f} s, "
            f"cached {r['chat_cached_s']:.1f} s; recommend fresh {r['recommend_fresh_s']:.0f} s, "
            f"cached {r['recommend_cached_s']:.1f} s")


def _memory(r: dict) -> str:
    return (f"{r['users']} test users, backend {r['backend']}: peak RSS (tree) **{r['peak_rss_gb']:.2f} GB**, "
            f"PSS {r['peak_pss_gb']:.2f} GB, {r['processes']} processes, {r['wall_s']:.0f} s")


def _summarize(r: dict) -> str:
    return ", ".join(f"{k} {v}×" for k, v in r.get("ratios", {}).items()) + f"; best {r.get('best')}"


def _feedback(r: dict) -> str:
    rc = r["rank_change"]
    return (f"{r['n_messages']} messages, {r['n_users']} users: **kept {r['kept']:.0%}** (ask {r['kept_ask']:.0%}, "
            f"ban dropped {r['dropped_ban']:.0%}; unchanged summary {r['before']['kept']:.0%}"
            + (f"; the model's own words, the user's quote removed: kept {mw['kept']:.0%}, ask {mw['kept_ask']:.0%}"
               if (mw := r.get("model_words")) else "")
            + "); mean rank change "
            f"ask {rc['ask']:+.2f}, ban {rc['ban']:+.2f}, other {rc['other']:+.2f}")


def _generic(r: dict) -> str:
    return f"ratio {r.get('ratio')}"


FORMAT = {"scoring": _scoring, "pipeline": _pipeline, "interactive": _interactive, "memory": _memory,
          "summarize": _summarize, "feedback": _feedback}


def main() -> int:
    print("| file | date (UTC) | load avg 1/5/15 min | measured | target met? |")
    print("|---|---|---|---|---|")
    for f in sorted(RESULTS.glob("*.json")):
        try:
            r = json.loads(f.read_text().splitlines()[-1])
        except (ValueError, IndexError):
            continue
        what = FORMAT.get(r.get("bench", ""), _generic)(r)
        met = r.get("met", r.get("fresh_met"))
        print(f"| `{f.name}` | {r.get('date', '?')} | {_load(r)} | {what} | {'?' if met is None else met} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
