"""The one interface every model backend implements.

Nodes never know which backend they have. A request is a chat in OpenAI's message shape whose
content parts are ``{"type": "text", "text": ...}`` or ``{"type": "image", "path": ...}`` (a
local file; backends turn it into a data URL, ``multi_modal_data`` or processor pixels).
"""
from __future__ import annotations

import base64
import mimetypes
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

YES_NO = ("yes", "no")
T = TypeVar("T")


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to complete. ``messages``: [{"role", "content": str | list[part]}]."""

    messages: tuple[dict[str, Any], ...]
    adapter: str | None = None  # LoRA adapter name (scoring), None = base model

    @staticmethod
    def user(parts: Sequence[dict[str, Any]] | str, system: str | None = None,
             adapter: str | None = None, prefill: str | None = None) -> ChatRequest:
        """A one-turn chat; ``prefill`` starts the assistant's answer (the model continues it)."""
        msgs: list[dict[str, Any]] = []
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": parts if isinstance(parts, str) else list(parts)})
        if prefill:
            msgs.append({"role": "assistant", "content": prefill})
        return ChatRequest(tuple(msgs), adapter)

    @property
    def user_content(self) -> str | list[dict[str, Any]]:
        """The content of the last user message (a prefilled answer may follow it)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def prefill(self) -> str | None:
        """The start of the answer when the chat ends with an assistant message: backends render
        it without an end-of-turn (``continue_final_message``) and the model continues it."""
        last = self.messages[-1] if self.messages else None
        if last and last["role"] == "assistant" and isinstance(last["content"], str):
            return str(last["content"])
        return None

    def completed(self, continuation: str) -> str:
        """The whole answer: the prefill (if any) followed by what the model generated."""
        return ((self.prefill or "") + continuation).strip()

    def image_paths(self) -> list[Path]:
        out: list[Path] = []
        map_content(self, text=lambda t: None, image=out.append)
        return out


def penalties(frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> dict[str, float]:
    """The OpenAI-style penalties that are set (non-zero), as keyword arguments or API fields:
    backends and prompts pass only these, so a model that takes none is never sent them."""
    return {k: float(v) for k, v in (("frequency_penalty", frequency_penalty),
                                     ("presence_penalty", presence_penalty)) if v}


class BackendError(RuntimeError):
    """A model call failed after retries; the message names what was being processed."""


class ModelBackend(ABC):
    """generate (text or multimodal chats, batched) and score p(yes)/(p(yes)+p(no))."""

    model_id: str = "unknown"
    supports_images: bool = False

    @abstractmethod
    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 96,
                 temperature: float = 0.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0) -> list[str]:
        """Complete each chat; greedy when temperature == 0. The penalties follow OpenAI's
        definition over the tokens generated so far (not the prompt): each candidate token's logit
        is lowered by ``frequency_penalty`` times its count plus ``presence_penalty`` if it occurred."""

    @abstractmethod
    def score_yes_no(self, requests: Sequence[ChatRequest]) -> list[float]:
        """p(yes) / (p(yes) + p(no)) for the first answer token of each chat (one forward pass)."""

    def close(self) -> None:  # noqa: B027  # pragma: no cover - default no-op
        """Release processes / memory."""


def image_data_url(path: str | Path) -> str:
    """A base64 data URL for a local image (what OpenAI-compatible servers accept)."""
    p = Path(path)
    mime = mimetypes.guess_type(p.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode()}"


def map_content(req: ChatRequest, *, text: Callable[[str], T], image: Callable[[Path], T]
                ) -> list[tuple[str, str | list[T]]]:
    """THE content-part walker: each message as ``(role, content)``, a string content unchanged,
    a list of parts mapped in order by ``text(part_text)`` / ``image(local_path)``. Every
    backend's message conversion goes through here; an unknown part type raises ValueError."""
    out: list[tuple[str, str | list[T]]] = []
    for m in req.messages:
        c = m["content"]
        if isinstance(c, str):
            out.append((m["role"], c))
            continue
        parts: list[T] = []
        for p in c:
            if p["type"] == "text":
                parts.append(text(p["text"]))
            elif p["type"] == "image":
                parts.append(image(Path(p["path"])))
            else:
                raise ValueError(f"unknown content part type {p['type']!r}")
        out.append((m["role"], parts))
    return out


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def to_openai_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """Our parts → OpenAI chat parts (images as data URLs)."""
    return [{"role": role, "content": content} for role, content in map_content(
        req, text=text_part,
        image=lambda p: {"type": "image_url", "image_url": {"url": image_data_url(p)}})]


def yes_no_probability(logp_yes: float, logp_no: float) -> float:
    """Normalise two log-probabilities into p(yes)/(p(yes)+p(no)), stably."""
    import math

    m = max(logp_yes, logp_no)
    a, b = math.exp(logp_yes - m), math.exp(logp_no - m)
    return a / (a + b)
