"""Prompt workbench: run two prompt folders on the same users and compare metrics with paired CIs.

Each side is a full pipeline run (item summaries → memory → scoring) whose prompts come from its
folder; every summary is cached in Chroma under its prompt version, so prompts the two sides share
are computed once, and re-running a comparison is cheap.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from mllm_msr.config import MSRConfig
from mllm_msr.data.protocol import EvalCase
from mllm_msr.hashing import sha256_hex
from mllm_msr.metrics import USER_METRICS, user_bootstrap
from mllm_msr.pipeline import Services, run_cases
from mllm_msr.prompting import PROMPT_DIR, list_prompts, load_prompt


def complete_prompt_dir(folder: str | Path, work: Path) -> Path:
    """A folder holding every packaged prompt, overridden by the files in ``folder`` (so a prompt
    engineer's folder may contain just the prompts they changed)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise ValueError(f"{folder}: no prompt files (*.yaml)")
    digest = sha256_hex(b"".join(f.name.encode() + f.read_bytes() for f in files), 12)
    out = work / f"prompts-{digest}"
    if not out.exists():
        tmp = work / f".prompts-{digest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in list_prompts():
            shutil.copy(PROMPT_DIR / f"{name}.yaml", tmp / f"{name}.yaml")
        for f in files:
            shutil.copy(f, tmp / f.name)
        for name in list_prompts(tmp):
            load_prompt(name, tmp)  # validate before spending model time
        tmp.rename(out)
    return out


def with_prompts(cfg: MSRConfig, prompt_dir: Path) -> MSRConfig:
    d = str(prompt_dir)
    return cfg.model_copy(update={
        "items": cfg.items.model_copy(update={"prompt_dir": d}),
        "memory": cfg.memory.model_copy(update={"prompt_dir": d}),
        "recommender": cfg.recommender.model_copy(update={"prompt_dir": d}),
    })


def compare(services_for, cases: Sequence[EvalCase], dir_a: Path, dir_b: Path, work: Path,
            show_progress: bool = True) -> dict:
    """``services_for(prompt_dir) -> Services``; returns per-metric paired differences (B - A)."""
    results, rows = {}, {}
    for side, d in (("A", dir_a), ("B", dir_b)):
        s: Services = services_for(d)
        res = run_cases(s, cases, work / f"run-{d.name}", show_progress=show_progress)
        results[side] = {k: v for k, v in res.items() if k != "rows"}
        rows[side] = [r["scores"] for r in res["rows"]]
    # the one paired interval of the project: users resampled, both sides recomputed on them
    boot = user_bootstrap(cases, rows["B"], other=rows["A"])
    diffs = {m: {"A": boot[m]["value"] - boot[m]["diff"]["value"], "B": boot[m]["value"],
                 "diff": boot[m]["diff"]["value"], "low": boot[m]["diff"]["low"],
                 "high": boot[m]["diff"]["high"], "p_le_zero": boot[m]["diff"]["p_le_zero"]}
             for m in USER_METRICS}
    return {"users": len(cases), "A": results["A"]["metrics"], "B": results["B"]["metrics"],
            "diff_b_minus_a": diffs,
            "model_calls": {"A": results["A"]["model_calls"], "B": results["B"]["model_calls"]}}
