"""The pipeline's state for one user. Summaries themselves live in Chroma, not in the state, so
checkpoints stay small; the state carries ids, the current preference summary and the ranking."""
from __future__ import annotations

import operator
from typing import Annotated, TypedDict


class RankedItem(TypedDict):
    item_id: str
    title: str
    score: float


class RecState(TypedDict, total=False):
    user_id: str
    history: list[str]                 # item ids, chronological
    history_timestamps: list[float]
    candidates: list[str]              # empty/missing: retrieval fills it
    feedback: str                      # a chat message to fold into the summary (chat graph)
    user_summary: str
    summary_step: int
    summary_key: str
    ranking: list[RankedItem]
    events: Annotated[list[dict], operator.add]  # node-level progress a UI can show
