"""A backend for OpenAI-compatible chat servers (vLLM's above all), over one or several endpoints.

Scoring never parses free text: it asks for ONE token with log-probabilities and normalises
p(yes)/(p(yes)+p(no)) from the first token's log-probs.

* When the yes/no token ids are known (``yes_token_id``/``no_token_id``, resolved from a local
  model folder by ``make_backend`` / ``ManagedVLLMServer.backend``), the request carries vLLM's
  ``logprob_token_ids=[yes, no]`` (exact log-probs of exactly those tokens, vLLM ≥ 0.2x) with
  ``return_tokens_as_token_ids`` so they are matched by id.
* Otherwise (a remote server, model folder unknown) it asks for ``top_logprobs`` (20 by default)
  and matches the token strings exactly against the answer words. **Upper-bound rule:** if one of
  yes/no is missing from the top-k, its log-prob is at most the smallest top-k log-prob, so that
  value is used for it (if both are missing the score is 0.5). With a fine-tuned recommender both
  words sit at the top, so the bound only matters for untrained models.

Several endpoints (replicas serving the same model): each request goes to the endpoint with the
fewest requests in flight (round robin among ties). An endpoint that refuses or drops a
connection is marked down for ``cooldown_s`` and the request fails over at once to a live one;
other transient failures (timeouts, 429/5xx, malformed or empty responses) are retried with
exponential backoff. A request gets at most ``max_retries + len(endpoints)`` attempts (each
endpoint may die once on top of the retry budget); then ``BackendError`` names the request and,
when every endpoint is down, lists each one's last error.

Adapters: a request's model name is its adapter name (vLLM ``--lora-modules name=path``).
API keys are read from the environment only and never logged.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import openai

from .base import YES_NO, BackendError, ChatRequest, ModelBackend, penalties, to_openai_messages, yes_no_probability

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Malformed(Exception):
    """A response without the fields we need (retried like a transient failure)."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (_Malformed, openai.APIConnectionError, openai.APITimeoutError,
                        openai.InternalServerError, openai.RateLimitError, httpx.TransportError,
                        TimeoutError, ConnectionError, json.JSONDecodeError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in (408, 409, 429)
    if isinstance(exc, (ValueError, KeyError, TypeError, AttributeError, IndexError)):
        return True  # malformed body the client could not parse
    return False


def _endpoint_dead(exc: BaseException) -> bool:
    """The endpoint could not be reached or dropped the connection (not a slow or bad answer)."""
    if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException, TimeoutError)):
        return False
    return isinstance(exc, (openai.APIConnectionError, httpx.TransportError, ConnectionError))


@dataclass
class Endpoint:
    """One server of the pool and what the pool knows about it."""

    url: str
    client: Any  # openai.OpenAI
    in_flight: int = 0
    down_until: float = 0.0
    last_error: str = ""
    requests: int = 0
    failures: int = 0


class EndpointPool:
    """Least-busy endpoint choice (round robin among ties) with down-marking; thread safe."""

    def __init__(self, endpoints: Sequence[Endpoint], cooldown_s: float) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.endpoints = list(endpoints)
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._turn = 0

    def __len__(self) -> int:
        return len(self.endpoints)

    def acquire(self, avoid: Endpoint | None = None) -> Endpoint:
        """The live endpoint with the fewest requests in flight (not ``avoid`` unless it is the
        only live one); when all are down, the one whose cooldown ends first (a probe)."""
        with self._lock:
            now = time.monotonic()
            live = [e for e in self.endpoints if e.down_until <= now]
            pick = [e for e in live if e is not avoid] or live
            if pick:
                n = len(self.endpoints)
                self._turn += 1
                ep = min(pick, key=lambda e: (e.in_flight,
                                              (self.endpoints.index(e) - self._turn) % n))
            else:
                ep = min(self.endpoints, key=lambda e: e.down_until)
            ep.in_flight += 1
            ep.requests += 1
            return ep

    def release(self, ep: Endpoint, error: BaseException | None = None, *,
                dead: bool = False) -> None:
        with self._lock:
            ep.in_flight -= 1
            if error is not None:
                ep.failures += 1
                ep.last_error = f"{type(error).__name__}: {error}"
                if dead:
                    ep.down_until = time.monotonic() + self.cooldown_s
            elif ep.down_until:  # it answered: it is up again
                ep.down_until = 0.0

    def revive(self, url: str) -> None:
        """Mark ``url`` up (its server was just restarted)."""
        with self._lock:
            for e in self.endpoints:
                if e.url == url:
                    e.down_until = 0.0

    def any_live(self) -> bool:
        now = time.monotonic()
        return any(e.down_until <= now for e in self.endpoints)

    def describe_down(self) -> str:
        return "; ".join(f"{e.url} ({e.last_error or 'no answer'})" for e in self.endpoints)


class VLLMServerBackend(ModelBackend):
    """Any OpenAI-compatible chat server (vLLM's above all), one or several replicas.

    ``base_url``: one URL (…/v1) or a list of replicas serving the same model. ``labels``
    (optional, per request, on each call) name requests in errors; else the index.
    """

    supports_images = True

    def __init__(self, base_url: str | Sequence[str], model: str, *,
                 api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 3, backoff_s: float = 0.5,
                 cooldown_s: float = 10.0, top_logprobs: int = 20,
                 yes_token_id: int | None = None, no_token_id: int | None = None,
                 answer_words: tuple[str, str] = YES_NO) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(dict.fromkeys(base_url))
        self.base_urls = [u.rstrip("/") for u in urls]
        if not self.base_urls:
            raise BackendError("no server endpoint given")
        self.base_url = self.base_urls[0]
        self.model = model
        self.model_id = f"{model}@{','.join(sorted(self.base_urls))}"
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = backoff_s
        self.top_logprobs = int(top_logprobs)
        self.yes_token_id, self.no_token_id = yes_token_id, no_token_id
        self.answer_words = answer_words
        self.pool = EndpointPool([Endpoint(u, self._make_client(u)) for u in self.base_urls],
                                 cooldown_s)
        self._stats_lock = threading.Lock()
        self.stats: dict[str, float] = {"generate_calls": 0, "tokens_generated": 0,
                                        "score_calls": 0, "rows_scored": 0, "retries": 0,
                                        "failovers": 0}

    # -- plumbing
    def _make_client(self, url: str) -> openai.OpenAI:
        key = os.environ.get(self.api_key_env) or "EMPTY"  # vLLM without --api-key accepts any
        return openai.OpenAI(base_url=url, api_key=key, timeout=self.timeout, max_retries=0)

    def _count(self, key: str, n: float = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def _model_for(self, req: ChatRequest) -> str:
        return req.adapter or self.model

    @staticmethod
    def _label(i: int, labels: Sequence[str] | None) -> str:
        return f"request {labels[i]!r}" if labels is not None else f"request #{i}"

    def _before_request(self) -> None:
        """Hook run before every attempt (a managed server restarts a dead process here)."""

    def _call(self, fn: Callable[[Endpoint], T], what: str) -> T:
        """``fn(endpoint)`` with failover across endpoints and bounded, backed-off retries."""
        attempts = self.max_retries + len(self.pool)
        delay = self.backoff_s
        last: Endpoint | None = None
        for attempt in range(attempts):
            self._before_request()
            ep = self.pool.acquire(avoid=last)
            try:
                result = fn(ep)
            except Exception as exc:  # noqa: BLE001 - classified below
                dead = _endpoint_dead(exc)
                self.pool.release(ep, exc, dead=dead)
                if not _retryable(exc):
                    raise BackendError(f"{what} failed ({self.model}@{ep.url}): "
                                       f"{type(exc).__name__}: {exc}") from exc
                if attempt == attempts - 1:
                    raise self._exhausted(what, attempts, exc) from exc
                last = ep
                self._count("retries")
                if dead and self.pool.any_live():
                    self._count("failovers")
                    log.warning("%s: %s unreachable (%s), failing over", what, ep.url,
                                type(exc).__name__)
                    continue
                log.warning("%s: %s from %s (attempt %d/%d), retrying in %.2fs", what,
                            type(exc).__name__, ep.url, attempt + 1, attempts, delay)
                time.sleep(delay)
                delay *= 2
                continue
            self.pool.release(ep)
            return result
        raise AssertionError("unreachable")

    def _exhausted(self, what: str, attempts: int, exc: BaseException) -> BackendError:
        if not self.pool.any_live():
            n = len(self.pool)
            where = "the endpoint is down" if n == 1 else f"all {n} endpoints are down"
            return BackendError(f"{what} failed after {attempts} attempts ({self.model}): "
                                f"{where}: {self.pool.describe_down()}")
        return BackendError(f"{what} failed after {attempts} attempts ({self.model_id}): "
                            f"{type(exc).__name__}: {exc}")

    def _map(self, fn: Callable[[int], T], n: int) -> list[T]:
        if n <= 1 or self.max_concurrency == 1:
            return [fn(i) for i in range(n)]
        with ThreadPoolExecutor(min(self.max_concurrency, n)) as ex:
            return list(ex.map(fn, range(n)))

    # -- generate
    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 96,
                 temperature: float = 0.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 labels: Sequence[str] | None = None) -> list[str]:
        self._count("generate_calls")

        def one(i: int) -> str:
            req = requests[i]
            kw: dict[str, Any] = dict(model=self._model_for(req), messages=to_openai_messages(req),
                                      max_tokens=max_new_tokens, temperature=float(temperature))
            kw.update(penalties(frequency_penalty, presence_penalty))
            if req.prefill is not None:  # vLLM's chat API continues the final assistant message
                kw["extra_body"] = {"add_generation_prompt": False, "continue_final_message": True}
            return self._call(lambda ep: req.completed(self._text(ep.client.chat.completions.create(**kw),
                                                                  strip=False)),
                              f"generate {self._label(i, labels)}")

        return self._map(one, len(requests))

    def _text(self, resp: Any, strip: bool = True) -> str:
        try:
            content = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as exc:
            raise _Malformed(f"no message in response: {exc}") from exc
        if not isinstance(content, str):
            raise _Malformed(f"no text content in {type(resp).__name__}")
        usage = getattr(resp, "usage", None)
        self._count("tokens_generated", int(getattr(usage, "completion_tokens", 0) or 0))
        return content.strip() if strip else content

    # -- score
    def score_yes_no(self, requests: Sequence[ChatRequest], *,
                     labels: Sequence[str] | None = None) -> list[float]:
        self._count("score_calls")
        self._count("rows_scored", len(requests))

        def one(i: int) -> float:
            return self._call(lambda ep: self._score_one(ep, requests[i]),
                              f"score {self._label(i, labels)}")

        return self._map(one, len(requests))

    def _score_one(self, ep: Endpoint, req: ChatRequest) -> float:
        exact = self.yes_token_id is not None and self.no_token_id is not None
        kw: dict[str, Any] = dict(model=self._model_for(req), messages=to_openai_messages(req),
                                  max_tokens=1, temperature=0, logprobs=True)
        if exact:
            kw["extra_body"] = {"logprob_token_ids": [self.yes_token_id, self.no_token_id],
                                "return_tokens_as_token_ids": True}
        else:
            kw["top_logprobs"] = self.top_logprobs
        resp = ep.client.chat.completions.create(**kw)
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
