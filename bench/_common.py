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


# A representative preference text as the pipeline builds it (Recommender.context: the recurrent
# summary, then the latest 3 item summaries), taken from a run on the bundled benchmark (~90 tokens,
# the median of the SFT set).
CONTEXT = (
    "The user appears to have a preference for a particular style of fantasy film, with a focus on "
    "a dark and mysterious atmosphere. Recently liked: Village and the Burning Forest: fantasy. A "
    "striped blue square on a light background. | A fantasy film: The Hidden Labyrinth. The Hidden "
    "Labyrinth is a fantasy film with a dark and mysterious atmosphere. The cover is a dark and "
    "mysterious ring on a light background. | Northern Letter, a fantasy story. The cover of the "
    "item is a striped black star on a light background.")


def recommend_requests(items):
    """The recommender's own requests (packaged ``recommend`` prompt) for one user's candidates."""
    from mllm_msr.agents.recommender import Recommender, RecommenderConfig

    rec = Recommender(None, RecommenderConfig(adapter=None))  # only builds requests
    return [rec.request(CONTEXT, it) for it in items]
