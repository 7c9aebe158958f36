"""Scripted fakes shared by the pipeline, chat and web tests."""
from __future__ import annotations

import itertools

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from mllm_msr.models.base import ChatRequest, ModelBackend
from mllm_msr.models.factory import LangChainChatBackend


class CountingChat(ModelBackend):
    """Scripted LangChain fake chat models, one per prompt role, behind LangChainChatBackend.

    Replies are routed by the prompt's role (image description, text summary, fusion, user summary),
    so assertions do not depend on call order; every prompt is recorded.
    """

    model_id = "fake-chat"
    ROLES = {"image": "A striped red star.", "text": "A mystery story.", "fuse": "A red star mystery.",
             "user": "The user appears to have a preference for red mystery items."}

    def __init__(self):
        self.backends = {role: LangChainChatBackend(GenericFakeChatModel(
            messages=itertools.cycle([AIMessage(reply)]))) for role, reply in self.ROLES.items()}
        self.prompts: list[ChatRequest] = []
        self.decoding: list[dict] = []  # the keyword arguments of every generate call

    @staticmethod
    def role(req: ChatRequest) -> str:
        text = " ".join(p.get("text", "") for p in req.user_content) \
            if isinstance(req.user_content, list) else req.user_content
        if req.image_paths():
            return "image"
        if "Image:" in text or "Cover:" in text:
            return "fuse"
        return "user" if "user" in text.lower() else "text"

    def generate(self, requests, **kw):
        self.prompts += list(requests)
        self.decoding.append(kw)
        return [self.backends[self.role(r)].generate([r], **kw)[0] for r in requests]

    def score_yes_no(self, requests):  # pragma: no cover - generation only
        raise NotImplementedError


class OverlapScorer(ModelBackend):
    """p(yes) = share of title words present in the summary (deterministic, prompt-driven)."""

    model_id = "overlap"

    def generate(self, requests, **kw):  # pragma: no cover - not a generator
        raise NotImplementedError

    def score_yes_no(self, requests):
        out = []
        for r in requests:
            text = " ".join(p.get("text", "") for p in r.user_content).lower()
            summary = text.split("<data>")[1].split("</data>")[0]  # the preference text comes first
            title = text.split("candidate item title:")[1].split("</data>")[0].replace("<data>", "")
            words = [w for w in title.replace(":", " ").split() if len(w) > 3]
            out.append((sum(w in summary for w in words) + 0.5) / (len(words) + 1))
        return out
