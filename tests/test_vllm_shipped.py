"""The shipped model with the shipped LoRA adapter through vLLM (in process, prefix caching, exact
yes/no logprobs) scores like transformers + peft: |Δp| ≤ 1e-3 and the same ranking per user.
Also the CPU bf16 detection and the ``auto`` dtype."""
from __future__ import annotations

import pytest

from mllm_msr.models.devices import native_bf16, resolve_dtype

CONTEXTS = ("The user appears to have a preference for striped red covers and fantasy films.",
            "The user appears to have a preference for dotted blue covers and mystery novels.")


def test_resolve_dtype_auto_follows_the_cpu():
    assert resolve_dtype("auto") == ("bfloat16" if native_bf16("cpu") else "float32")
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    assert native_bf16("mps") is False


def _users(tmp_path):
    from mllm_msr.agents.recommender import Recommender, RecommenderConfig
    from mllm_msr.data.covers import DEFAULT_CATALOG, draw_cover
    from mllm_msr.data.schema import Item

    items = []
    for k in range(8):
        p = tmp_path / f"c{k}.png"
        draw_cover(*DEFAULT_CATALOG.cycle(k)).save(p)
        items.append(Item(f"c{k}", f"A {('fantasy film', 'mystery novel', 'comedy')[k % 3]}: Archive {k}",
                          image_path=p))
    rec = Recommender(None, RecommenderConfig())
    return [[rec.request(ctx, it, "rec") for it in items] for ctx in CONTEXTS]


@pytest.mark.slow
def test_shipped_model_and_adapter_vllm_matches_transformers(tmp_path):
    from mllm_msr.models.embedded import ensure_default_model
    from mllm_msr.models.hf_backend import TransformersBackend
    from mllm_msr.models.vllm_engine import VLLMInProcessBackend
    from mllm_msr.pipeline import SHIPPED_RECENT_ADAPTER as SHIPPED_ADAPTER

    path = ensure_default_model()
    users = _users(tmp_path)
    hf = TransformersBackend(path, {"rec": str(SHIPPED_ADAPTER)}, batch_size=8, threads=1)
    ref = [hf.score_yes_no(u) for u in users]
    base = hf.score_yes_no([r.__class__(r.messages, None) for r in users[0]])
    hf.close()
    v = VLLMInProcessBackend(path, {"rec": str(SHIPPED_ADAPTER)}, max_model_len=1024, work_dir=tmp_path / "vllm")
    try:
        got = [v.score_yes_no(u) for u in users]
    finally:
        v.close()
    for r, g in zip(ref, got, strict=True):
        assert max(abs(a - b) for a, b in zip(r, g, strict=True)) <= 1e-3
        assert sorted(range(len(r)), key=lambda i: -r[i]) == sorted(range(len(g)), key=lambda i: -g[i])
    # the adapter is really applied (scores differ from the base model's)
    assert max(abs(a - b) for a, b in zip(ref[0], base, strict=True)) > 1e-2
