"""Item summarizer: cover image description (MLLM) + text summary (LLM), fused into one summary.

Three prompts as the paper describes; the fusion step keeps the image description as its own input
so long text cannot drown the visual features. Model outputs are stored neutralised (no chat control
tokens or image placeholders), so injected item text cannot smuggle them downstream. Every summary
is looked up in the store first by (content hash of image + text, prompt versions, model ids); only
misses reach a model, in batches, and each batch is written to the store before the next starts (an
interrupted run loses at most one batch of work).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from mllm_msr.data.schema import Item
from mllm_msr.hashing import digest
from mllm_msr.models.base import ModelBackend
from mllm_msr.prompting import Prompt, load_prompt, neutralise
from mllm_msr.stores.summaries import ItemSummary, SummaryStore, file_digest

# Bump when the code that renders prompt values changes, so cached summaries are recomputed.
SUMMARIZER_VERSION = 2


class ItemSummarizerConfig(BaseModel):
    """How items are summarised."""

    use_images: bool = Field(True,
        description="Describe cover images with the MLLM (off = the 'without image summaries' ablation).")
    fuse: bool = Field(True,
        description="Fuse image description and text summary with a third prompt (paper); off = concatenate.")
    batch_size: int = Field(16, description="Items per model batch (also the unit written to the store).")
    image_tokens: int = Field(24, description="Max new tokens for an image description.")
    text_tokens: int = Field(24, description="Max new tokens for a text summary.")
    fuse_tokens: int = Field(40, description="Max new tokens for the fused summary.")
    prompt_dir: str | None = Field(None, description="Folder of prompt files (default: the packaged prompts/).")


@dataclass
class ItemSummarizer:
    mllm: ModelBackend
    llm: ModelBackend
    store: SummaryStore
    cfg: ItemSummarizerConfig

    def __post_init__(self) -> None:
        d = self.cfg.prompt_dir
        self.p_image: Prompt = load_prompt("item_image", d)
        self.p_text: Prompt = load_prompt("item_text", d)
        self.p_fuse: Prompt = load_prompt("item_fuse", d)
        self.model_calls = 0

    def key(self, item: Item) -> str:
        with_image = self.cfg.use_images and item.image_path is not None
        return digest("item", SUMMARIZER_VERSION, file_digest(item.image_path) if with_image else None,
                      item.title, item.text,
                      self.p_image.version if with_image else None, self.p_text.version,
                      self.p_fuse.version if (with_image and self.cfg.fuse) else None,
                      self.mllm.model_id if with_image else None, self.llm.model_id)

    def summarize(self, items: Sequence[Item],
                  progress: Callable[[int], None] | None = None) -> dict[str, ItemSummary]:
        """Summaries for ``items`` (by item id), computing only what the store lacks."""
        unique = list({it.item_id: it for it in items}.values())
        keys = {it.item_id: self.key(it) for it in unique}
        cached = self.store.get_items(list(keys.values()))
        out = {iid: cached[k] for iid, k in keys.items() if k in cached}
        if progress and out:
            progress(len(out))
        # Batches are fixed chunks of the full list, not of the misses: a run resumed after a kill
        # recomputes exactly the chunk it lost with the same batch-mates, so padding-dependent
        # numerics (and hence greedy outputs) are identical to an uninterrupted run.
        bs = max(1, self.cfg.batch_size)
        for start in range(0, len(unique), bs):
            chunk = [it for it in unique[start:start + bs] if it.item_id not in out]
            if not chunk:
                continue
            done = self._summarize_batch(chunk, keys)
            self.store.put_items(done)
            out.update({s.item_id: s for s in done})
            if progress:
                progress(len(chunk))
        return out

    def _summarize_batch(self, chunk: list[Item], keys: dict[str, str]) -> list[ItemSummary]:
        imaged = [it for it in chunk if self.cfg.use_images and it.image_path is not None]
        descs: dict[str, str] = {}
        if imaged:
            outs = self.mllm.generate([self.p_image.request(it.image_path) for it in imaged],
                                      max_new_tokens=self.cfg.image_tokens, **self.p_image.decoding)
            self.model_calls += len(imaged)
            descs = {it.item_id: neutralise(o) for it, o in zip(imaged, outs, strict=True)}
        texts = self.llm.generate([self.p_text.request(title=it.title, text=it.text or "none")
                                   for it in chunk], max_new_tokens=self.cfg.text_tokens, **self.p_text.decoding)
        self.model_calls += len(chunk)
        text_sum = {it.item_id: neutralise(o) for it, o in zip(chunk, texts, strict=True)}
        fused: dict[str, str] = {}
        if imaged and self.cfg.fuse:
            outs = self.llm.generate([self.p_fuse.request(title=it.title, image_description=descs[it.item_id],
                                                          text_summary=text_sum[it.item_id]) for it in imaged],
                                     max_new_tokens=self.cfg.fuse_tokens, **self.p_fuse.decoding)
            self.model_calls += len(imaged)
            fused = {it.item_id: neutralise(o) for it, o in zip(imaged, outs, strict=True)}
        result = []
        for it in chunk:
            d, t = descs.get(it.item_id, ""), text_sum[it.item_id]
            summary = fused.get(it.item_id) or " ".join(x for x in (d, t) if x)
            # The title is kept with every summary: a small model may drop it, and it is not secret.
            title = neutralise(it.title, 200)
            if title and title.lower() not in summary.lower():
                summary = f"{title}. {summary}"
            result.append(ItemSummary(it.item_id, keys[it.item_id], summary, d, t))
        return result
