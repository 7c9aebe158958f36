"""Recurrent user memory: the preference summary rewritten block by block (paper Sec. 3.3).

The history is read in chronological blocks (default 3 items); each block's prompt gets the previous
summary. Every version is stored with its user, step, covered items, prompt version and model id,
under a key derived from everything it was computed from. So a longer history re-uses all complete
earlier blocks: one new interaction costs at most one block update, whatever the history length.
"direct" mode summarises the whole history in one call (the paper's no-recurrence ablation).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from mllm_msr.data.schema import Item
from mllm_msr.hashing import digest, omit_at_default
from mllm_msr.models.base import ChatRequest, ModelBackend
from mllm_msr.prompting import load_prompt, neutralise, render_items
from mllm_msr.stores.summaries import ItemSummary, SummaryStore, UserSummaryVersion

EMPTY_SUMMARY = "Nothing yet: this is the user's first block of items."


class MemoryConfig(BaseModel):
    """How user preference summaries are built."""

    mode: Literal["recurrent", "direct"] = Field("recurrent",
        description="recurrent = block by block (paper); direct = whole history at once (ablation).")
    block_size: int = Field(3, ge=1, description="Items per block in recurrent mode (paper default 3).")
    max_new_tokens: int = Field(60, description="Max new tokens per summary.")
    adapter: str | None = Field("auto", description="LoRA adapter (name in generator.adapters) the memory writes "
                                "with; null = the base model; auto = the shipped 'memory' adapter for the "
                                "embedded default (trained by `msr finetune memory`), else the base model.")
    prompt_dir: str | None = Field(None, description="Folder of prompt files (default: the packaged prompts/).")
    item_titles: bool = Field(True, description="Show each history item to the memory as 'title: summary' (true) "
                              "or as its summary alone (false; the paper's user summarizer reads item "
                              "summaries). Left out of the dump when true, so earlier cache keys stay valid.")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        return omit_at_default(handler(self), self, "item_titles")


@dataclass(frozen=True)
class UserHistory:
    user_id: str
    items: tuple[str, ...]        # chronological item ids
    timestamps: tuple[float, ...]


def blocks_of(n: int, size: int) -> list[tuple[int, int]]:
    """Block boundaries [start, end) over a history of n items; fixed from the start of history."""
    return [(s, min(n, s + size)) for s in range(0, n, size)]


@dataclass
class UserMemory:
    llm: ModelBackend
    store: SummaryStore
    cfg: MemoryConfig
    adapter_sha256: str | None = None  # weights hash of cfg.adapter (part of every version's key)

    def __post_init__(self) -> None:
        self.p_block = load_prompt("user_block", self.cfg.prompt_dir)
        self.p_direct = load_prompt("user_direct", self.cfg.prompt_dir)
        self.p_feedback = load_prompt("user_feedback", self.cfg.prompt_dir)
        self.model_calls = 0
        # "auto" is resolved by the pipeline's finalize_config; unresolved it means the base model
        self.adapter = None if self.cfg.adapter in (None, "auto") else self.cfg.adapter

    def _lines(self, ids: Sequence[str], catalog: Mapping[str, Item],
               summaries: Mapping[str, ItemSummary]) -> str:
        if self.cfg.item_titles:
            return render_items([(catalog[i].title, summaries[i].summary) for i in ids])
        return render_items([summaries[i].summary for i in ids])

    def update_many(self, histories: Sequence[UserHistory], catalog: Mapping[str, Item],
                    summaries: Mapping[str, ItemSummary],
                    progress: Callable[[int], None] | None = None) -> dict[str, UserSummaryVersion]:
        """Latest summary version per user; all users' step-b blocks go to the model as one batch."""
        if self.cfg.mode == "direct":
            return self._direct(histories, catalog, summaries, progress)
        return {uid: vs[-1] for uid, vs in self.chains(histories, catalog, summaries, progress).items() if vs}

    def block_request(self, previous: UserSummaryVersion | None, block: Sequence[str],
                      catalog: Mapping[str, Item], summaries: Mapping[str, ItemSummary]) -> ChatRequest:
        """The prompt of one recurrent step: the previous summary and the block's items."""
        return self.p_block.request(adapter=self.adapter,
                                    previous_summary=previous.summary if previous is not None else EMPTY_SUMMARY,
                                    items=self._lines(block, catalog, summaries))

    def chains(self, histories: Sequence[UserHistory], catalog: Mapping[str, Item],
               summaries: Mapping[str, ItemSummary],
               progress: Callable[[int], None] | None = None) -> dict[str, list[UserSummaryVersion]]:
        """Every recurrent version per user, oldest first (version b covers blocks 0..b)."""
        chain: dict[str, list[UserSummaryVersion]] = {h.user_id: [] for h in histories}
        latest: dict[str, UserSummaryVersion | None] = {h.user_id: None for h in histories}
        plans = {h.user_id: blocks_of(len(h.items), self.cfg.block_size) for h in histories}
        by_user = {h.user_id: h for h in histories}
        n_steps = max((len(p) for p in plans.values()), default=0)
        for step in range(n_steps):
            todo: list[tuple[str, str, tuple[str, ...], float]] = []
            for uid, plan in plans.items():
                if step >= len(plan):
                    continue
                h, (s, e) = by_user[uid], plan[step]
                prev = latest[uid]
                block = h.items[s:e]
                key = digest("user", uid, prev.key if prev else None, [summaries[i].key for i in block],
                             self.p_block.version, self.llm.model_id, *self._version_key())
                hit = self.store.get_user_version(key)
                if hit is not None:
                    latest[uid] = hit
                    chain[uid].append(hit)
                    if progress:
                        progress(1)
                else:
                    todo.append((uid, key, block, h.timestamps[e - 1] if h.timestamps else float(e)))
            if not todo:
                continue
            reqs = [self.block_request(latest[uid], block, catalog, summaries) for uid, _, block, _ in todo]
            outs = self.llm.generate(reqs, max_new_tokens=self.cfg.max_new_tokens, **self.p_block.decoding)
            self.model_calls += len(reqs)
            new = []
            for (uid, key, block, ts), text in zip(todo, outs, strict=True):
                prev = latest[uid]
                covered = (prev.covered if prev else ()) + tuple(block)
                v = UserSummaryVersion(uid, step, key, neutralise(text), covered, ts, self.p_block.version,
                                       self.llm.model_id)
                latest[uid] = v
                chain[uid].append(v)
                new.append(v)
            self.store.put_user_versions(new)  # written per step: an interruption keeps finished steps
            if progress:
                progress(len(new))
        return chain

    def _version_key(self) -> tuple[str, ...]:
        """What a stored version depends on beyond prompt and model: the memory adapter's weights and
        how items are shown (nothing for the base model with titles shown, so versions written
        before these settings existed stay valid)."""
        rendering = () if self.cfg.item_titles else ("summaries-only",)  # how items are shown
        if self.adapter is None:
            return rendering
        return (self.adapter, self.adapter_sha256 or "", *rendering)

    def _direct(self, histories: Sequence[UserHistory], catalog: Mapping[str, Item],
                summaries: Mapping[str, ItemSummary],
                progress: Callable[[int], None] | None) -> dict[str, UserSummaryVersion]:
        out: dict[str, UserSummaryVersion] = {}
        todo = []
        for h in histories:
            if not h.items:
                continue
            key = digest("user-direct", h.user_id, [summaries[i].key for i in h.items],
                         self.p_direct.version, self.llm.model_id, *self._version_key())
            hit = self.store.get_user_version(key)
            if hit is not None:
                out[h.user_id] = hit
            else:
                todo.append((h, key))
        if todo:
            outs = self.llm.generate([self.p_direct.request(adapter=self.adapter,
                                                            items=self._lines(h.items, catalog, summaries))
                                      for h, _ in todo], max_new_tokens=self.cfg.max_new_tokens,
                                     **self.p_direct.decoding)
            self.model_calls += len(todo)
            new = [UserSummaryVersion(h.user_id, 0, key, neutralise(text), tuple(h.items),
                                      h.timestamps[-1] if h.timestamps else float(len(h.items)),
                                      self.p_direct.version, self.llm.model_id)
                   for (h, key), text in zip(todo, outs, strict=True)]
            self.store.put_user_versions(new)
            out.update({v.user_id: v for v in new})
        if progress:
            progress(len(histories))
        return out

    def fold_feedback(self, current: UserSummaryVersion | None, user_id: str,
                      feedback: str) -> UserSummaryVersion:
        """A chat message becomes a new stored summary version (source='feedback')."""
        prev_text = current.summary if current else EMPTY_SUMMARY
        # the base model: the memory adapter is trained on block updates, not on chat feedback
        text = self.llm.generate([self.p_feedback.request(previous_summary=prev_text, feedback=feedback)],
                                 max_new_tokens=self.cfg.max_new_tokens, **self.p_feedback.decoding)[0]
        text = neutralise(text)
        self.model_calls += 1
        step = (current.step + 1) if current else 0
        key = digest("user-feedback", user_id, current.key if current else None, feedback,
                     self.p_feedback.version, self.llm.model_id, time.time())
        v = UserSummaryVersion(user_id, step, key, text, current.covered if current else (), time.time(),
                               self.p_feedback.version, self.llm.model_id, source="feedback")
        self.store.put_user_versions([v])
        return v
