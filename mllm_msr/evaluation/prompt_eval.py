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
from mllm_msr.metrics import paired_bootstrap, per_case_metrics
from mllm_msr.pipeline import Services, run_cases
from mllm_msr.prompting import PROMPT_DIR, list_prompts, load_prompt

METRICS = ("user_auc", "hr@5", "mrr@5", "ndcg@5")


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
    results = {}
    per_case = {}
    for side, d in (("A", dir_a), ("B", dir_b)):
        s: Services = services_for(d)
        res = run_cases(s, cases, work / f"run-{d.name}", show_progress=show_progress)
        results[side] = {k: v for k, v in res.items() if k != "rows"}
        per_case[side] = per_case_metrics(cases, [r["scores"] for r in res["rows"]])
    diffs = {}
    for m in METRICS:
        a, b = per_case["A"][m], per_case["B"][m]
        pairs = [(x, y) for x, y in zip(a, b, strict=True) if x == x and y == y]  # drop NaN (single-class cases)
        if pairs:
            diffs[m] = {"A": sum(p[0] for p in pairs) / len(pairs), "B": sum(p[1] for p in pairs) / len(pairs),
                        **paired_bootstrap([p[1] for p in pairs], [p[0] for p in pairs])}
    return {"users": len(cases), "A": results["A"]["metrics"], "B": results["B"]["metrics"],
            "diff_b_minus_a": diffs,
            "model_calls": {"A": results["A"]["model_calls"], "B": results["B"]["model_calls"]}}
