"""Helpers shared by the bench scripts (run as `python bench/<script>.py`, so this folder is on sys.path)."""
from __future__ import annotations

import json
from pathlib import Path


def model_path(spec: str, work: Path) -> Path:
    """'embedded' (default composite), 'tiny' (random tiny Idefics3, built here) or a folder."""
    if spec == "tiny":
        from mllm_msr.models.embedded import build_tiny_idefics3

        return build_tiny_idefics3(work / "tiny")
    if spec == "embedded":
        from mllm_msr.models.embedded import ensure_default_model

        return Path(ensure_default_model())
    return Path(spec)


def write_result(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row) + "\n")
    print(f"results -> {out}")
