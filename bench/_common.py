"""Helpers shared by the bench scripts (run as `python bench/<script>.py`, so this folder is on sys.path)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
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


def bench_setup(spec: str, sets: Sequence[str], prefix: str):
    """(work folder, --set list, config, dataset) of a bench that runs the pipeline: a fresh
    temporary folder, the model ``spec`` ('embedded' = the config's own) and the dataset, built
    before anything is measured."""
    import tempfile

    from mllm_msr.config import load_config
    from mllm_msr.pipeline import load_data

    work = Path(tempfile.mkdtemp(prefix=prefix))
    sets = list(sets)
    if spec != "embedded":
        p = model_path(spec, work)
        sets += [f"generator.model={p}", f"scorer.model={p}"]
    cfg = load_config(None, sets)
    return work, sets, cfg, load_data(cfg)


def machine() -> dict:
    """When and under what load a result was measured (1/5/15-minute load averages, cores)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}


def write_result(out: Path, row: dict) -> None:
    """One JSON line with the result, stamped with :func:`machine` (date, load average at the end)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**row, **machine()}) + "\n")
    print(f"results -> {out} (load average {os.getloadavg()[0]:.2f})")


def ranking(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def parity(ref: Sequence[Sequence[float]], other: Sequence[Sequence[float]], k: int = 5) -> dict:
    """Per-user score lists against reference ones: max |Δp|, fraction of users with the same
    top-k (as a set, in order) and the same full ranking."""
    pairs = list(zip(ref, other, strict=True))
    dp = max((abs(a - b) for r, o in pairs for a, b in zip(r, o, strict=True)), default=0.0)
    return {"max_abs_dp": float(f"{dp:.3g}"),
            "same_top5": sum(ranking(r)[:k] == ranking(o)[:k] for r, o in pairs) / max(len(pairs), 1),
            "same_ranking": sum(ranking(r) == ranking(o) for r, o in pairs) / max(len(pairs), 1)}


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


def user_contexts(n: int) -> list[str]:
    """n different preference texts in the shape of :data:`CONTEXT` (one per bench "user")."""
    colours = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
    genres = ("fantasy film", "mystery novel", "western film", "science fiction story", "comedy")
    patterns = ("striped", "dotted", "plain")
    return [f"The user appears to have a preference for {patterns[k % 3]} {colours[k % 8]} covers and "
            f"{genres[(k // 3) % 5]}s. " + CONTEXT for k in range(n)]


def recommend_requests(items, context: str = CONTEXT, adapter: str | None = None):
    """The recommender's own requests (packaged ``recommend`` prompt) for one user's candidates."""
    from mllm_msr.agents.recommender import Recommender, RecommenderConfig

    rec = Recommender(None, RecommenderConfig(adapter=None))  # only builds requests
    return [rec.request(context, it, adapter) for it in items]
