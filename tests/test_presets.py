"""GPU presets: `msr preset check` validates each shipped preset without a GPU, and the code path
real weights take runs here: per preset, a random-weights model of its architecture at its REAL
image settings (tile size, patch, scale factor, tokens per tile, image splitting, resize edge, chat
template) with depth and width reduced writes one item summary and scores one candidate through
transformers and through vLLM in process, with the same p(yes).
"""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mllm_msr.cli import app
from mllm_msr.config import load_config
from mllm_msr.pipeline import build_services
from mllm_msr.presets import build_reduced, check_preset, load_preset, preset_names

PRESETS = ["smolvlm-256m", "smolvlm-2.2b", "idefics3-8b"]


def test_the_shipped_presets_are_these():
    assert preset_names() == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_msr_preset_check_passes(name):
    res = CliRunner().invoke(app, ["preset", "check", name])
    assert res.exit_code == 0, res.output
    assert "--tensor-parallel-size" in res.output and "lora_r=8" in res.output


def test_preset_check_catches_a_missing_lora_target_and_unknown_keys(tmp_path):
    from mllm_msr.presets import preset_path

    text = preset_path("smolvlm-256m").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("target_modules: [q_proj,", "target_modules: [qkv_proj, q_proj,"))
    rows = {r.what: r for r in check_preset(str(bad))}
    assert not rows["LoRA targets"].ok and "qkv_proj" in rows["LoRA targets"].detail
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("items: {batch_size: 256}", "items: {batch_sise: 256}"))
    [row] = check_preset(str(typo))
    assert not row.ok and "items.batch_sise" in row.detail
    assert CliRunner().invoke(app, ["preset", "check", str(typo)]).exit_code == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_reduced_preset_model_summarizes_and_scores_on_transformers_and_vllm(name, synth_dataset, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    spec, _ = load_preset(name)
    folder = build_reduced(spec, tmp_path / "model")
    item = next(i for i in synth_dataset.items.values() if i.image_path)

    # the real processor settings: a small cover is resized to the long edge and split into tiles
    proc = AutoProcessor.from_pretrained(folder)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>User:") and prompt.endswith("Assistant:")
    ids = proc(text=prompt, images=[[Image.open(item.image_path).convert("RGB")]])["input_ids"][0]
    p = spec.processor
    tiles = (-(-p.longest_edge // p.max_image_size)) ** 2 + 1
    assert ids.count(proc.tokenizer.convert_tokens_to_ids("<image>")) == tiles * p.image_seq_len

    results = {}
    for backend in ("transformers", "vllm"):
        model = {"backend": backend, "model": str(folder), "dtype": "float32", "max_model_len": 4096}
        cfg = load_config(None, [f"store.path={tmp_path / backend}", "recommender.adapter=null",
                                 "items.image_tokens=8", "items.text_tokens=8", "items.fuse_tokens=8"])
        cfg = cfg.model_copy(update={"generator": cfg.generator.model_validate(model),
                                     "scorer": cfg.scorer.model_validate(model)})
        s = build_services(cfg, synth_dataset)
        try:
            summary = s.summarizer.summarize([item])[item.item_id]
            [score] = s.recommender.score("The user likes red stars.", [item])
        finally:
            s.recommender.backend.close()
        assert s.summarizer.model_calls == 3 and summary.summary
        assert 0.0 < score < 1.0
        results[backend] = score
    assert results["vllm"] == pytest.approx(results["transformers"], abs=2e-3)
