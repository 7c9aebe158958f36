"""Recommender: p(yes) for (preference summary, candidate cover + title) from one forward pass.

All candidates of one user go to the backend in one call with the summary first, so backends can
share the prompt prefix (transformers reuses its KV cache; vLLM uses prefix caching).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from mllm_msr.data.schema import Item
from mllm_msr.models.base import ChatRequest, ModelBackend
from mllm_msr.prompting import load_prompt


class RecommenderConfig(BaseModel):
    """How candidates are scored."""

    use_images: bool = Field(True, description="Show the candidate's cover to the MLLM (off: title only).")
    adapter: str | None = Field("rec", description="LoRA adapter name to score with (None = base model, zero-shot).")
    recent_items: int = Field(0, ge=0,
        description="Extension beyond the paper: also show the summaries of the user's last N history items after the"
                    " preference summary (0 = the paper's input exactly). The embedded 135M summarizer's preference "
                    "summaries often lose the concrete colours and genres (measured), so this extension is offered "
                    "and reported as its own evaluation row (MLLM-MSR + recent items); the default is the paper's "
                    "input.")
    history: Literal["summary", "titles"] = Field("summary",
        description="What the model reads about the user: 'summary' = MLLM-MSR (recurrent preference summary, plus "
                    "recent item summaries when recent_items > 0); 'titles' = TALLRec-style (the titles of the latest"
                    " history items, no summaries, no images of the history).")
    title_history: int = Field(10, ge=1,
        description="With history='titles': how many of the latest history titles are shown.")
    prompt: str = Field("recommend", description="Prompt file for candidates with an image.")
    text_prompt: str = Field("recommend_text", description="Prompt file for candidates without an image.")
    titles_prompt: str = Field("recommend_titles", description="Prompt file for history='titles' (TALLRec-style).")
    prompt_dir: str | None = Field(None, description="Folder of prompt files (default: the packaged prompts/).")


@dataclass
class Recommender:
    backend: ModelBackend
    cfg: RecommenderConfig

    def __post_init__(self) -> None:
        self.p_image = load_prompt(self.cfg.prompt, self.cfg.prompt_dir)
        self.p_text = load_prompt(self.cfg.text_prompt, self.cfg.prompt_dir)
        self.p_titles = load_prompt(self.cfg.titles_prompt, self.cfg.prompt_dir)
        self.model_calls = 0

    def context(self, user_summary: str, recent: Sequence[str] = ()) -> str:
        """The preference text shown to the model: the summary, then the last N items' summaries.

        One function for inference and fine-tuning, so both see the same text."""
        k = self.cfg.recent_items
        recent = [r for r in recent if r][-k:] if k else []
        if not recent:
            return user_summary
        return user_summary + " Recently liked: " + " | ".join(recent)

    def titles_context(self, history_titles: Sequence[str]) -> str:
        """TALLRec-style preference text: the latest ``title_history`` titles, oldest first."""
        return " | ".join(t for t in list(history_titles)[-self.cfg.title_history:] if t)

    def request(self, user_summary: str, item: Item, adapter: str | None = None) -> ChatRequest:
        """The one prompt used at training and at inference (finetune builds its data with this).

        ``user_summary`` is the preference text: :meth:`context` (summary mode) or
        :meth:`titles_context` (titles mode)."""
        if self.cfg.history == "titles":
            return self.p_titles.request(adapter=adapter, history=user_summary, title=item.title)
        if self.cfg.use_images and item.image_path is not None:
            return self.p_image.request(item.image_path, adapter=adapter, user_summary=user_summary,
                                        title=item.title)
        return self.p_text.request(adapter=adapter, user_summary=user_summary, title=item.title)

    def score(self, text: str, candidates: Sequence[Item]) -> list[float]:
        """p(yes) per candidate for the preference ``text`` (``mllm_msr.pipeline.Services.preference_text``
        builds it: :meth:`context` in summary mode, :meth:`titles_context` in titles mode)."""
        if not candidates:
            return []
        reqs = [self.request(text, it, self.cfg.adapter) for it in candidates]
        self.model_calls += len(reqs)
        return [float(s) for s in self.backend.score_yes_no(reqs)]

    def rank(self, text: str, candidates: Sequence[Item]) -> list[tuple[str, float]]:
        scores = self.score(text, candidates)
        return sorted(zip((c.item_id for c in candidates), scores, strict=True), key=lambda t: -t[1])
