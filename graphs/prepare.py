"""What one user needs before the first answer of ``msr chat`` / ``msr recommend`` / the web page:
the summaries of that user's history items (and of given candidates), then the user's recurrent
memory; never the whole catalog (catalog-wide summarization is ``msr run``'s job). Retrieval works
before the candidates have summaries (``agents.title_index``)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from mllm_msr.agents.user_memory import UserHistory, blocks_of
from mllm_msr.config import MSRConfig
from mllm_msr.models.factory import interactive
from mllm_msr.pipeline import Services
from mllm_msr.stores.summaries import UserSummaryVersion

Advance = Callable[[str, int, int], None]  # (step, n newly done, total)


def interactive_config(cfg: MSRConfig) -> MSRConfig:
    """The config as the one-user commands run it: each role on its ``interactive_backend``."""
    return cfg.model_copy(update={"generator": interactive(cfg.generator), "scorer": interactive(cfg.scorer)})


def prepare_user(s: Services, user_id: str, history: Sequence[str], timestamps: Sequence[float] = (),
                 candidates: Sequence[str] = (), advance: Advance | None = None) -> UserSummaryVersion | None:
    """Summaries of ``history`` + ``candidates`` (cached in the store), then the user's memory;
    returns the latest summary version (None: empty history). ``advance`` reports progress."""
    ids = list(dict.fromkeys([*history, *candidates]))
    items = s.items(ids, f"user {user_id}")
    summaries = s.summarizer.summarize(
        items, progress=(lambda n: advance("item summaries", n, len(ids))) if advance else None)
    ts = tuple(timestamps) if timestamps else tuple(float(i) for i in range(len(history)))
    blocks = len(blocks_of(len(history), s.memory.cfg.block_size))
    latest = s.memory.update_many([UserHistory(user_id, tuple(history), ts)], s.catalog, summaries,
                                  progress=(lambda n: advance("preference summary", n, blocks)) if advance else None)
    return latest.get(user_id)


def rich_advance(progress) -> Advance:
    """An :data:`Advance` that drives a ``rich.progress.Progress`` (one bar per step)."""
    tasks: dict[str, int] = {}

    def advance(step: str, n: int, total: int) -> None:
        if step not in tasks:
            tasks[step] = progress.add_task(step, total=total)
        progress.advance(tasks[step], n)
    return advance
