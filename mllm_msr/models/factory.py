"""Backend configuration and construction, plus a wrapper for any LangChain chat model.

``make_backend(ModelConfig(backend="transformers" | "vllm" | "vllm-server", model=...))``:

* ``transformers`` — ``TransformersBackend`` in this process (peft adapters, prefix-shared
  scoring).
* ``vllm`` — ``VLLMInProcessBackend`` (``vllm.LLM``, LoRA requests, prefix caching).
* ``vllm-server`` — ``VLLMServerBackend``; with ``base_url`` / ``base_urls`` it connects to
  running OpenAI-compatible servers (several replicas: least-busy spread, failover), without
  one it starts and owns a ``ManagedVLLMServer`` (restarted when its process dies).

``model="embedded"`` is the default composite (``embedded.ensure_default_model()``); anything
else is a local HF folder (or, with ``base_url``, the served model name).
"""
from __future__ import annotations

import base64
import mimetypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import BackendError, ChatRequest, ModelBackend, map_content, penalties, text_part
from .devices import resolve_dtype


class ModelConfig(BaseModel):
    """Which model backend to build, and how."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    backend: Literal["transformers", "vllm", "vllm-server"] = Field(
        "transformers", description="transformers (in process), vllm (vllm.LLM in process) or "
        "vllm-server (OpenAI-compatible server: managed here, or `base_url`)")
    model: str = Field("embedded", description="'embedded' = the default Idefics3 composite "
                       "built from shipped weights; else a local HF folder (with base_url: the "
                       "served model name)")
    base_url: str | None = Field(None, description="connect to this running server (…/v1) "
                                 "instead of starting one; set to the first of `base_urls` "
                                 "when only those are given")
    base_urls: list[str] = Field(default_factory=list, description="several running replicas "
                                 "of the same model (…/v1 each): requests go to the least busy "
                                 "one and fail over to the others when one is down")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the "
                             "server's API key (never stored in configs)")
    dtype: str = Field("float32", description="weights dtype: float32 | bfloat16 | float16 | auto (bfloat16 "
                       "where the CPU has AMX / AVX512-BF16, see models/devices.py). float32 by default: "
                       "bench/results/bench_scoring.json measures what bf16 changes in the scores")
    max_concurrency: int = Field(8, ge=1, description="concurrent requests to a server")
    batch_size: int = Field(16, ge=1, description="rows per forward pass (transformers); batched generation "
                            "at 16 rows measured 6.8x the tokens/s of one at a time (bench/bench_summarize.py)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (transformers); "
                                "None = torch default")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters, "
                                     "name → peft folder; ChatRequest.adapter picks one")
    max_model_len: int = Field(2048, ge=64, description="context length (vLLM) / max prompt "
                               "tokens (transformers)")
    timeout: float = Field(120.0, gt=0, description="per-request timeout, seconds (server)")
    max_retries: int = Field(3, ge=0, description="retries on transient server failures")
    prefix_sharing: bool = Field(True, description="reuse a shared prompt prefix's KV cache "
                                 "when scoring (transformers)")
    interactive_backend: Literal["transformers", "vllm", "vllm-server"] | None = Field(
        "transformers", description="backend of the one-user commands (msr chat / recommend / web): "
        "they generate a few short summaries, where start-up dominates (transformers loads in ~1 s, "
        "an in-process vLLM engine in 20-60 s; bench/results/bench_interactive.json); None = `backend`. "
        "Ignored with base_url (a running server)")

    @model_validator(mode="after")
    def _first_endpoint(self) -> ModelConfig:
        if self.base_url is None and self.base_urls:
            self.base_url = self.base_urls[0]
        return self

    def endpoints(self) -> list[str]:
        """Every server URL configured (``base_url`` first), without repeats."""
        return list(dict.fromkeys(([self.base_url] if self.base_url else []) + self.base_urls))


def interactive(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` as the one-user commands run it (``interactive_backend``; same model id, so summaries
    cached by ``msr run`` are reused)."""
    if cfg.base_url or cfg.interactive_backend in (None, cfg.backend):
        return cfg
    return cfg.model_copy(update={"backend": cfg.interactive_backend})


def resolve_model_path(model: str) -> Path:
    if model == "embedded":
        from .embedded import ensure_default_model

        return Path(ensure_default_model())
    p = Path(model).expanduser()
    if not (p / "config.json").exists():
        raise BackendError(f"model {model!r} is neither 'embedded' nor an HF folder with config.json")
    return p


def make_backend(cfg: ModelConfig) -> ModelBackend:
    """Build the backend ``cfg`` describes."""
    if cfg.backend == "vllm-server" and cfg.base_url:
        from .openai_client import VLLMServerBackend

        kw: dict[str, Any] = {}
        local = Path(cfg.model).expanduser() if cfg.model != "embedded" else resolve_model_path(cfg.model)
        served = cfg.model if cfg.model != "embedded" else str(local)
        if (local / "config.json").exists():  # exact yes/no token ids from the local tokenizer
            from .hf_backend import answer_token_ids_for

            kw["yes_token_id"], kw["no_token_id"] = answer_token_ids_for(local)
        return VLLMServerBackend(cfg.endpoints(), served, api_key_env=cfg.api_key_env,
                                 max_concurrency=cfg.max_concurrency, timeout=cfg.timeout,
                                 max_retries=cfg.max_retries, **kw)
    path = resolve_model_path(cfg.model)
    cfg = cfg.model_copy(update={"dtype": resolve_dtype(cfg.dtype)})
    if cfg.backend == "transformers":
        from .hf_backend import TransformersBackend

        return TransformersBackend(path, cfg.adapters or None, dtype=cfg.dtype,
                                   batch_size=cfg.batch_size, threads=cfg.threads,
                                   max_length=cfg.max_model_len, prefix_sharing=cfg.prefix_sharing)
    if cfg.backend == "vllm":
        from .vllm_engine import VLLMInProcessBackend

        return VLLMInProcessBackend(path, cfg.adapters or None, dtype=cfg.dtype,
                                    max_model_len=cfg.max_model_len)
    from .vllm_server import ManagedServerBackend, ManagedVLLMServer

    server = ManagedVLLMServer(path, cfg.adapters or None, max_model_len=cfg.max_model_len,
                               dtype=cfg.dtype)
    return ManagedServerBackend(server, api_key_env=cfg.api_key_env,
                                max_concurrency=cfg.max_concurrency, timeout=cfg.timeout,
                                max_retries=cfg.max_retries)


# ============================================================================ any LangChain model
def to_langchain_messages(req: ChatRequest) -> list[Any]:
    """Our chat → LangChain messages with standard content blocks (images as base64 blocks)."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    kinds = {"system": SystemMessage, "user": HumanMessage, "human": HumanMessage,
             "assistant": AIMessage, "ai": AIMessage}
    def image(path: Path) -> dict[str, Any]:
        return {"type": "image", "base64": base64.b64encode(path.read_bytes()).decode(),
                "mime_type": mimetypes.guess_type(path.name)[0] or "image/png"}

    out = []
    for role, content in map_content(req, text=text_part, image=image):
        cls = kinds.get(role)
        if cls is None:
            raise ValueError(f"unknown role {role!r}")
        out.append(cls(content=content))
    return out


class LangChainChatBackend(ModelBackend):
    """Any LangChain ``BaseChatModel`` for the generating roles (item / user summarizers).

    Scoring needs first-token log-probabilities, which the generic chat interface does not
    expose: ``score_yes_no`` raises ``NotImplementedError`` (use a transformers or vLLM backend
    for the recommender)."""

    supports_images = True

    def __init__(self, chat_model: Any, *, max_concurrency: int = 4,
                 pass_max_tokens: bool = False) -> None:
        self.chat_model = chat_model
        self.model_id = f"langchain:{type(chat_model).__name__}"
        self.max_concurrency = max_concurrency
        self.pass_max_tokens = pass_max_tokens
        self.stats: dict[str, float] = {"generate_calls": 0, "tokens_generated": 0}

    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 96,
                 temperature: float = 0.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0) -> list[str]:
        self.stats["generate_calls"] += 1
        model = self.chat_model
        if self.pass_max_tokens:
            model = model.bind(max_tokens=max_new_tokens, temperature=temperature)
        if pen := penalties(frequency_penalty, presence_penalty):  # not every chat model takes them
            model = model.bind(**pen)
        inputs = [to_langchain_messages(r) for r in requests]
        results = model.batch(inputs, config={"max_concurrency": self.max_concurrency},
                              return_exceptions=True)
        out = []
        for i, r in enumerate(results):
            if isinstance(r, Exception):
                raise BackendError(f"generate request #{i} failed ({self.model_id}): "
                                   f"{type(r).__name__}: {r}") from r
            text = str(r.text) if hasattr(r, "text") else str(r.content)
            usage = getattr(r, "usage_metadata", None) or {}
            self.stats["tokens_generated"] += int(usage.get("output_tokens", 0) or 0)
            out.append(requests[i].completed(text))
        return out

    def score_yes_no(self, requests: Sequence[ChatRequest]) -> list[float]:
        raise NotImplementedError(
            f"{self.model_id}: a generic LangChain chat model exposes no first-token "
            "log-probabilities, so it cannot score yes/no; use backend 'transformers', 'vllm' or "
            "'vllm-server' for the recommender")
