"""Choose the summary prompts on VALIDATION users: how much of the bundled benchmark's hidden
attributes each link of the chain keeps (image description → fused item summary → final user
summary), for each prompt folder, on the same users. Ground truth is read only here (evaluation).

    .venv/bin/python scripts/prompt_fidelity.py results/prompt_selection/prose prompts \
        --users 100 --out results/prompt_selection/fidelity.json

A folder may hold only the prompts it changes (the rest come from the packaged ``prompts/``).
Item summaries and user summaries are cached in the store (``--set store.path=...``) like any run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="Prompt folders to compare.")
    ap.add_argument("--users", type=int, default=100, help="First N validation users of the split.")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="MSRConfig override key.sub=value.")
    ap.add_argument("--out", type=Path, default=None, help="Write the JSON result here.")
    args = ap.parse_args(argv)

    from mllm_msr.config import MSRConfig, apply_overrides
    from mllm_msr.data.protocol import build_splits
    from mllm_msr.data.synth import default_benchmark_dir
    from mllm_msr.evaluation.fidelity import chain_fidelity, degeneration
    from mllm_msr.evaluation.prompt_eval import complete_prompt_dir, with_prompts
    from mllm_msr.pipeline import build_services, load_data, make_backends, summarize_cases
    from mllm_msr.stores.summaries import SummaryStore

    cfg = apply_overrides(MSRConfig(), args.sets)
    if cfg.dataset != "synth":
        ap.error("fidelity needs the bundled benchmark's ground truth (dataset=synth)")
    ds = load_data(cfg)
    cases = build_splits(ds, cfg.protocol).valid[:args.users]
    gen, scorer = make_backends(cfg)
    store = SummaryStore(cfg.store)
    work = Path(cfg.run_dir) / "prompt-fidelity"
    out: dict = {"what": "memory-fidelity of each prompt folder on validation users (bundled benchmark)",
                 "date": datetime.now(UTC).isoformat(timespec="seconds"),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
                 "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
                 "users": len(cases), "split": "valid", "folders": {}}
    for folder in args.folders:
        d = complete_prompt_dir(folder, work)
        s = build_services(with_prompts(cfg, d), ds, generator=gen, scorer=scorer, store=store)
        t0 = time.perf_counter()
        sums, latest = summarize_cases(s, cases)
        fid = chain_fidelity(default_benchmark_dir(cfg.synth), {i: v.image_description for i, v in sums.items()},
                             {i: v.summary for i, v in sums.items()}, {u: v.summary for u, v in latest.items()})
        examples = {c.user_id: latest[c.user_id].summary for c in cases[:3]}
        fid["final user summary (loops, cut by the token limit)"] = degeneration(v.summary for v in latest.values())
        out["folders"][str(folder)] = {"fidelity": fid, "wall_s": round(time.perf_counter() - t0, 1),
                                       "example_user_summaries": examples}
        print(folder, json.dumps(fid))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    gen.close()
    scorer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
