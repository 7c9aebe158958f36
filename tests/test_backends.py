"""Model backends on the tiny random Idefics3: transformers (generate, scoring, prefix sharing,
adapters), LangChain wrapper, factory, server retries against a local HTTP server, and (slow) a
real vLLM server + in-process vLLM agreeing with transformers on yes/no scores."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mllm_msr.models.base import BackendError, ChatRequest

SUMMARY = ("The user appears to have a preference for red circles with stripes and blue stars; "
           "they dislike green squares and dotted covers. ")
QUESTION = "Will the user like this item? Answer yes or no."


def candidates(images, n=21, adapter=None, summary=SUMMARY):
    """One user's n candidates: shared instructions + summary, then title + cover + question."""
    return [ChatRequest.user([{"type": "text", "text": summary + f"Title: item number {k}" + " x" * (k % 4)},
                              {"type": "image", "path": str(images[k % len(images)])},
                              {"type": "text", "text": QUESTION}],
                             system="You recommend items.", adapter=adapter)
            for k in range(n)]


def mixed_requests(images, adapter=None):
    return [
        ChatRequest.user([{"type": "text", "text": SUMMARY + "Title: a"},
                          {"type": "image", "path": str(images[0])},
                          {"type": "text", "text": QUESTION}], adapter=adapter),
        ChatRequest.user([{"type": "image", "path": str(images[1])},
                          {"type": "text", "text": "Title: b. " + QUESTION}], adapter=adapter),
        ChatRequest.user(SUMMARY + "Title: c (no cover). " + QUESTION, adapter=adapter),
        ChatRequest.user("yes or no?", system="Be brief.", adapter=adapter),
    ]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lora_adapter(tiny_idefics3, tmp_path_factory):
    """A random (non-zero) LoRA adapter on the tiny model's language model, and the merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path_factory.mktemp("lora")
    model = AutoModelForImageTextToText.from_pretrained(tiny_idefics3)
    torch.manual_seed(1)
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                     target_modules=r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(out / "adapter")
    merged = pm.merge_and_unload()
    merged.save_pretrained(out / "merged")
    AutoProcessor.from_pretrained(tiny_idefics3).save_pretrained(out / "merged")
    return out / "adapter", out / "merged"


@pytest.fixture(scope="module")
def hf(tiny_idefics3, lora_adapter):
    from mllm_msr.models.hf_backend import TransformersBackend

    return TransformersBackend(tiny_idefics3, {"rec": str(lora_adapter[0])}, batch_size=32,
                               min_shared_prefix=8)


@pytest.fixture(scope="module")
def text_only_llama(tiny_idefics3, tmp_path_factory):
    """A tiny text-only LlamaForCausalLM folder (the tiny tokenizer and ChatML template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(tiny_idefics3)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                      head_dim=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- transformers
def test_generate_with_and_without_image(hf, tiny_image):
    reqs = [ChatRequest.user("Describe the cover."),
            ChatRequest.user([{"type": "image", "path": str(tiny_image)},
                              {"type": "text", "text": "Describe this image in one sentence."}]),
            ChatRequest.user("Describe the cover.", adapter="rec")]
    before = hf.stats["tokens_generated"]
    out = hf.generate(reqs, max_new_tokens=6)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    assert 0 < hf.stats["tokens_generated"] - before <= 18
    # batched (left padding) = one by one
    assert out == [hf.generate([r], max_new_tokens=6)[0] for r in reqs]


def test_output_penalty_counts_only_generated_tokens():
    import torch

    from mllm_msr.models.hf_backend import OutputPenalty

    ids = torch.tensor([[5, 6, 7, 7], [0, 6, 6, 8]])  # the first 2 columns are the prompt
    got = OutputPenalty(2, frequency=0.5, presence=0.25)(ids, torch.zeros(2, 10))
    want = torch.zeros(2, 10)
    want[0, 7] = -(0.5 * 2 + 0.25)  # generated twice
    want[1, 6], want[1, 8] = -(0.5 + 0.25), -(0.5 + 0.25)  # 6 also in the prompt: counted once
    assert torch.equal(got, want)
    assert torch.equal(OutputPenalty(4, 1.0, 1.0)(ids, torch.ones(2, 10)), torch.ones(2, 10))  # nothing generated


def test_penalties_change_greedy_generation(hf):
    req = [ChatRequest.user("Describe the cover.", prefill="The cover shows")]
    plain = hf.generate(req, max_new_tokens=12)
    assert hf.generate(req, max_new_tokens=12, frequency_penalty=0.0) == plain
    assert hf.generate(req, max_new_tokens=12, frequency_penalty=2.0, presence_penalty=2.0) != plain


def test_prefill_is_continued_not_answered_anew(hf):
    plain = ChatRequest.user("Describe the cover.")
    pre = ChatRequest.user("Describe the cover.", prefill="The cover shows")
    text, _ = hf.render(pre)
    assert text.endswith("The cover shows")  # no end-of-turn after the prefill
    assert text.startswith(hf.render(plain)[0])  # the generation prompt, then the prefill
    out = hf.generate([pre, plain], max_new_tokens=4)
    assert out[0].startswith("The cover shows") and len(out[0]) > len("The cover shows")
    assert out[0] == hf.generate([pre], max_new_tokens=4)[0]


def test_yes_no_token_ids(hf):
    tok = hf.tokenizer
    assert tok.convert_ids_to_tokens(hf.yes_token_id) == "yes"
    assert tok.convert_ids_to_tokens(hf.no_token_id) == "no"


def test_score_in_unit_interval_and_batch_invariant(hf, tiny_images):
    reqs = mixed_requests(tiny_images)
    s = hf.score_yes_no(reqs)
    assert all(0.0 <= p <= 1.0 for p in s)
    one = [hf.score_yes_no([r])[0] for r in reqs]
    assert max(abs(a - b) for a, b in zip(s, one, strict=True)) < 1e-5  # right padding: rows independent


def test_prefix_shared_scoring_equals_naive(hf, tiny_images):
    reqs = candidates(tiny_images, 21)
    naive = hf.score_yes_no(reqs, prefix_sharing=False)
    groups = hf.stats["prefix_groups"]
    shared = hf.score_yes_no(reqs, prefix_sharing=True)
    assert hf.stats["prefix_groups"] == groups + 1
    assert max(abs(a - b) for a, b in zip(naive, shared, strict=True)) < 1e-4
    # two users interleaved, with the adapter: one prefix group per user
    other = candidates(tiny_images, 5, summary="The user likes yellow triangles only. " * 3)
    mix = [r for pair in zip(reqs[:5], other, strict=True) for r in pair]
    mix = [ChatRequest(r.messages, "rec") for r in mix]
    groups = hf.stats["prefix_groups"]
    a = hf.score_yes_no(mix, prefix_sharing=True)
    assert hf.stats["prefix_groups"] == groups + 2
    b = hf.score_yes_no(mix, prefix_sharing=False)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_prefix_cut_before_images_and_short_prefix_falls_back(hf, tiny_images):
    reqs = [ChatRequest.user([{"type": "image", "path": str(tiny_images[k % 3])},
                              {"type": "text", "text": SUMMARY + f"Title {k}. " + QUESTION}])
            for k in range(4)]
    toks = [hf.tokenizer(hf.render(r)[0], add_special_tokens=False)["input_ids"] for r in reqs]
    first_image = min(i for i, t in enumerate(toks[0]) if t in hf._image_token_ids)
    [(rows, c)] = hf._plan(toks)
    assert sorted(rows) == [0, 1, 2, 3] and 0 < c <= first_image  # shared text ends at the image
    naive = hf.score_yes_no(reqs, prefix_sharing=False)
    assert hf.score_yes_no(reqs) == pytest.approx(naive, abs=1e-4)
    n = hf.stats["naive_rows"]
    hf.min_shared_prefix, keep = 10_000, hf.min_shared_prefix
    try:  # prefix too short to pay: naive
        assert hf.score_yes_no(reqs) == pytest.approx(naive, abs=1e-6)
    finally:
        hf.min_shared_prefix = keep
    assert hf.stats["naive_rows"] == n + 4


def test_adapter_differs_from_base_and_equals_merged(hf, lora_adapter, tiny_images):
    from mllm_msr.models.hf_backend import TransformersBackend

    base = hf.score_yes_no(mixed_requests(tiny_images))
    with_ad = hf.score_yes_no(mixed_requests(tiny_images, adapter="rec"))
    assert max(abs(a - b) for a, b in zip(base, with_ad, strict=True)) > 1e-3
    merged = TransformersBackend(lora_adapter[1])
    m = merged.score_yes_no(mixed_requests(tiny_images))
    assert max(abs(a - b) for a, b in zip(with_ad, m, strict=True)) < 1e-4
    reqs = mixed_requests(tiny_images, adapter="rec")
    assert hf.generate(reqs, max_new_tokens=5) == merged.generate(
        [ChatRequest(r.messages) for r in reqs], max_new_tokens=5)
    with pytest.raises(BackendError, match="unknown adapter"):
        hf.score_yes_no([ChatRequest.user("x", adapter="nope")])


def test_adapters_load_on_first_use(tiny_idefics3, lora_adapter, tiny_images):
    """A backend given adapters loads none of them until a request names one (a chat that only
    generates never pays for the recommender's adapters); base outputs are the same before and after."""
    from mllm_msr.models.hf_backend import TransformersBackend

    b = TransformersBackend(tiny_idefics3, {"rec": str(lora_adapter[0]), "other": str(lora_adapter[0])})
    base_before = b.score_yes_no(mixed_requests(tiny_images))
    gen_before = b.generate([ChatRequest.user("Describe the cover.")], max_new_tokens=5)
    assert b.adapters == {} and not b._peft
    with_ad = b.score_yes_no(mixed_requests(tiny_images, adapter="rec"))
    assert set(b.adapters) == {"rec"}  # "other" was never asked for
    assert max(abs(x - y) for x, y in zip(base_before, with_ad, strict=True)) > 1e-3
    assert b.score_yes_no(mixed_requests(tiny_images)) == pytest.approx(base_before, abs=1e-6)
    assert b.generate([ChatRequest.user("Describe the cover.")], max_new_tokens=5) == gen_before
    with pytest.raises(BackendError, match="unknown adapter 'nope'.*other"):
        b.score_yes_no([ChatRequest.user("x", adapter="nope")])


def test_text_only_causal_lm(text_only_llama, tiny_image):
    from mllm_msr.models.hf_backend import TransformersBackend

    b = TransformersBackend(text_only_llama)
    assert not b.supports_images
    reqs = [ChatRequest.user(SUMMARY + f"Title {k}. " + QUESTION, system="sys") for k in range(5)]
    out = b.generate(reqs[:2], max_new_tokens=4)
    assert len(out) == 2
    s = b.score_yes_no(reqs)
    assert all(0 <= p <= 1 for p in s)
    assert s == pytest.approx(b.score_yes_no(reqs, prefix_sharing=False), abs=1e-5)
    with pytest.raises(BackendError, match="text-only"):
        b.generate([ChatRequest.user([{"type": "image", "path": str(tiny_image)}])])


# ----------------------------------------------------------------------------- factory / langchain
def test_model_config_and_factory(tiny_idefics3):
    from pydantic import ValidationError

    from mllm_msr.models.factory import ModelConfig, make_backend
    from mllm_msr.models.hf_backend import TransformersBackend

    cfg = ModelConfig(backend="transformers", model=str(tiny_idefics3), batch_size=4, threads=1)
    assert "description" in ModelConfig.model_json_schema()["properties"]["base_url"]
    b = make_backend(cfg)
    assert isinstance(b, TransformersBackend) and b.batch_size == 4
    with pytest.raises(ValidationError):
        ModelConfig(backend="llama.cpp")
    with pytest.raises(ValidationError):
        ModelConfig(api_key="sk-secret")  # keys never live in configs
    with pytest.raises(BackendError):
        make_backend(ModelConfig(model="/nonexistent/folder"))


def test_lazy_backend_warm_up_builds_once_in_the_background(tiny_idefics3, monkeypatch):
    """`msr chat` starts the model load in a thread; a call racing it waits and gets the same
    backend (built once); a failed warm-up is raised by the first real call."""
    import threading

    import mllm_msr.models.factory as factory
    from mllm_msr.models.factory import ModelConfig
    from mllm_msr.pipeline import LazyBackend

    built, gate = [], threading.Event()
    real = factory.make_backend

    def slow_make(cfg):
        gate.wait(30)
        built.append(real(cfg))
        return built[-1]

    monkeypatch.setattr(factory, "make_backend", slow_make)
    lazy = LazyBackend(ModelConfig(backend="transformers", model=str(tiny_idefics3), threads=1))
    t = lazy.warm_up()
    assert t.is_alive() and lazy._backend is None
    got: list = []
    caller = threading.Thread(target=lambda: got.append(lazy.backend))
    caller.start()
    gate.set()
    t.join(60)
    caller.join(60)
    assert len(built) == 1 and got == [built[0]] and lazy.backend is built[0]

    broken = LazyBackend(ModelConfig(backend="transformers", model=str(tiny_idefics3), threads=1))
    monkeypatch.setattr(factory, "make_backend", lambda cfg: (_ for _ in ()).throw(BackendError("no weights")))
    broken.warm_up().join(30)
    with pytest.raises(BackendError, match="no weights"):
        broken.backend  # noqa: B018


def test_langchain_chat_backend(tiny_image):
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    from mllm_msr.models.factory import LangChainChatBackend, to_langchain_messages

    b = LangChainChatBackend(GenericFakeChatModel(messages=iter(["  a red circle ", "hello"])),
                             max_concurrency=1)
    reqs = [ChatRequest.user([{"type": "text", "text": "Describe."},
                              {"type": "image", "path": str(tiny_image)}], system="sys"),
            ChatRequest.user("Hi")]
    assert b.generate(reqs) == ["a red circle", "hello"]
    msgs = to_langchain_messages(reqs[0])
    assert msgs[0].type == "system" and msgs[1].content[1]["type"] == "image"
    assert msgs[1].content[1]["mime_type"] == "image/png" and msgs[1].content[1]["base64"]
    with pytest.raises(NotImplementedError, match="log-probabilities"):
        b.score_yes_no(reqs)


# ----------------------------------------------------------------------------- retries (local HTTP)
def _completion(top: list[tuple[str, float]], content: str = "yes") -> dict:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": content},
                         "logprobs": {"content": [{"token": top[0][0], "logprob": top[0][1],
                                                   "bytes": None,
                                                   "top_logprobs": [{"token": t, "logprob": lp,
                                                                     "bytes": None}
                                                                    for t, lp in top]}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class _FlakyServer:
    """A real HTTP server on 127.0.0.1: ``script`` is a list of (status, body) answered in order,
    the last one repeated."""

    def __init__(self, script):
        self.script, self.calls, self.auth = list(script), 0, []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                self.rfile.read(n)
                outer.auth.append(self.headers.get("Authorization"))
                status, body = outer.script[min(outer.calls, len(outer.script) - 1)]
                outer.calls += 1
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_backend_retries_then_succeeds(monkeypatch):
    from mllm_msr.models.base import yes_no_probability
    from mllm_msr.models.openai_client import VLLMServerBackend

    monkeypatch.setenv("MSR_TEST_KEY", "sk-test-123")
    err = {"error": {"message": "boom", "type": "server_error"}}
    good = _completion([("yes", -0.5), ("no", -1.5), ("maybe", -3.0)])
    with _FlakyServer([(500, err), (503, err), (200, good)]) as url:
        b = VLLMServerBackend(url, "m", api_key_env="MSR_TEST_KEY", max_retries=3, backoff_s=0.01)
        assert b.score_yes_no([ChatRequest.user("q")]) == pytest.approx(
            [yes_no_probability(-0.5, -1.5)])
        assert b.stats["retries"] == 2
    with _FlakyServer([(500, err), (200, _completion([("a", -0.1)], content="a summary"))]) as url:
        b = VLLMServerBackend(url, "m", max_retries=2, backoff_s=0.01)
        assert b.generate([ChatRequest.user("describe")]) == ["a summary"]
    # upper-bound rule: "no" is not in the top-k → its log-prob is bounded by the smallest one
    with _FlakyServer([(200, _completion([("yes", -0.2), ("maybe", -2.0)]))]) as url:
        b = VLLMServerBackend(url, "m", backoff_s=0.01)
        assert b.score_yes_no([ChatRequest.user("q")]) == pytest.approx(
            [yes_no_probability(-0.2, -2.0)])


def test_server_backend_malformed_raises_naming_request(monkeypatch, caplog):
    from mllm_msr.models.openai_client import VLLMServerBackend

    monkeypatch.setenv("MSR_TEST_KEY", "sk-test-secret-456")
    for body in (b"not json at all", {"choices": []}, {"id": "x"}):
        with _FlakyServer([(200, body)]) as url:
            b = VLLMServerBackend(url, "m", api_key_env="MSR_TEST_KEY", max_retries=2,
                                  backoff_s=0.01)
            with pytest.raises(BackendError, match="user-42/item-7"):
                b.score_yes_no([ChatRequest.user("q")], labels=["user-42/item-7"])
    with _FlakyServer([(400, {"error": {"message": "bad request"}})]) as url:
        b = VLLMServerBackend(url, "m", max_retries=3, backoff_s=0.01)
        with pytest.raises(BackendError, match="#0"):
            b.generate([ChatRequest.user("q")])
    assert "sk-test-secret-456" not in caplog.text


# ----------------------------------------------------------------------------- vLLM (slow, real)
@pytest.fixture(scope="module")
def vllm_server(tiny_idefics3, lora_adapter, tmp_path_factory):
    from mllm_msr.models.vllm_server import ManagedVLLMServer

    with ManagedVLLMServer(tiny_idefics3, {"rec": str(lora_adapter[0])}, max_model_len=1024,
                           max_logprobs=-1,
                           work_dir=tmp_path_factory.mktemp("vllm-server")) as server:
        yield server


@pytest.fixture(scope="module")
def vllm_inproc(tiny_idefics3, lora_adapter, tmp_path_factory):
    from mllm_msr.models.vllm_engine import VLLMInProcessBackend

    b = VLLMInProcessBackend(tiny_idefics3, {"rec": str(lora_adapter[0])}, max_model_len=1024,
                             work_dir=tmp_path_factory.mktemp("vllm-inproc"))
    yield b
    b.close()


@pytest.mark.slow
def test_vllm_server_generate_images_and_score(vllm_server, hf, tiny_images):
    b = vllm_server.backend(max_concurrency=4)
    assert (b.yes_token_id, b.no_token_id) == (hf.yes_token_id, hf.no_token_id)
    reqs = mixed_requests(tiny_images)
    out = b.generate(reqs, max_new_tokens=6)
    assert len(out) == 4 and all(isinstance(o, str) for o in out)
    assert out == hf.generate(reqs, max_new_tokens=6)  # greedy, float32: same text
    s = b.score_yes_no(reqs)
    assert all(0 <= p <= 1 for p in s)
    # top-k mode (no token ids): with the full vocabulary in the top-k it is exact, too
    topk = type(b)(vllm_server.base_url, vllm_server.model, top_logprobs=len(hf.tokenizer))
    assert topk.score_yes_no(reqs) == pytest.approx(s, abs=1e-5)
    with pytest.raises(BackendError, match="#0"):  # unknown adapter: 404, not retried
        b.score_yes_no([ChatRequest.user("x", adapter="nope")])
    # the factory connects to a running server when given base_url
    from mllm_msr.models.factory import ModelConfig, make_backend

    cfg = ModelConfig(backend="vllm-server", base_url=vllm_server.base_url, model=vllm_server.model)
    assert make_backend(cfg).score_yes_no(reqs) == pytest.approx(s, abs=1e-6)


@pytest.mark.slow
def test_managed_server_death_reports_log_tail(tiny_idefics3, tmp_path):
    from mllm_msr.models.vllm_server import ManagedVLLMServer

    with pytest.raises(BackendError, match="not a local HF model folder"):
        ManagedVLLMServer(tmp_path / "missing", work_dir=tmp_path).start()
    server = ManagedVLLMServer(tiny_idefics3, extra_args=["--no-such-flag"], work_dir=tmp_path)
    with pytest.raises(BackendError, match="(?s)exited with code.*no-such-flag"):
        server.start()
    assert server.proc is None


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [None, "rec"])
def test_three_backends_agree(vllm_server, vllm_inproc, hf, tiny_images, adapter):
    reqs = mixed_requests(tiny_images, adapter) + candidates(tiny_images, 6, adapter)
    t = hf.score_yes_no(reqs)
    s = vllm_server.backend().score_yes_no(reqs)
    v = vllm_inproc.score_yes_no(reqs)
    print(f"adapter={adapter}: max |transformers - server| = "
          f"{max(abs(a - b) for a, b in zip(t, s, strict=True)):.2e}, max |transformers - in-process| = "
          f"{max(abs(a - b) for a, b in zip(t, v, strict=True)):.2e} over {len(reqs)} requests")
    assert max(abs(a - b) for a, b in zip(t, s, strict=True)) < 2e-3
    assert max(abs(a - b) for a, b in zip(t, v, strict=True)) < 2e-3
    if adapter:
        base = hf.score_yes_no(mixed_requests(tiny_images) + candidates(tiny_images, 6))
        assert max(abs(a - b) for a, b in zip(t, base, strict=True)) > 1e-3
    g = vllm_inproc.generate(reqs[:4], max_new_tokens=5)
    assert g == hf.generate(reqs[:4], max_new_tokens=5)
    # a prefilled answer is continued the same way by all three (continue_final_message)
    pre = [ChatRequest.user("Describe the cover.", adapter=adapter, prefill="The cover shows"),
           ChatRequest.user([{"type": "image", "path": str(tiny_images[0])},
                             {"type": "text", "text": "Describe it."}], adapter=adapter, prefill="It is")]
    want = hf.generate(pre, max_new_tokens=5)
    assert want[0].startswith("The cover shows") and want[1].startswith("It is")
    assert vllm_inproc.generate(pre, max_new_tokens=5) == want
    assert vllm_server.backend().generate(pre, max_new_tokens=5) == want
    # OpenAI's penalties, over the generated tokens only, decode the same way in all three
    pen = dict(max_new_tokens=10, frequency_penalty=1.5, presence_penalty=0.5)
    want = hf.generate(pre + reqs[:2], **pen)
    assert want != hf.generate(pre + reqs[:2], max_new_tokens=10)
    assert vllm_inproc.generate(pre + reqs[:2], **pen) == want
    assert vllm_server.backend().generate(pre + reqs[:2], **pen) == want
