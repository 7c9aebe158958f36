"""The rows of the main table: what each one is, and exactly what its model sees.

A row carries the paper's name only if it is the paper's method: "MLLM-MSR" reads the recurrent
preference summary plus the candidate's cover and title, nothing else. Every extension is a row of
its own ("MLLM-MSR + recent items"). LLM rows are config variants of the one pipeline
(:mod:`mllm_msr.pipeline`), baseline rows are ID models trained here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

BLOCK_SIZES = (1, 2, 3, 4, 6)
REFERENCE_ROW = "mllm_msr"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    kind: Literal["baseline", "llm"]
    sees: str
    baseline: str | None = None
    overrides: tuple[str, ...] = ()
    block_size: int | None = None


_PAPER_INPUT = "the recurrent preference summary + the candidate's cover and title"
ROWS: dict[str, Row] = {r.key: r for r in [
    Row("popularity", "Popularity", "baseline", "how often each item occurs in training sequences",
        baseline="popularity"),
    Row("gru4rec", "GRU4Rec", "baseline", "the IDs of the latest history items (up to protocol.max_history)",
        baseline="gru4rec"),
    Row("sasrec", "SASRec", "baseline", "the IDs of the latest history items (up to protocol.max_history)",
        baseline="sasrec"),
    Row("sasrec_image", "SASRec+image", "baseline", "history item IDs + pixel features of every cover",
        baseline="sasrec_image"),
    Row("zero_shot", "Zero-shot MLLM", "llm", f"{_PAPER_INPUT}; base model, no LoRA adapter",
        overrides=("recommender.adapter=null",)),
    Row("tallrec", "TALLRec-style (titles only)", "llm",
        "the titles of the latest 10 history items + the candidate's title (no summaries, no images)",
        overrides=("recommender.history=titles", "recommender.use_images=false", "recommender.adapter=tallrec")),
    Row("mllm_msr", "MLLM-MSR", "llm", f"{_PAPER_INPUT} (the paper's input exactly)"),
    Row("mllm_msr_recent", "MLLM-MSR + recent items (extension)", "llm",
        f"{_PAPER_INPUT} + the item summaries of the last 3 history items",
        overrides=("recommender.recent_items=3", "recommender.adapter=rec_recent")),
    Row("no_recurrence", "w/o recurrence", "llm",
        "one preference summary of the whole history written in a single call + the candidate's cover and title",
        overrides=("memory.mode=direct",)),
    Row("no_image_summaries", "w/o image summaries", "llm",
        "a preference summary built from text-only item summaries + the candidate's cover and title",
        overrides=("items.use_images=false",)),
    *[Row(f"block_{b}", f"MLLM-MSR, block size {b}", "llm", f"{_PAPER_INPUT}; memory blocks of {b} items",
          overrides=(f"memory.block_size={b}",), block_size=b) for b in BLOCK_SIZES],
]}
BASELINE_ROWS = ("popularity", "gru4rec", "sasrec", "sasrec_image")
LLM_ROWS = ("zero_shot", "tallrec", "mllm_msr", "mllm_msr_recent")
ABLATION_ROWS = ("no_recurrence", "no_image_summaries")
DEFAULT_ROWS = (*BASELINE_ROWS, "zero_shot", "mllm_msr")
GROUPS: dict[str, tuple[str, ...]] = {
    "baselines": BASELINE_ROWS, "llm": LLM_ROWS, "ablations": ABLATION_ROWS,
    "blocks": tuple(f"block_{b}" for b in BLOCK_SIZES), "default": DEFAULT_ROWS, "all": tuple(ROWS),
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
        for k in GROUPS.get(p, (p,)):
            if k not in ROWS:
                raise ValueError(f"unknown row {k!r}; rows: {', '.join(ROWS)}; groups: {', '.join(GROUPS)}")
            if k not in out:
                out.append(k)
    return out
