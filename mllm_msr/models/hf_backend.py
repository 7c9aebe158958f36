"""In-process transformers (+ peft) backend: batched generation and yes/no scoring.

* ``generate``: greedy (or sampled) batched ``model.generate`` with LEFT padding; images go
  through the model's processor.
* ``score_yes_no``: ONE forward pass per batch with RIGHT padding (so every row sees the exact
  positions it would see alone), hidden state gathered at each row's last real token, the LM head
  applied only there, softmax restricted to the ``yes``/``no`` token ids.
* Prefix-shared scoring: requests whose rendered token sequences share a long common prefix (one
  user's instructions + preference summary, the 21 candidates only differing in the suffix) run
  the prefix once, reuse its KV cache (copied and repeated per chunk: a ``DynamicCache`` is
  mutated in place) and run all suffixes, images included, in one forward. Requests are grouped
  automatically (sorted token sequences, split where sharing no longer pays); prefixes are cut
  before the first image token, and short ones fall back to naive batched scoring. Results equal
  naive scoring to float rounding.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from .base import YES_NO, BackendError, ChatRequest, ModelBackend, map_content, text_part

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, _DTYPES[str(name).lower()])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(_DTYPES)}") from None


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def is_multimodal_folder(model_path: str | Path) -> bool:
    """True when the HF folder's config has a vision tower (image-text-to-text model)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_path))
    return getattr(cfg, "vision_config", None) is not None


ANSWER_PROBE = "Answer yes or no."


def resolve_answer_token_ids(tokenizer, prompt: str, words: tuple[str, str] = YES_NO
                             ) -> tuple[int, int]:
    """The first token the assistant emits when answering ``words[0]`` / ``words[1]`` right after
    the rendered generation ``prompt`` (tokenised in context, so BPE merges at the boundary are
    respected: the token a completion-only fine-tuning puts its loss on)."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for word in words:
        full = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
        if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
            out.append(int(full[len(p_ids)]))
        else:  # tokenisation merged across the boundary: fall back to the bare word
            out.append(int(tokenizer(word, add_special_tokens=False)["input_ids"][0]))
    if out[0] == out[1]:
        raise BackendError(f"answer words {words!r} share their first token")
    return out[0], out[1]


def render_probe(tokenizer_or_processor, multimodal: bool) -> str:
    """The generation prompt of a one-message chat (what answers are resolved against)."""
    content: Any = [{"type": "text", "text": ANSWER_PROBE}] if multimodal else ANSWER_PROBE
    return tokenizer_or_processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)


def answer_token_ids_for(model_path: str | Path, words: tuple[str, str] = YES_NO) -> tuple[int, int]:
    """yes/no token ids of a local HF folder, resolved exactly as ``TransformersBackend`` does."""
    from transformers import AutoTokenizer

    mm = is_multimodal_folder(model_path)
    if mm:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(str(model_path))
        tok = proc.tokenizer
    else:
        proc = tok = AutoTokenizer.from_pretrained(str(model_path))
    return resolve_answer_token_ids(tok, render_probe(proc, mm), words)



class OutputPenalty:
    """A ``transformers`` logits processor with OpenAI's (and vLLM's) frequency / presence
    penalties: over the tokens generated after ``prompt_len`` only, so the prompt's own words
    (what an extraction prompt wants copied) are not penalised."""

    def __init__(self, prompt_len: int, frequency: float = 0.0, presence: float = 0.0) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, float(frequency), float(presence)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        out = input_ids[:, self.prompt_len:]
        if out.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)

class TransformersBackend(ModelBackend):
    """transformers + peft on CPU (or any torch device).

    ``adapters`` maps adapter names (what ``ChatRequest.adapter`` says) to peft adapter folders;
    each is loaded on the first request that names it (a chat that only generates never pays for the
    recommender's adapters, and a scorer loads only the one it uses). Requests with
    ``adapter=None`` run the base model (adapters disabled).
    """

    def __init__(self, model_path: str | Path, adapters: dict[str, str] | None = None, *,
                 dtype: str = "float32", device: str = "cpu", batch_size: int = 8,
                 max_length: int = 4096, threads: int | None = None,
                 prefix_sharing: bool = True, min_shared_prefix: int = 16,
                 answer_words: tuple[str, str] = YES_NO) -> None:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.model_path = Path(model_path)
        self.model_id = f"{self.model_path.name}:{dtype}"  # names the weights (cache keys)
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype)
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length)
        self.prefix_sharing = prefix_sharing
        self.min_shared_prefix = max(1, int(min_shared_prefix))
        self.stats: dict[str, float] = {"generate_calls": 0, "tokens_generated": 0,
                                        "score_calls": 0, "rows_scored": 0,
                                        "prefix_groups": 0, "prefix_rows": 0, "naive_rows": 0,
                                        "forward_s": 0.0}
        self._lock = threading.RLock()  # see _adapter
        self._load(self.model_path)
        self.adapters: dict[str, str] = {}  # loaded, name -> folder
        self._pending: dict[str, str] = {str(k): str(v) for k, v in (adapters or {}).items()}
        self.yes_token_id, self.no_token_id = self._resolve_answer_ids(*answer_words)

    # ------------------------------------------------------------------ loading
    def _load(self, path: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = AutoConfig.from_pretrained(str(path))
        self.config = cfg
        self.supports_images = getattr(cfg, "vision_config", None) is not None
        kw = dict(dtype=self.dtype)
        if self.supports_images:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(str(path))
            self.tokenizer = self.processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(str(path), **kw)
        else:
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(self.device).eval()
        self._peft = False
        image_ids = set()
        tid = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
        if tid is not None:
            image_ids.add(int(tid))
        for attr in ("image_token", "fake_image_token", "global_image_tag", "boi_token"):
            tok = getattr(self.processor, attr, None) if self.processor is not None else None
            if isinstance(tok, str):
                i = self.tokenizer.convert_tokens_to_ids(tok)
                if isinstance(i, int) and i != self.tokenizer.unk_token_id:
                    image_ids.add(i)
        self._image_token_ids = image_ids

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a peft (LoRA) adapter folder under ``name``."""
        from peft import PeftModel

        if not self._peft:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self._peft = True
        else:
            self.model.load_adapter(str(path), adapter_name=name)
        self.model.eval()
        self.adapters[name] = str(path)
        self._pending.pop(name, None)

    @contextmanager
    def _adapter(self, name: str | None) -> Iterator[None]:
        # One caller at a time: the active adapter and the tokenizer's padding state are shared, and
        # servers (msr web, langgraph dev) call from several threads (bench/bench_load.py).
        with self._lock:
            if name is None:
                with (self.model.disable_adapter() if self._peft else nullcontext()):
                    yield
                return
            if name not in self.adapters:
                if name not in self._pending:
                    raise BackendError(f"unknown adapter {name!r}; known: {sorted({**self.adapters, **self._pending})}")
                self.add_adapter(name, self._pending[name])
            self.model.set_adapter(name)
            yield

    def _hf_model(self):
        """The transformers model (LoRA layers injected in place when peft is on)."""
        return self.model.base_model.model if self._peft else self.model

    # ------------------------------------------------------------------ rendering
    def _chat_and_images(self, req: ChatRequest) -> tuple[list[dict[str, Any]], list[Any]]:
        from PIL import Image

        images: list[Any] = []

        def image(path: Path) -> dict[str, Any]:
            if not self.supports_images:
                raise BackendError(f"{self.model_id} is text-only but a request has an image")
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
            return {"type": "image"}

        msgs = []
        for role, c in map_content(req, text=text_part, image=image):
            if self.supports_images:  # multimodal templates take part lists
                msgs.append({"role": role, "content": [text_part(c)] if isinstance(c, str) else c})
            else:
                msgs.append({"role": role, "content": c if isinstance(c, str)
                             else "".join(p["text"] for p in c)})
        return msgs, images

    def render(self, req: ChatRequest, continue_final: bool | None = None) -> tuple[str, list[Any]]:
        """The prompt text and the request's images. The chat template adds the generation prompt,
        or, for a chat that ends with a prefilled answer, leaves that answer open so the model
        continues it (``continue_final`` overrides: False renders a final answer as a closed turn)."""
        msgs, images = self._chat_and_images(req)
        templ = self.processor if self.processor is not None else self.tokenizer
        cont = req.prefill is not None if continue_final is None else continue_final
        text = templ.apply_chat_template(msgs, add_generation_prompt=not cont, continue_final_message=cont,
                                         tokenize=False)
        return text, images

    def _encode(self, texts: list[str], images: list[list[Any]], padding_side: str):
        tok = self.tokenizer
        tok.padding_side = padding_side
        if self.processor is not None and any(images):
            if not all(images):
                raise BackendError("internal: mixed image / no-image rows in one batch")
            enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        else:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        if enc["input_ids"].shape[1] > self.max_length:
            raise BackendError(f"prompt of {enc['input_ids'].shape[1]} tokens exceeds "
                               f"max_length={self.max_length}")
        out = {}
        for k, v in enc.items():
            v = v.to(self.device)
            if k == "pixel_values":
                v = v.to(self.dtype)
            out[k] = v
        return out

    def _resolve_answer_ids(self, yes: str, no: str) -> tuple[int, int]:
        prompt, _ = self.render(ChatRequest.user(ANSWER_PROBE))
        return resolve_answer_token_ids(self.tokenizer, prompt, (yes, no))

    # ------------------------------------------------------------------ grouping helpers
    @staticmethod
    def _groups(requests: Sequence[ChatRequest], images: list[list[Any]]):
        """Indices grouped by (adapter, has images), order kept inside a group."""
        groups: dict[tuple[str | None, bool], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.adapter, bool(images[i])), []).append(i)
        return groups

    def _chunks(self, idx: list[int]) -> Iterator[list[int]]:
        for s in range(0, len(idx), self.batch_size):
            yield idx[s:s + self.batch_size]

    # ------------------------------------------------------------------ generate
    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int = 96,
                 temperature: float = 0.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0) -> list[str]:
        import torch
        from transformers import LogitsProcessorList

        rendered = [self.render(r) for r in requests]
        texts = [t for t, _ in rendered]
        images = [im for _, im in rendered]
        out: list[str | None] = [None] * len(requests)
        self.stats["generate_calls"] += 1
        for (adapter, _), idx in self._groups(requests, images).items():
            with self._adapter(adapter):
                for chunk in self._chunks(idx):
                    enc = self._encode([texts[i] for i in chunk], [images[i] for i in chunk], "left")
                    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens,
                                              pad_token_id=self.tokenizer.pad_token_id)
                    if temperature and temperature > 0:
                        kw.update(do_sample=True, temperature=float(temperature))
                    else:
                        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                    if frequency_penalty or presence_penalty:
                        kw["logits_processor"] = LogitsProcessorList([OutputPenalty(
                            enc["input_ids"].shape[1], frequency_penalty, presence_penalty)])
                    with torch.inference_mode():
                        seqs = self.model.generate(**enc, **kw)
                    new = seqs[:, enc["input_ids"].shape[1]:]
                    for j, i in enumerate(chunk):
                        row = new[j]
                        eos = self._eos_ids()
                        n = len(row)
                        for k, t in enumerate(row.tolist()):
                            if t in eos:
                                n = k
                                break
                        self.stats["tokens_generated"] += n
                        text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
                        # a multi-byte character cut by max_new_tokens decodes as U+FFFD; drop it
                        # (what vLLM's incremental detokenizer does)
                        out[i] = requests[i].completed(text.rstrip("\ufffd"))
        return [o or "" for o in out]

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self._hf_model(), "generation_config", None), self.config,
                    getattr(self.config, "text_config", None)):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(e, int):
                ids.add(e)
            elif e:
                ids.update(e)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ------------------------------------------------------------------ scoring
    def _inner_and_head(self):
        m = self._hf_model()
        inner = getattr(m, "model", None)
        head = m.get_output_embeddings()
        if inner is None or head is None:
            raise BackendError(f"{type(m).__name__}: cannot split into body + LM head")
        return inner, head

    def _yes_no_from_hidden(self, hidden) -> list[float]:
        """hidden: [n, H] at the answer positions → p(yes)/(p(yes)+p(no))."""
        import torch

        _, head = self._inner_and_head()
        logits = head(hidden)[:, [self.yes_token_id, self.no_token_id]].double()
        return torch.softmax(logits, dim=-1)[:, 0].tolist()

    def _forward_naive(self, texts: list[str], images: list[list[Any]]) -> list[float]:
        import torch

        inner, _ = self._inner_and_head()
        enc = self._encode(texts, images, "right")
        with torch.inference_mode():
            h = inner(**enc, use_cache=False).last_hidden_state
        last = enc["attention_mask"].sum(dim=1) - 1
        return self._yes_no_from_hidden(h[torch.arange(h.shape[0], device=h.device), last])

    def _forward_shared(self, prefix_ids: list[int], texts: list[str],
                        images: list[list[Any]]) -> list[float]:
        """Prefix once (KV cache), then every chunk of suffixes (images included) in one forward."""
        import torch

        inner, _ = self._inner_and_head()
        c = len(prefix_ids)
        with torch.inference_mode():
            pre = inner(input_ids=torch.tensor([prefix_ids], device=self.device),
                        attention_mask=torch.ones(1, c, dtype=torch.long, device=self.device),
                        use_cache=True)
            cache = pre.past_key_values
        scores: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            t, im = texts[s:s + self.batch_size], images[s:s + self.batch_size]
            enc = self._encode(t, im, "right")
            ids = enc["input_ids"]
            if ids.shape[1] <= c or not bool((ids[:, :c] == ids.new_tensor(prefix_ids)).all()):
                log.debug("prefix mismatch after processor expansion; naive for this chunk")
                scores += self._forward_naive(t, im)
                continue
            kv = copy.deepcopy(cache)  # the cache is mutated in place by the forward
            kv.batch_repeat_interleave(ids.shape[0])
            kw = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                h = inner(input_ids=ids[:, c:], attention_mask=enc["attention_mask"],
                          past_key_values=kv, use_cache=True, **kw).last_hidden_state
            last = enc["attention_mask"].sum(dim=1) - 1 - c
            scores += self._yes_no_from_hidden(h[torch.arange(h.shape[0], device=h.device), last])
        return scores

    def _plan(self, token_lists: list[list[int]]) -> list[tuple[list[int], int]]:
        """Split rows into (indices, shared prefix length) groups minimising computed tokens.

        Rows sorted by token sequence; a segment's shared prefix is the LCP of its first and last
        rows; it is split at its weakest adjacent link while that lowers
        ``prefix + Σ(len - prefix)``. Prefixes are cut before any image token and kept at least
        one token short of every row."""
        order = sorted(range(len(token_lists)), key=lambda i: token_lists[i])

        def shared(seg: list[int]) -> int:
            a, b = token_lists[seg[0]], token_lists[seg[-1]]
            c = _lcp(a, b)
            c = min(c, min(len(token_lists[i]) for i in seg) - 1)
            for k in range(c):
                if a[k] in self._image_token_ids:
                    c = k
                    break
            return max(c, 0)

        def cost(seg: list[int]) -> int:
            c = shared(seg) if len(seg) > 1 else 0
            return c + sum(len(token_lists[i]) - c for i in seg)

        out = []
        stack = [order]
        while stack:
            seg = stack.pop()
            if len(seg) > 1:
                links = [_lcp(token_lists[seg[k]], token_lists[seg[k + 1]]) for k in range(len(seg) - 1)]
                k = min(range(len(links)), key=links.__getitem__)
                a, b = seg[:k + 1], seg[k + 1:]
                if cost(a) + cost(b) < cost(seg):
                    stack += [a, b]
                    continue
            out.append((seg, shared(seg) if len(seg) > 1 else 0))
        return out

    def score_yes_no(self, requests: Sequence[ChatRequest], *, prefix_sharing: bool | None = None
                     ) -> list[float]:
        share = self.prefix_sharing if prefix_sharing is None else prefix_sharing
        rendered = [self.render(r) for r in requests]
        texts = [t for t, _ in rendered]
        images = [im for _, im in rendered]
        out: list[float | None] = [None] * len(requests)
        self.stats["score_calls"] += 1
        self.stats["rows_scored"] += len(requests)
        t0 = time.perf_counter()
        for (adapter, _), idx in self._groups(requests, images).items():
            with self._adapter(adapter):
                naive = list(idx)
                if share and len(idx) > 1:
                    toks = [self.tokenizer(texts[i], add_special_tokens=False)["input_ids"] for i in idx]
                    naive = []
                    for seg, c in self._plan(toks):
                        rows = [idx[k] for k in seg]
                        if len(rows) > 1 and c >= self.min_shared_prefix:
                            res = self._forward_shared(toks[seg[0]][:c], [texts[i] for i in rows],
                                                       [images[i] for i in rows])
                            for i, p in zip(rows, res, strict=True):
                                out[i] = p
                            self.stats["prefix_groups"] += 1
                            self.stats["prefix_rows"] += len(rows)
                        else:
                            naive += rows
                    naive.sort()
                self.stats["naive_rows"] += len(naive)
                for chunk in self._chunks(naive):
                    res = self._forward_naive([texts[i] for i in chunk], [images[i] for i in chunk])
                    for i, p in zip(chunk, res, strict=True):
                        out[i] = p
        self.stats["forward_s"] += time.perf_counter() - t0
        return [float(p) for p in out]  # type: ignore[arg-type]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
